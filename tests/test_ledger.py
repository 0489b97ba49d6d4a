"""The ledger is append-only in the database itself, on SQLite and on the local PostgreSQL."""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from keyrotation import ledger as lg
from keyrotation.errors import KeyRotationError
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

# The last line of a verify given no checkpoints file.
UNANCHORED = ("head not checked against a checkpoint (no --checkpoints, $KEYROTATION_LEDGER_CHECKPOINTS unset): rows "
              "cut from the end would not be seen")


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
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), ledger.db.begin() as conn:
        conn.execute(lg.events.update().values(to_version=3))
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), ledger.db.begin() as conn:
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
    with ledger.db.begin() as conn:
        conn.exec_driver_sql(DROP_GUARD[ledger.db.dialect.name][kind])
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


def test_record_many_chains_like_one_record_after_another(ledger):
    ctx = RunContext(task_id="t", actor="test")
    ledger.record(lg.PARTITION_WRITTEN, "kc", ctx, dataset="d", partition="p0", to_version=1)
    rows = [Ledger.row(lg.PARTITION_REWRAPPED, "kc", ctx, dataset="d", partition=f"p{i}", from_version=1,
                       to_version=2, rows=10 * i, digest=f"{i:064x}", duration_s=0.5, detail={"mode": "rewrap"})
            for i in range(3)]
    rows.append(Ledger.row(lg.PARTITION_FAILED, "kc", ctx, status="failed", dataset="d", partition="p3",
                           detail={"error": "x"}))
    ledger.record_many(rows)
    ledger.record_many([])
    ledger.record(lg.PARTITION_VALIDATED, "kc", ctx, dataset="d", partition="p0")
    stored = ledger.rows()
    assert [(r["event"], r["partition"], r["status"]) for r in stored] == [
        (lg.PARTITION_WRITTEN, "p0", "ok"), *((lg.PARTITION_REWRAPPED, f"p{i}", "ok") for i in range(3)),
        (lg.PARTITION_FAILED, "p3", "failed"), (lg.PARTITION_VALIDATED, "p0", "ok")]
    assert stored[2]["rows"] == 10 and stored[2]["detail"] == '{"mode": "rewrap"}'
    assert all(b["prev_hash"] == a["row_hash"] for a, b in zip(stored, stored[1:], strict=False))
    assert ledger.verify() == lg.VerifyResult(ok=True, rows_checked=6)
    assert Ledger(ledger.url).verify().ok
    with pytest.raises(TypeError, match="no column"):
        Ledger.row(lg.PARTITION_FAILED, "kc", ctx, partitoin="p3")


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
    assert intact.stdout.splitlines() == [f"ledger {ledger.url}: 6 rows, chain intact",
                                          f"ledger {ledger.url}: {UNANCHORED}"]
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
        own.db.dispose()

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, range(4)))
    ledger = Ledger(url)
    assert ledger.verify() == lg.VerifyResult(ok=True, rows_checked=100)
    ledger.db.dispose()


# -- verify only reads ------------------------------------------------------------------------------

def _triggers(ledger: Ledger) -> list[str]:
    """The triggers on ledger_events, from the catalog, as an administrator sees them."""
    query = {
        "sqlite": "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'ledger_events'",
        "postgresql": "SELECT tgname FROM pg_trigger WHERE tgrelid = 'ledger_events'::regclass AND NOT tgisinternal",
    }[ledger.db.dialect.name]
    with ledger.db.connect() as conn:
        return sorted(conn.exec_driver_sql(query).scalars())


