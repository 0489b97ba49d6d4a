"""The ledger: an append-only audit store of every key operation and partition change.

SQLAlchemy Core over any URL (a SQLite file by default, PostgreSQL in production). Rows are
only ever inserted; the database itself refuses UPDATE and DELETE through triggers, so the
audit trail cannot be edited through this package or by a careless query.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

# Event names, as they appear in the ledger and in reports.
KEY_CREATED = "key_created"
VERSION_CREATED = "version_created"
REFERENCE_UPDATED = "reference_updated"
ROTATION_SKIPPED = "rotation_skipped"
PARTITION_WRITTEN = "partition_written"
PARTITION_REWRAPPED = "partition_rewrapped"
PARTITION_REENCRYPTED = "partition_reencrypted"
PARTITION_RECONCILED = "partition_reconciled"
PARTITION_FAILED = "partition_failed"
PARTITION_VALIDATED = "partition_validated"
VALIDATION_FAILED = "validation_failed"
VERSIONS_RETIRED = "versions_retired"
RETIREMENT_REFUSED = "retirement_refused"

PARTITION_CHANGES = (PARTITION_WRITTEN, PARTITION_REWRAPPED, PARTITION_REENCRYPTED, PARTITION_RECONCILED)

metadata = sa.MetaData()
events = sa.Table(
    "ledger_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("event", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, default="ok"),
    sa.Column("key_class", sa.String(128), nullable=False),
    sa.Column("dataset", sa.String(128)),
    sa.Column("partition", sa.String(256)),
    sa.Column("from_version", sa.Integer),
    sa.Column("to_version", sa.Integer),
    sa.Column("rows", sa.BigInteger),
    sa.Column("bytes", sa.BigInteger),
    sa.Column("digest", sa.String(128)),
    sa.Column("duration_s", sa.Float),
    sa.Column("detail", sa.Text),
    sa.Column("dag_id", sa.String(250)),
    sa.Column("run_id", sa.String(250)),
    sa.Column("task_id", sa.String(250)),
    sa.Column("try_number", sa.Integer),
    sa.Column("actor", sa.String(250)),
    sa.Index("ix_ledger_key_class_event", "key_class", "event"),
    sa.Index("ix_ledger_dataset_partition", "dataset", "partition"),
)

_APPEND_ONLY = {
    "sqlite": [
        "CREATE TRIGGER IF NOT EXISTS ledger_events_no_update BEFORE UPDATE ON ledger_events "
        "BEGIN SELECT RAISE(ABORT, 'ledger_events is append-only'); END",
        "CREATE TRIGGER IF NOT EXISTS ledger_events_no_delete BEFORE DELETE ON ledger_events "
        "BEGIN SELECT RAISE(ABORT, 'ledger_events is append-only'); END",
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION ledger_events_append_only() RETURNS trigger AS $$ "
        "BEGIN RAISE EXCEPTION 'ledger_events is append-only'; END; $$ LANGUAGE plpgsql",
        "DROP TRIGGER IF EXISTS ledger_events_append_only ON ledger_events",
        "CREATE TRIGGER ledger_events_append_only BEFORE UPDATE OR DELETE ON ledger_events "
        "FOR EACH ROW EXECUTE FUNCTION ledger_events_append_only()",
    ],
}


@dataclass(frozen=True)
class RunContext:
    """Who is acting: the Airflow task instance (or a script) behind a ledger row."""

    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    try_number: int | None = None
    actor: str | None = None


def default_url() -> str:
    """``$KEYROTATION_LEDGER_URL``, else a SQLite file under ``$KEYROTATION_HOME`` (default ``./var``)."""
    url = os.environ.get("KEYROTATION_LEDGER_URL")
    if url:
        return url
    home = Path(os.environ.get("KEYROTATION_HOME", "var")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'ledger.db'}"


class Ledger:
    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_url()
        kwargs: dict[str, Any] = {"future": True}
        if self.url.startswith("sqlite"):
            # Mapped tasks write concurrently: wait for the lock instead of failing.
            kwargs["connect_args"] = {"timeout": 60}
        self.engine = sa.create_engine(self.url, **kwargs)
        metadata.create_all(self.engine)
        statements = _APPEND_ONLY.get(self.engine.dialect.name, [])
        if statements:
            with self.engine.begin() as conn:
                for statement in statements:
                    conn.exec_driver_sql(statement)

    def record(self, event: str, key_class: str, ctx: RunContext | None = None, *, status: str = "ok",
               detail: dict | None = None, **fields: Any) -> None:
        row = {
            "recorded_at": datetime.now(UTC),
            "event": event,
            "status": status,
            "key_class": key_class,
            "detail": json.dumps(detail, sort_keys=True, default=str) if detail else None,
            **asdict(ctx or RunContext()),
            **fields,
        }
        with self.engine.begin() as conn:
            conn.execute(events.insert().values(**row))

    def rows(self, *, key_class: str | None = None, dataset: str | None = None,
             events_in: tuple[str, ...] | None = None, since: datetime | None = None) -> list[dict]:
        query = sa.select(events).order_by(events.c.id)
        if key_class:
            query = query.where(events.c.key_class == key_class)
        if dataset:
            query = query.where(events.c.dataset == dataset)
        if events_in:
            query = query.where(events.c.event.in_(events_in))
        if since:
            query = query.where(events.c.recorded_at >= since)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def _last(self, query: sa.Select) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(query.order_by(events.c.id.desc()).limit(1)).first()
        return dict(row._mapping) if row else None

    def current_reference(self, key_class: str) -> dict | None:
        """The last ``reference_updated`` row: the version data must be under."""
        return self._last(
            sa.select(events).where(events.c.key_class == key_class, events.c.event == REFERENCE_UPDATED)
        )

    def current_version(self, key_class: str) -> int | None:
        row = self.current_reference(key_class)
        return int(row["to_version"]) if row else None

    def partition_record(self, dataset: str, partition: str) -> dict | None:
        """The last successful change recorded for a partition (holds its digest)."""
        return self._last(
            sa.select(events).where(
                events.c.dataset == dataset,
                events.c.partition == partition,
                events.c.event.in_(PARTITION_CHANGES),
                events.c.status == "ok",
            )
        )
