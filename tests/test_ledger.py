"""The ledger is append-only in the database itself, on SQLite and on the local PostgreSQL."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from keyrotation import ledger as lg
from keyrotation.ledger import Ledger, RunContext

PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
INCLUDE = Path(__file__).resolve().parents[1] / "include"
# Raw SQL a DBA could run to get around the append-only guard.
DROP_GUARD = {
    "sqlite": {"update": "DROP TRIGGER ledger_events_no_update", "delete": "DROP TRIGGER ledger_events_no_delete"},
    "postgresql": dict.fromkeys(("update", "delete"), "DROP TRIGGER ledger_events_append_only ON ledger_events"),
}


@pytest.fixture
def postgres_url():
    """A fresh database on the machine's PostgreSQL (started by .ci/run if it was down)."""
    name = f"keyrotation_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is not reachable ({exc.orig}); start it with "
                    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start")
    yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path):
    if request.param == "sqlite":
        return Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    return Ledger(request.getfixturevalue("postgres_url"))


def test_records_and_queries(ledger):
    ctx = RunContext(dag_id="rotate__pii", run_id="manual__1", task_id="rotate_key", try_number=1, actor="ana")
    ledger.record(lg.KEY_CREATED, "pii", ctx, to_version=1)
    ledger.record(lg.REFERENCE_UPDATED, "pii", ctx, to_version=1)
    ledger.record(lg.REFERENCE_UPDATED, "pii", ctx, from_version=1, to_version=2)
    ledger.record(lg.PARTITION_WRITTEN, "pii", ctx, dataset="ds", partition="2024-01-01", to_version=1,
                  digest="sha256:a", rows=3)
    ledger.record(lg.PARTITION_FAILED, "pii", ctx, status="failed", dataset="ds", partition="2024-01-01")
    ledger.record(lg.PARTITION_REWRAPPED, "pii", ctx, dataset="ds", partition="2024-01-01", from_version=1,
                  to_version=2, digest="sha256:a", rows=3, detail={"mode": "rewrap"})
    assert ledger.current_version("pii") == 2
    assert ledger.current_version("other") is None
    last = ledger.partition_record("ds", "2024-01-01")
    assert (last["event"], last["to_version"], last["actor"]) == (lg.PARTITION_REWRAPPED, 2, "ana")
    assert [r["event"] for r in ledger.rows(key_class="pii")][:2] == [lg.KEY_CREATED, lg.REFERENCE_UPDATED]


def test_rows_cannot_be_updated_or_deleted(ledger):
    ledger.record(lg.VERSION_CREATED, "pii", to_version=2)
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), ledger.engine.begin() as conn:
        conn.execute(lg.events.update().values(to_version=3))
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), ledger.engine.begin() as conn:
        conn.execute(lg.events.delete())
    assert [r["to_version"] for r in ledger.rows()] == [2]
    Ledger(ledger.url)  # re-opening keeps the guard and the rows
    assert len(ledger.rows()) == 1


def _record_some(ledger: Ledger, n: int = 5) -> list[int]:
    ctx = RunContext(dag_id="rotate__pii", run_id="manual__1", task_id="rewrap", try_number=1, actor="ana")
    for i in range(n):
        ledger.record(lg.PARTITION_REWRAPPED, "pii", ctx, dataset="ds", partition=f"2024-01-0{i + 1}",
                      from_version=1, to_version=2, rows=10 * i, bytes=1024, digest=f"sha256:{i}",
                      duration_s=round(0.1 + i, 4), detail={"mode": "rewrap", "n": i})
    ledger.record(lg.REFERENCE_UPDATED, "pii", from_version=1, to_version=2, duration_s=0)  # int duration
    return [r["id"] for r in ledger.rows()]


def _tamper(ledger: Ledger, kind: str, statement: sa.Executable) -> None:
    with ledger.engine.begin() as conn:
        conn.exec_driver_sql(DROP_GUARD[ledger.engine.dialect.name][kind])
        conn.execute(statement)


def _cli(url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(INCLUDE), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "keyrotation.ledger", "verify", "--url", url], env=env,
                          capture_output=True, text=True, timeout=60)


def test_chain_verifies(ledger):
    assert ledger.verify() == lg.VerifyResult(ok=True, rows_checked=0)
    ids = _record_some(ledger)
    rows = ledger.rows()
    assert rows[0]["prev_hash"] == lg.GENESIS_HASH
    assert all(b["prev_hash"] == a["row_hash"] for a, b in zip(rows, rows[1:], strict=False))
    assert ledger.verify() == lg.VerifyResult(ok=True, rows_checked=len(ids))
    assert Ledger(ledger.url).verify().ok  # a fresh engine reads back the same values


def test_verify_finds_an_edited_row(ledger):
    ids = _record_some(ledger)
    _tamper(ledger, "update", lg.events.update().where(lg.events.c.id == ids[2]).values(to_version=1))
    result = ledger.verify()
    assert (result.ok, result.first_broken_id, result.reason) == (False, ids[2], "row_hash does not match its content")


def test_verify_finds_a_deleted_row(ledger):
    ids = _record_some(ledger)
    _tamper(ledger, "delete", lg.events.delete().where(lg.events.c.id == ids[2]))
    result = ledger.verify()
    assert (result.ok, result.first_broken_id) == (False, ids[3])
    assert result.reason.startswith("prev_hash does not match")


def test_verify_command(ledger):
    _record_some(ledger)
    intact = _cli(ledger.url)
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.strip().endswith("6 rows, chain intact")
    ids = [r["id"] for r in ledger.rows()]
    _tamper(ledger, "update", lg.events.update().where(lg.events.c.id == ids[4]).values(digest="sha256:forged"))
    broken = _cli(ledger.url)
    assert broken.returncode == 1, broken.stderr
    assert f"chain broken at row {ids[4]}: row_hash does not match its content" in broken.stdout
    assert "forged" not in broken.stdout


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_writers_keep_one_chain(backend, request, tmp_path):
    # Nothing is created beforehand: the writers also race to create the ledger.
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")

    def write(worker: int) -> None:
        own = Ledger(url)  # its own engine, as a separate worker process would have
        for i in range(25):
            own.record(lg.PARTITION_WRITTEN, "pii", dataset="ds", partition=f"w{worker}-{i}", to_version=1)
        own.engine.dispose()

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, range(4)))
    ledger = Ledger(url)
    assert ledger.verify() == lg.VerifyResult(ok=True, rows_checked=100)
    ledger.engine.dispose()