@pytest.fixture
def pg_role(postgres_url):
    """Make a login role on the test database with CONNECT and the given grants only; dropped afterwards."""
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    database = sa.make_url(postgres_url).database
    made: list[str] = []

    def make(*grants: str) -> str:
        role = f"kr_reader_{secrets.token_hex(4)}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
            made.append(role)
            conn.exec_driver_sql(f"REVOKE ALL ON DATABASE {database} FROM PUBLIC")
            conn.exec_driver_sql("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            conn.exec_driver_sql(f"GRANT CONNECT ON DATABASE {database} TO {role}")
            for grant in grants:
                conn.exec_driver_sql(grant.format(role=role))
        return f"postgresql+psycopg2://{role}@127.0.0.1:5432/{database}"

    yield make
    with admin.connect() as conn:
        for role in made:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
    admin.dispose()


def test_verify_under_a_select_only_role_runs_no_ddl(postgres_url, pg_role):
    ledger = Ledger(postgres_url)
    ids = _record_some(ledger)
    reader = pg_role("GRANT SELECT ON ledger_events TO {role}")

    intact = _cli(reader)
    assert (intact.returncode, intact.stdout, intact.stderr) == (
        0, f"ledger {reader}: 6 rows, chain intact\nledger {reader}: {UNANCHORED}\n", "")

    with ledger.db.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE ledger_events DISABLE TRIGGER ledger_events_append_only")
    disabled = _cli(reader)
    assert (disabled.returncode, disabled.stdout.splitlines()) == (3, [
        f"ledger {reader}: 6 rows, chain intact",
        f"ledger {reader}: append-only guard: trigger ledger_events_append_only is disabled: UPDATE and DELETE are "
        "not refused", f"ledger {reader}: {UNANCHORED}"])

    # Dropped with its function: neither the reader nor the database's owner running verify brings either back.
    with ledger.db.begin() as conn:
        conn.exec_driver_sql("DROP FUNCTION ledger_events_append_only() CASCADE")
    for url in (reader, postgres_url):
        missing = _cli(url)
        assert (missing.returncode, missing.stdout.splitlines(), missing.stderr) == (3, [
            f"ledger {url}: 6 rows, chain intact",
            f"ledger {url}: append-only guard: trigger ledger_events_append_only is missing: UPDATE and DELETE are "
            "not refused", f"ledger {url}: {UNANCHORED}"], "")
    assert _triggers(ledger) == []
    with ledger.db.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM pg_proc WHERE proname = 'ledger_events_append_only'"
                                    ).scalar() == 0

    with ledger.db.begin() as conn:  # nothing refuses an edit now
        conn.execute(lg.events.update().where(lg.events.c.id == ids[1]).values(rows=999))
    broken = _cli(reader)
    assert (broken.returncode, broken.stdout.splitlines()) == (1, [
        f"ledger {reader}: chain broken at row {ids[1]}: row_hash does not match its content",
        f"ledger {reader}: append-only guard: trigger ledger_events_append_only is missing: UPDATE and DELETE are "
        "not refused"])


def test_verify_does_not_recreate_a_dropped_trigger(ledger):
    _record_some(ledger)
    guarded = _triggers(ledger)
    assert guarded in (["ledger_events_no_delete", "ledger_events_no_update"], ["ledger_events_append_only"])
    with ledger.db.begin() as conn:
        conn.exec_driver_sql(DROP_GUARD[ledger.db.dialect.name]["delete"])
    finding = {"sqlite": "trigger ledger_events_no_delete is missing: DELETE is not refused",
               "postgresql": "trigger ledger_events_append_only is missing: UPDATE and DELETE are not refused"}
    for _ in range(2):
        result = _cli(ledger.url)
        assert (result.returncode, result.stdout.splitlines()) == (3, [
            f"ledger {ledger.url}: 6 rows, chain intact",
            f"ledger {ledger.url}: append-only guard: {finding[ledger.db.dialect.name]}",
            f"ledger {ledger.url}: {UNANCHORED}"])
    assert _triggers(ledger) == {"sqlite": ["ledger_events_no_update"], "postgresql": []}[ledger.db.dialect.name]
    reader = Ledger(ledger.url, read_only=True)
    assert reader.verify() == lg.VerifyResult(ok=True, rows_checked=6)
    with pytest.raises(KeyRotationError, match=r"was opened read-only: nothing can be recorded"):
        reader.record(lg.KEY_CREATED, "pii")
    assert len(ledger.rows()) == 6


def test_verify_reads_a_read_only_sqlite_file(tmp_path):
    source = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ids = _record_some(source)
    source.db.dispose()
    copies = tmp_path / "copies"
    copies.mkdir()

    def read_only_copy(name: str, *statements: str) -> Path:
        path = copies / name
        shutil.copyfile(tmp_path / "ledger.db", path)
        with sqlite3.connect(path) as conn:
            for statement in statements:
                conn.execute(statement)
        path.chmod(0o444)
        return path

    intact = read_only_copy("intact.db")
    unguarded = read_only_copy("unguarded.db", "DROP TRIGGER ledger_events_no_update")
    edited = read_only_copy("edited.db", "DROP TRIGGER ledger_events_no_update",
                            f"UPDATE ledger_events SET digest = 'sha256:forged' WHERE id = {ids[3]}")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in copies.iterdir()}
    # Root writes to a 0444 file regardless: only SQLite's read-only mode keeps verify from writing.
    for path, code, last in ((intact, 0, "6 rows, chain intact"),
                             (unguarded, 3, "append-only guard: trigger ledger_events_no_update is missing: UPDATE is "
                                            "not refused"),
                             (edited, 1, "append-only guard: trigger ledger_events_no_update is missing: UPDATE is "
                                         "not refused")):
        for url in (f"sqlite:///{path}", f"sqlite:///file:{path}?mode=ro&uri=true"):
            result = _cli(url)
            lines = [line for line in result.stdout.splitlines() if not line.endswith(UNANCHORED)]
            assert (result.returncode, lines[-1], result.stderr) == (code, f"ledger {url}: {last}", "")
    assert f"chain broken at row {ids[3]}: row_hash does not match its content" in _cli(f"sqlite:///{edited}").stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in copies.iterdir()} == before  # no journal either


