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
from urllib.parse import quote, unquote

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
KMS_UNREACHABLE = "kms_unreachable"
CONFIG_INVALID = "config_invalid"
# A dry run of a rotation or a re-encryption: what it found, and nothing else written anywhere.
DRY_RUN = "dry_run"
VERSIONS_RETIRED = "versions_retired"
RETIREMENT_DECISION = "retirement_decision"
RETIREMENT_REFUSED = "retirement_refused"
RETIREMENT_NOT_POSSIBLE = "retirement_not_possible"
REPORT_WRITTEN = "report_written"
# The engine's own bookkeeping of a partition's files: a new generation about to be moved into place, a
# partition found without a manifest (adopted, or its manifest rebuilt from the ledger), files removed.
GENERATION_STAGED = "generation_staged"
PARTITION_ADOPTED = "partition_adopted"
MANIFEST_REBUILT = "manifest_rebuilt"
PARTITION_CLEANED = "partition_cleaned"

PARTITION_CHANGES = (PARTITION_WRITTEN, PARTITION_REWRAPPED, PARTITION_REENCRYPTED, PARTITION_RECONCILED)
# Rows whose detail names files the engine wrote or adopted in a partition.
PARTITION_FILE_EVENTS = (*PARTITION_CHANGES, GENERATION_STAGED, PARTITION_ADOPTED, MANIFEST_REBUILT)
PARTITION_VALIDATIONS = (PARTITION_VALIDATED, VALIDATION_FAILED)

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


class LedgerUnreadable(KeyRotationError):
    """A ledger opened read-only could not be read: no such ledger, cannot connect, permission denied, or not
    a ledger (of this format); nothing was checked."""


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


def as_utc(value: datetime) -> datetime:
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
            out[name] = as_utc(value) if kind is datetime else kind(value)
    return out


def _row_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    payload = {}
    for name in _HASHED:
        value = row.get(name)
        payload[name] = as_utc(value).isoformat() if isinstance(value, datetime) else value
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


def home_dir() -> Path:
    """``$KEYROTATION_HOME`` (default ``./var``): where the ledger, the reports and the ledger's checkpoints are
    kept unless configured otherwise."""
    return Path(os.environ.get("KEYROTATION_HOME", "var")).resolve()


def default_url(create: bool = True) -> str:
    """``$KEYROTATION_LEDGER_URL``, else a SQLite file under ``$KEYROTATION_HOME`` (default ``./var``), whose
    folder is made unless ``create`` is false."""
    url = os.environ.get("KEYROTATION_LEDGER_URL")
    if url:
        return url
    home = home_dir()
    if create:
        home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'ledger.db'}"


def _sqlite_read_only(url: sa.URL, shown: str) -> sa.URL:
    """The same SQLite file, opened in SQLite's own read-only mode (a URI filename with ``mode=ro``): no
    journal, no table, not even an empty file is ever written, whatever the file's permissions."""
    database = url.database or ""
    if url.query.get("uri") in ("true", "1", "True") and database.startswith("file:"):
        path = unquote(database.removeprefix("file:").split("?", 1)[0])
        if path.startswith("//"):  # file://host/path: SQLite takes only an empty host or localhost
            path = "/" + path[2:].split("/", 1)[-1]
        read_only = url.update_query_dict({"mode": "ro"})
    elif database in ("", ":memory:"):
        raise LedgerUnreadable(f"ledger {shown}: an in-memory database holds no ledger")
    else:
        path = str(Path(database).resolve())
        read_only = url.set(database=f"file:{quote(path)}").update_query_dict({"mode": "ro", "uri": "true"})
    if not Path(path).exists():
        raise LedgerUnreadable(f"ledger {shown}: no such file")
    return read_only


def _shown(url: sa.URL, given: str) -> str:
    """The URL as given, unless it holds a password (rendering re-quotes e.g. a ``file:`` database)."""
    return url.render_as_string(hide_password=True) if url.password is not None else given


def _reason(exc: sa.exc.DBAPIError) -> str:
    """The driver's message, first line only (psycopg2 adds hints on the lines after)."""
    lines = str(exc.orig).strip().splitlines()
    return lines[0] if lines else type(exc.orig).__name__


