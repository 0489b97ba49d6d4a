"""The ledger: an append-only audit store of every key operation and partition change.

SQLAlchemy Core over any URL (a SQLite file by default, PostgreSQL in production). Rows are
only ever inserted; the database itself refuses UPDATE and DELETE through triggers, so the
audit trail cannot be edited through this package or by a careless query.

Rows also form a hash chain: each row stores the previous row's ``row_hash`` as ``prev_hash`` and
``row_hash = sha256(prev_hash + canonical JSON of its other columns)``, so an edit or a deletion
made around the triggers shows up in ``Ledger.verify()`` / ``python -m keyrotation.ledger verify``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from keyrotation.errors import KeyRotationError

# Event names, as they appear in the ledger and in reports.
KEY_CREATED = "key_created"
VERSION_CREATED = "version_created"
VERSION_PROMOTED = "version_promoted"
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
RETIREMENT_DECISION = "retirement_decision"
RETIREMENT_REFUSED = "retirement_refused"
RETIREMENT_NOT_POSSIBLE = "retirement_not_possible"
REPORT_WRITTEN = "report_written"

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
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("row_hash", sa.String(64), nullable=False),
    sa.Index("ix_ledger_key_class_event", "key_class", "event"),
    sa.Index("ix_ledger_dataset_partition", "dataset", "partition"),
)

GENESIS_HASH = "0" * 64  # the first row's prev_hash
_HASHED = tuple(c.name for c in events.columns if c.name not in ("id", "prev_hash", "row_hash"))
# Any fixed key: PostgreSQL writers take this transaction-level advisory lock before chaining.
_PG_WRITE_LOCK = 0x6B65795F6C6467

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


class LedgerFormatError(KeyRotationError):
    """The database holds a ledger in a format this version cannot extend."""


@dataclass(frozen=True)
class RunContext:
    """Who is acting: the Airflow task instance (or a script) behind a ledger row."""

    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    try_number: int | None = None
    actor: str | None = None


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of ``Ledger.verify()``; ``rows_checked`` includes the broken row, if any."""

    ok: bool
    rows_checked: int
    first_broken_id: int | None = None
    reason: str | None = None


def _utc(value: datetime) -> datetime:
    # SQLite hands datetimes back naive (they were stored as UTC); PostgreSQL in the session's zone.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _normalised(row: dict[str, Any]) -> dict[str, Any]:
    """The row's values as the database hands them back (an int duration reads back as a float, ...).

    The hash is computed over these and these are inserted, so ``verify()`` recomputes the same hash.
    """
    out = dict(row)
    for name in _HASHED:
        value = row.get(name)
        if value is not None:
            kind = events.c[name].type.python_type
            out[name] = _utc(value) if kind is datetime else kind(value)
    return out


def _row_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    payload = {}
    for name in _HASHED:
        value = row.get(name)
        payload[name] = _utc(value).isoformat() if isinstance(value, datetime) else value
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


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
        # Under the write lock, so that workers opening a brand-new ledger together do not race.
        with self._writing() as conn:
            metadata.create_all(conn)
            columns = {c["name"] for c in sa.inspect(conn).get_columns("ledger_events")}
            if "row_hash" not in columns:
                shown = self.engine.url.render_as_string(hide_password=True)
                raise LedgerFormatError(f"ledger {shown} predates the hash chain (no row_hash column): keep it "
                                        "as evidence and point KEYROTATION_LEDGER_URL at a new ledger")
            for statement in _APPEND_ONLY.get(self.engine.dialect.name, []):
                conn.exec_driver_sql(statement)

    @contextmanager
    def _writing(self) -> Iterator[sa.Connection]:
        """A transaction holding the ledger's write lock: writers, from any process, chain one at a time."""
        if self.engine.dialect.name == "sqlite":
            # BEGIN IMMEDIATE takes the write lock before the last row is read. Only for ledger writes:
            # every other transaction keeps pysqlite's lazy BEGIN, since a read-then-write transaction
            # (the partition leases) that began with a plain BEGIN fails at once with "database is locked"
            # instead of waiting. On an exception, closing the connection rolls back.
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                yield conn
                conn.exec_driver_sql("COMMIT")
            return
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_WRITE_LOCK)))
            yield conn

    def record(self, event: str, key_class: str, ctx: RunContext | None = None, *, status: str = "ok",
               detail: dict | None = None, at: datetime | None = None, **fields: Any) -> None:
        """Append one event. ``at`` (default: now) is for importing history recorded elsewhere; the hash
        chain covers it like every other field."""
        row = _normalised({
            "recorded_at": at or datetime.now(UTC),
            "event": event,
            "status": status,
            "key_class": key_class,
            "detail": json.dumps(detail, sort_keys=True, default=str) if detail else None,
            **asdict(ctx or RunContext()),
            **fields,
        })
        with self._writing() as conn:
            last = conn.execute(sa.select(events.c.row_hash).order_by(events.c.id.desc()).limit(1)).scalar()
            prev_hash = last or GENESIS_HASH
            conn.execute(events.insert().values({**row, "prev_hash": prev_hash, "row_hash": _row_hash(prev_hash, row)}))

    def verify(self) -> VerifyResult:
        """Walk the hash chain in id order; report the first row that was edited, or follows a deleted one."""
        prev_hash, checked = GENESIS_HASH, 0
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=1000).execute(sa.select(events).order_by(events.c.id))
            for row in result.mappings():
                checked += 1
                if row["prev_hash"] != prev_hash:
                    return VerifyResult(False, checked, row["id"], "prev_hash does not match the previous row's hash")
                if row["row_hash"] != _row_hash(prev_hash, row):
                    return VerifyResult(False, checked, row["id"], "row_hash does not match its content")
                prev_hash = row["row_hash"]
        return VerifyResult(True, checked)

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyrotation.ledger", description="Ledger maintenance.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check the ledger's hash chain (exit 1 if broken)")
    verify.add_argument("--url", help="ledger database URL (default: $KEYROTATION_LEDGER_URL, else the SQLite file)")
    args = parser.parse_args(argv)
    url = args.url or default_url()
    shown = sa.make_url(url).render_as_string(hide_password=True)
    database = sa.make_url(url).database
    if url.startswith("sqlite") and database and not Path(database).exists():
        print(f"ledger {shown}: no such file; nothing verified")  # opening it would create an empty ledger
        return 2
    try:
        result = Ledger(url).verify()
    except KeyRotationError as exc:
        print(exc)
        return 2
    if result.ok:
        print(f"ledger {shown}: {result.rows_checked} rows, chain intact")
        return 0
    print(f"ledger {shown}: chain broken at row {result.first_broken_id}: {result.reason}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