@pytest.mark.parametrize("case", ["no_file", "no_table_sqlite", "no_table_postgresql", "no_hash_chain",
                                  "other_table", "cannot_connect", "permission_denied"])
def test_verify_could_not_check_is_exit_2_with_one_line(case, request, tmp_path):
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    if case == "no_file":
        expected = "no such file"
    elif case == "no_table_sqlite":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE accounts (id INTEGER)")
        expected = "not a ledger (no table ledger_events)"
    elif case == "no_table_postgresql":
        url = request.getfixturevalue("postgres_url")
        expected = "not a ledger (no table ledger_events)"
    elif case == "no_hash_chain":  # the format before the hash chain: every column but the two hashes
        old = sa.MetaData()
        sa.Table("ledger_events", old,
                 *(sa.Column(c.name, c.type) for c in lg.events.columns if c.name not in ("prev_hash", "row_hash")))
        engine = sa.create_engine(url)
        old.create_all(engine)
        engine.dispose()
        expected = "an older format, before the hash chain (no prev_hash or row_hash column)"
    elif case == "other_table":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE ledger_events (id INTEGER, event TEXT, row_hash TEXT)")
        expected = ("not a ledger (table ledger_events has no column recorded_at, status, key_class, dataset, "
                    "partition, from_version, to_version, rows, bytes, digest, duration_s, detail, dag_id, run_id, "
                    "task_id, try_number, actor, prev_hash)")
    elif case == "cannot_connect":
        url = "postgresql+psycopg2://postgres@127.0.0.1:1/test"
        expected = 'cannot connect: connection to server at "127.0.0.1", port 1 failed: Connection refused'
    else:
        admin = request.getfixturevalue("postgres_url")
        Ledger(admin).db.dispose()
        url = request.getfixturevalue("pg_role")()  # CONNECT only
        expected = "cannot read ledger_events: permission denied for table ledger_events"
    before = sorted(tmp_path.iterdir())
    result = _cli(url)
    assert (result.returncode, result.stdout, result.stderr) == (2, f"ledger {url}: {expected}; nothing verified\n",
                                                                 "")
    assert sorted(tmp_path.iterdir()) == before  # no SQLite file was created, nor a table in one


def test_verify_help_documents_the_exit_codes():
    result = subprocess.run([sys.executable, "-m", "keyrotation.ledger", "verify", "--help"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(INCLUDE)})
    assert result.returncode == 0
    assert lg.VERIFY_EXIT_CODES in result.stdout
    assert [line.split()[0] for line in lg.VERIFY_EXIT_CODES.splitlines()[1:] if line[:3].strip().isdigit()] == [
        "0", "1", "2", "3", "4", "5", "6", "7"]


def test_hold_many_leaves_out_a_partition_another_run_takes_between_its_read_and_its_insert(postgres_url):
    """Two runs race for a chunk's leases: the one whose group insert collides takes the rest one by one and
    leaves out only the partition the other took (its chunk goes on; that partition is waited for later)."""
    from datetime import UTC, datetime, timedelta

    from keyrotation.locks import PartitionLeases, leases

    ledger = Ledger(postgres_url)
    locks = PartitionLeases(ledger)
    other = sa.create_engine(postgres_url)
    raced: list[str] = []

    @sa.event.listens_for(ledger.db, "before_cursor_execute")
    def _other_run_inserts_first(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if not raced and statement.startswith("INSERT INTO partition_leases"):
            raced.append(statement)
            with other.begin() as c:
                c.execute(leases.insert().values(dataset="d", partition="p2", owner="elsewhere:1:x",
                                                 expires_at=datetime.now(UTC) + timedelta(hours=1)))

    with locks.hold_many("d", ["p1", "p2", "p3"]) as taken:
        assert taken == ["p1", "p3"]
        with other.connect() as c:
            owners = dict(c.execute(sa.select(leases.c.partition, leases.c.owner)).all())
        assert owners["p2"] == "elsewhere:1:x" and owners["p1"] == owners["p3"] != "elsewhere:1:x"
    assert raced
    with other.connect() as c:
        assert c.execute(sa.select(leases.c.partition, leases.c.owner)).all() == [("p2", "elsewhere:1:x")]
    other.dispose()