def current_state(db: sa.Engine, key_class: str) -> tuple[int | None, int]:
    """The two facts an application needs: the version to encrypt under (the last ``reference_updated``) and
    the retired floor (versions below the highest successful ``versions_retired`` no longer decrypt; 0: none).
    SELECT only: what the client library and the sidecar read, with a reader's credentials."""
    with db.connect() as conn:
        reference = conn.execute(sa.select(events.c.to_version).where(
            events.c.key_class == key_class, events.c.event == REFERENCE_UPDATED).order_by(events.c.id.desc()).limit(1)
        ).scalar()
        floor = conn.execute(sa.select(sa.func.max(events.c.to_version)).where(
            events.c.key_class == key_class, events.c.event == VERSIONS_RETIRED, events.c.status == "ok")).scalar()
    return (int(reference) if reference is not None else None), int(floor or 0)


class Ledger:
    """The ledger at ``url``. It is created (table, indexes, append-only triggers) if missing, unless
    ``read_only``: then nothing is created or written, not even the triggers; the table and its hash-chain
    columns are checked by inspection, and any failure to read is a :class:`LedgerUnreadable` or a
    :class:`LedgerFormatError`. SELECT on ``ledger_events`` is all a read-only ledger needs."""

    def __init__(self, url: str | None = None, *, read_only: bool = False) -> None:
        self.url = url or default_url(create=not read_only)
        self.read_only = read_only
        target = sa.make_url(self.url)
        self.shown = _shown(target, self.url)
        kwargs: dict[str, Any] = {"future": True}
        if target.get_backend_name() == "sqlite":
            # Mapped tasks write concurrently: wait for the lock instead of failing.
            kwargs["connect_args"] = {"timeout": 60}
            if read_only:
                target = _sqlite_read_only(target, self.shown)
        self.db = sa.create_engine(target, **kwargs)
        if read_only:
            if self.db.dialect.name == "postgresql":  # the server refuses any write in these sessions
                self.db = self.db.execution_options(postgresql_readonly=True)
            self._check_readable()
            return
        # Under the write lock, so that workers opening a brand-new ledger together do not race.
        with self._writing() as conn:
            metadata.create_all(conn)
            columns = {c["name"] for c in sa.inspect(conn).get_columns("ledger_events")}
            if "row_hash" not in columns:
                shown = self.db.url.render_as_string(hide_password=True)
                raise LedgerFormatError(f"ledger {shown} predates the hash chain (no row_hash column): keep it "
                                        "as evidence and point KEYROTATION_LEDGER_URL at a new ledger")
            for statement in _APPEND_ONLY.get(self.db.dialect.name, []):
                conn.exec_driver_sql(statement)

    def _check_readable(self) -> None:
        """By inspection only: the table is there with every column of this format, and this role may read it."""
        try:
            conn = self.db.connect()
        except sa.exc.DBAPIError as exc:
            raise LedgerUnreadable(f"ledger {self.shown}: cannot connect: {_reason(exc)}") from None
        try:
            with conn:
                inspector = sa.inspect(conn)
                if not inspector.has_table(events.name):
                    raise LedgerUnreadable(f"ledger {self.shown}: not a ledger (no table {events.name})")
                columns = {c["name"] for c in inspector.get_columns(events.name)}
                missing = [c.name for c in events.columns if c.name not in columns]
                if missing and set(missing) <= {"prev_hash", "row_hash"}:
                    raise LedgerFormatError(f"ledger {self.shown}: an older format, before the hash chain (no "
                                            f"{' or '.join(missing)} column)")
                if missing:
                    raise LedgerUnreadable(f"ledger {self.shown}: not a ledger (table {events.name} has no "
                                           f"column {', '.join(missing)})")
                conn.execute(sa.select(events.c.id).limit(1)).all()  # SELECT granted?
        except sa.exc.DBAPIError as exc:
            raise LedgerUnreadable(f"ledger {self.shown}: cannot read {events.name}: {_reason(exc)}") from None

    @contextmanager
    def _writing(self) -> Iterator[sa.Connection]:
        """A transaction holding the ledger's write lock: writers, from any process, chain one at a time."""
        if self.read_only:
            raise KeyRotationError(f"ledger {self.shown} was opened read-only: nothing can be recorded")
        if self.db.dialect.name == "sqlite":
            # BEGIN IMMEDIATE takes the write lock before the last row is read. Only for ledger writes:
            # every other transaction keeps pysqlite's lazy BEGIN, since a read-then-write transaction
            # (the partition leases) that began with a plain BEGIN fails at once with "database is locked"
            # instead of waiting. On an exception, closing the connection rolls back.
            with self.db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                yield conn
                conn.exec_driver_sql("COMMIT")
            return
        with self.db.begin() as conn:
            if self.db.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_WRITE_LOCK)))
            yield conn

    @staticmethod
    def row(event: str, key_class: str, ctx: RunContext | None = None, *, status: str = "ok",
            detail: dict | None = None, at: datetime | None = None, **fields: Any) -> dict[str, Any]:
        """The row :meth:`record` would append (for :meth:`record_many`); ``recorded_at`` is taken now."""
        unknown = sorted(set(fields) - set(_HASHED))
        if unknown:
            raise TypeError(f"ledger rows have no column(s) {', '.join(unknown)}")
        row = _normalised({
            "recorded_at": at or datetime.now(UTC),
            "event": event,
            "status": status,
            "key_class": key_class,
            "detail": json.dumps(detail, sort_keys=True, default=str) if detail else None,
            **asdict(ctx or RunContext()),
            **fields,
        })
        return {name: row.get(name) for name in _HASHED}

    def record(self, event: str, key_class: str, ctx: RunContext | None = None, *, status: str = "ok",
               detail: dict | None = None, at: datetime | None = None, **fields: Any) -> None:
        """Append one event. ``at`` (default: now) is for importing history recorded elsewhere; the hash
        chain covers it like every other field."""
        self.record_many([self.row(event, key_class, ctx, status=status, detail=detail, at=at, **fields)])

    def record_many(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` (made by :meth:`row`), in order, in one transaction: each chained to the one before
        exactly as one :meth:`record` after another would chain them."""
        if not rows:
            return
        with self._writing() as conn:
            last = conn.execute(sa.select(events.c.row_hash).order_by(events.c.id.desc()).limit(1)).scalar()
            prev_hash = last or GENESIS_HASH
            chained = []
            for row in rows:
                row_hash = _row_hash(prev_hash, row)
                chained.append({**row, "prev_hash": prev_hash, "row_hash": row_hash})
                prev_hash = row_hash
            conn.execute(events.insert(), chained)

    def verify(self) -> VerifyResult:
        """Walk the hash chain in id order; report the first row that was edited, or follows a deleted one."""
        prev_hash, checked = GENESIS_HASH, 0
        with self.db.connect() as conn:
            result = conn.execution_options(yield_per=1000).execute(sa.select(events).order_by(events.c.id))
            for row in result.mappings():
                checked += 1
                if row["prev_hash"] != prev_hash:
                    return VerifyResult(False, checked, row["id"], "prev_hash does not match the previous row's hash")
                if row["row_hash"] != _row_hash(prev_hash, row):
                    return VerifyResult(False, checked, row["id"], "row_hash does not match its content")
                prev_hash = row["row_hash"]
        return VerifyResult(True, checked)

    def append_only_findings(self) -> list[str]:
        """What is wrong with the triggers that refuse UPDATE and DELETE (none: they are all in place), read
        from the catalog: never repaired here, since a guard someone removed is evidence in itself."""
        dialect = self.db.dialect.name
        with self.db.connect() as conn:
            if dialect == "sqlite":
                triggers = dict(conn.execute(sa.text(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = :table"),
                    {"table": events.name}).all())
            elif dialect == "postgresql":
                rows = conn.execute(sa.text(
                    "SELECT t.tgname, t.tgenabled, t.tgtype, p.proname, p.prosrc FROM pg_trigger t "
                    "JOIN pg_proc p ON p.oid = t.tgfoid WHERE t.tgrelid = CAST(:table AS regclass) "
                    "AND NOT t.tgisinternal"), {"table": events.name}).all()
            else:
                return [f"no append-only triggers on {dialect}: UPDATE and DELETE are not refused"]
        if dialect == "sqlite":
            findings = []
            for name, verb in (("ledger_events_no_update", "UPDATE"), ("ledger_events_no_delete", "DELETE")):
                sql = " ".join((triggers.get(name) or "").split())
                if not sql:
                    findings.append(f"trigger {name} is missing: {verb} is not refused")
                elif f"BEFORE {verb} ON ledger_events" not in sql or "RAISE(ABORT" not in sql:
                    findings.append(f"trigger {name} was changed: {verb} may not be refused")
            return findings
        name = "ledger_events_append_only"
        trigger = next((r for r in rows if r.tgname == name), None)
        if trigger is None:
            return [f"trigger {name} is missing: UPDATE and DELETE are not refused"]
        # pg_trigger.tgtype bits: 1 row-level, 2 before, 8 delete, 16 update; tgenabled 'D' disabled, 'R' replica only.
        if trigger.tgenabled in ("D", "R"):
            return [f"trigger {name} is disabled: UPDATE and DELETE are not refused"]
        if trigger.tgtype & 27 != 27 or trigger.proname != name:
            return [f"trigger {name} was changed: UPDATE and DELETE may not be refused"]
        if "RAISE EXCEPTION 'ledger_events is append-only'" not in " ".join(trigger.prosrc.split()):
            return [f"function {name}() was replaced: it no longer refuses UPDATE and DELETE"]
        return []

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
        with self.db.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def _last(self, query: sa.Select) -> dict | None:
        with self.db.connect() as conn:
            row = conn.execute(query.order_by(events.c.id.desc()).limit(1)).first()
        return dict(row._mapping) if row else None

    def current_reference(self, key_class: str) -> dict | None:
        """The last ``reference_updated`` row: the version data must be under, and since when (``recorded_at``,
        timezone-aware UTC whatever the database)."""
        row = self._last(
            sa.select(events).where(events.c.key_class == key_class, events.c.event == REFERENCE_UPDATED)
        )
        return {**row, "recorded_at": as_utc(row["recorded_at"])} if row else None

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

    def partition_files(self, dataset: str, partition: str) -> set[str]:
        """Every data file name the ledger records the engine writing, adopting or replacing in a partition."""
        return self.partition_files_many(dataset, [partition])[partition]

    def partition_files_many(self, dataset: str, partitions: list[str]) -> dict[str, set[str]]:
        """:meth:`partition_files` of each of ``partitions``, in a few queries."""
        names: dict[str, set[str]] = {p: set() for p in partitions}
        wanted = list(names)
        with self.db.connect() as conn:
            for start in range(0, len(wanted), 500):  # within SQLite's and PostgreSQL's parameter limits
                query = sa.select(events.c.partition, events.c.detail).where(
                    events.c.dataset == dataset, events.c.partition.in_(wanted[start : start + 500]),
                    events.c.event.in_(PARTITION_FILE_EVENTS))
                for partition, detail in conn.execute(query):
                    recorded = json.loads(detail) if detail else {}
                    names[partition].update([*(recorded.get("files") or []), *(recorded.get("replaces") or [])])
        return names

    def last_partition_ids(self, dataset: str) -> dict[str, int]:
        """The id of the last row the ledger holds for each partition of ``dataset``, in one query: a row newer
        than one seen before means the engine changed, cleaned or validated the partition since."""
        with self.db.connect() as conn:
            return dict(conn.execute(sa.select(events.c.partition, sa.func.max(events.c.id)).where(
                events.c.dataset == dataset, events.c.partition.is_not(None)).group_by(events.c.partition)).all())

    def partition_evidence(self, dataset: str) -> dict[str, dict[str, dict | None]]:
        """Per partition of ``dataset``: its last successful change (``change``) and its last validation,
        passed or failed (``validation``), as ledger rows; the rows' ids order them."""
        out: dict[str, dict[str, dict | None]] = {}
        with self.db.connect() as conn:
            for name, kinds in (("change", PARTITION_CHANGES), ("validation", PARTITION_VALIDATIONS)):
                last = sa.select(sa.func.max(events.c.id)).where(
                    events.c.dataset == dataset, events.c.event.in_(kinds),
                    *([events.c.status == "ok"] if name == "change" else []),
                ).group_by(events.c.partition)
                for row in conn.execute(sa.select(events).where(events.c.id.in_(last))).mappings():
                    out.setdefault(row["partition"], {"change": None, "validation": None})[name] = dict(row)
        return out


# Exit codes of ``verify``.
INTACT, BROKEN, NOT_CHECKED, UNGUARDED = 0, 1, 2, 3
# With --checkpoints (or $KEYROTATION_LEDGER_CHECKPOINTS): the chain against its latest anchored head.
TAIL_CUT, REWRITTEN, CHECKPOINT_FORGED, NO_CHECKPOINT = 4, 5, 6, 7
_ANCHOR_CODES = {"cut": TAIL_CUT, "rewritten": REWRITTEN, "forged": CHECKPOINT_FORGED, "missing": NO_CHECKPOINT}
VERIFY_EXIT_CODES = f"""\
exit codes:
  {INTACT}  the hash chain is intact and the append-only triggers are in place
  {BROKEN}  the hash chain is broken: a row was edited or deleted (the first broken row is named)
  {NOT_CHECKED}  nothing was checked: no such ledger, cannot connect, permission denied, not a ledger,
     or an older format without the hash chain (also: a usage error)
  {UNGUARDED}  the hash chain is intact, but an append-only trigger is missing, disabled or changed,
     so UPDATE or DELETE is not refused; reported, never repaired
  with --checkpoints FILE (or $KEYROTATION_LEDGER_CHECKPOINTS), the chain is also checked against the
  latest checkpoint of its head, HMAC'd by the KMS (VAULT_ADDR, VAULT_TOKEN, $KEYROTATION_ANCHOR_KEY):
  {TAIL_CUT}  tail cut: the row the checkpoint anchors is gone and the ledger ends before it
  {REWRITTEN}  chain rewritten: that row's hash, or the number of rows up to it, differs from the checkpoint
  {CHECKPOINT_FORGED}  the latest checkpoint does not verify with the KMS: replaced or forged
  {NO_CHECKPOINT}  no checkpoint in the file: the head is anchored nowhere
  (the KMS not reachable for the HMAC check: {NOT_CHECKED})

verify only reads: it runs no DDL and writes nothing, so SELECT on ledger_events is enough, and a
SQLite file is opened read-only (also sqlite:///file:/path/ledger.db?mode=ro&uri=true).
"""


def verify_command(url: str | None, checkpoints: str | None = None) -> int:
    """``python -m keyrotation.ledger verify``: print the findings, return the exit code."""
    from keyrotation.anchoring import CHECKPOINTS_ENV, checkpoints_path, default_checkpoints_path

    anchor_file = checkpoints_path(checkpoints)
    if anchor_file is None and url is None and default_checkpoints_path().exists():
        anchor_file = default_checkpoints_path()  # the default ledger, and where the checkpoint DAG writes
    url = url or default_url(create=False)
    try:
        shown = _shown(sa.make_url(url), url)
    except sa.exc.ArgumentError as exc:
        print(f"ledger URL: {exc}; nothing verified")
        return NOT_CHECKED
    try:
        ledger = Ledger(url, read_only=True)
        result = ledger.verify()
        findings = ledger.append_only_findings()
    except KeyRotationError as exc:
        print(f"{exc}; nothing verified")
        return NOT_CHECKED
    except sa.exc.DBAPIError as exc:
        print(f"ledger {shown}: cannot read {events.name}: {_reason(exc)}; nothing verified")
        return NOT_CHECKED
    except Exception as exc:  # exit 1 must only ever mean a broken chain, never a crash
        print(f"ledger {shown}: {type(exc).__name__}: {exc}; nothing verified")
        return NOT_CHECKED
    if result.ok:
        print(f"ledger {shown}: {result.rows_checked} rows, chain intact")
    else:
        print(f"ledger {shown}: chain broken at row {result.first_broken_id}: {result.reason}")
    for finding in findings:
        print(f"ledger {shown}: append-only guard: {finding}")
    if not result.ok:
        return BROKEN
    if anchor_file is not None:
        code = _anchor_command(ledger, shown, anchor_file)
        if code != INTACT:
            return code
    else:
        print(f"ledger {shown}: head not checked against a checkpoint (no --checkpoints, "
              f"${CHECKPOINTS_ENV} unset): rows cut from the end would not be seen")
    return UNGUARDED if findings else INTACT


def _anchor_command(ledger: Ledger, shown: str, path: Path) -> int:
    from keyrotation.anchoring import TransitAnchor, check_anchor

    try:
        check = check_anchor(ledger, TransitAnchor.from_env(), path)
    except Exception as exc:  # the KMS, not the ledger, failed: nothing proven either way
        print(f"ledger {shown}: anchor not checked: {type(exc).__name__}: {exc}")
        return NOT_CHECKED
    print(f"ledger {shown}: {check.message}")
    return _ANCHOR_CODES.get(check.status, INTACT)


def checkpoint_command(url: str | None, checkpoints: str | None) -> int:
    """``python -m keyrotation.ledger checkpoint``: append a KMS-HMAC'd checkpoint of the chain's head."""
    from keyrotation.anchoring import (
        CHECKPOINTS_ENV,
        TransitAnchor,
        checkpoints_path,
        default_checkpoints_path,
        write_checkpoint,
    )

    path = checkpoints_path(checkpoints)
    if path is None and url is None:
        path = default_checkpoints_path()  # beside the default ledger, as the checkpoint DAG writes
    if path is None:
        print(f"no checkpoints file: give --checkpoints or set {CHECKPOINTS_ENV}")
        return NOT_CHECKED
    ledger = Ledger(url or default_url(create=False))
    if not ledger.verify().ok:  # never anchor a broken chain
        print("the hash chain is broken; no checkpoint written (run verify)")
        return BROKEN
    try:
        anchor = TransitAnchor.from_env()
        anchor.ensure_key()
        cp = write_checkpoint(ledger, anchor, path)
    except (KeyRotationError, OSError) as exc:
        print(f"no checkpoint written: {exc}")
        return NOT_CHECKED
    print(f"checkpoint of row {cp.last_id} ({cp.rows} rows) written to {path}, HMAC by {cp.key}")
    return INTACT


def main(argv: list[str] | None = None, prog: str = "python -m keyrotation.ledger") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Ledger maintenance.",
                                     epilog=f"verify's {VERIFY_EXIT_CODES}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify", help="check the ledger's hash chain and append-only triggers (read only; exit 1 if broken)",
        description="Walk the ledger's hash chain and report the first broken link; check that the "
                    "append-only triggers are in place.",
        epilog=VERIFY_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("--url", help="ledger database URL (default: $KEYROTATION_LEDGER_URL, else the SQLite file)")
    verify.add_argument("--checkpoints", help="checkpoints file to check the chain's head against (default: "
                                              "$KEYROTATION_LEDGER_CHECKPOINTS; for the default ledger, "
                                              "$KEYROTATION_HOME/ledger-checkpoints.jsonl if it exists; else "
                                              "not checked)")
    checkpoint = commands.add_parser(
        "checkpoint", help="append a checkpoint of the chain's head, HMAC'd by the KMS, to a file outside the ledger",
        description="Verify the ledger against its latest checkpoint, then append a checkpoint of the chain's head "
                    "(last row, number of rows, its hash), HMAC'd by the Transit key $KEYROTATION_ANCHOR_KEY, to "
                    "the checkpoints file.")
    checkpoint.add_argument("--url", help="ledger database URL")
    checkpoint.add_argument("--checkpoints", help="checkpoints file (default: $KEYROTATION_LEDGER_CHECKPOINTS; "
                                                  "for the default ledger, $KEYROTATION_HOME/ledger-checkpoints.jsonl)")
    args = parser.parse_args(argv)
    if args.command == "checkpoint":
        return checkpoint_command(args.url, args.checkpoints)
    return verify_command(args.url, args.checkpoints)


if __name__ == "__main__":
    sys.exit(main())
