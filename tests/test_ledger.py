"""The ledger is append-only in the database itself, on SQLite and on the local PostgreSQL."""

from __future__ import annotations

import secrets

import pytest
import sqlalchemy as sa

from keyrotation import ledger as lg
from keyrotation.ledger import Ledger, RunContext

PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


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
