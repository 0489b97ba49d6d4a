"""Encrypted columns of a real PostgreSQL table (127.0.0.1:5432, database test): field-level envelopes
under per-partition data keys, KEK rotation by re-wrapping the data-key rows only, full re-encryption
in batches with compare-and-set, concurrent writers, crashes, and values that must not decrypt."""

from __future__ import annotations

import random
import re
import secrets
import threading
import time

import pandas as pd
import pytest
import sqlalchemy as sa
from oracle import TransitKms, sql_plaintexts

from helpers import CANARY, PG_URL, runtime
from keyrotation import ledger as lg
from keyrotation.client import KeyRotationClient
from keyrotation.errors import PartitionError
from keyrotation.formats.envelope import key_id_offset
from keyrotation.ledger import RunContext
from keyrotation.retirement import retire
from keyrotation.rotation import update_reference
from keyrotation.stores.data_keys import DATA_KEYS

SQL_DATASET = """    format: sql_table
    table: {table}
    partition_column: day
    batch_size: {batch}
    encrypted_columns: [{columns}]
"""



def sql_key_class(make_key_class, pg, name: str, columns: str = "email, ssn", batch: int = 500, extra: str = ""):
    engine, tables = pg
    table = f"{name}_{secrets.token_hex(3)}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {table} (id bigint PRIMARY KEY, day date NOT NULL, "
                             + ", ".join(f"{c.strip()} bytea" for c in columns.split(",")) + ")"))
    tables.append(table)
    return make_key_class(name=name, dataset=f"{name}_rows", location=PG_URL, **{
        "    encrypted_columns: [email, ssn]\n": SQL_DATASET.format(table=table, batch=batch, columns=columns) + extra})


def frame(day: str, start: int, rows: int, columns: tuple[str, ...] = ("email", "ssn")) -> pd.DataFrame:
    data = {"id": range(start, start + rows), "day": [day] * rows}
    for column in columns:
        data[column] = [f"{CANARY}-{column}-{i}" for i in range(start, start + rows)]
    return pd.DataFrame(data)


def seed(rt, dataset: str, days: list[str], rows: int, columns=("email", "ssn")) -> int:
    state = rt.backend.key_state() if rt.backend.key_state().exists else rt.backend.create_key()
    update_reference(rt.name, state.latest_version, rt.ledger, RunContext(actor="test"))
    engine = rt.engine(dataset)
    for i, day in enumerate(days):
        engine.write_partition(day, frame(day, i * rows, rows, columns), state.latest_version)
    return state.latest_version


def plaintexts(rt, dataset: str) -> dict:
    """Every row's decrypted values, read by the independent oracle (the envelope from its documented layout,
    the data keys unwrapped by Transit over HTTP), not by the product's reader."""
    ds = rt.config.dataset(dataset)
    kms = TransitKms(rt.backend.client.url, rt.backend.client.token, rt.backend.mount_point)
    return sql_plaintexts(PG_URL, ds.table, list(ds.encrypted_columns), kms, rt.backend.key_ref,
                          ds.primary_key or "id")


def fingerprint(pg, table: str) -> str:
    """Changes whenever any row of the table is written (xmin is the writing transaction)."""
    engine, _ = pg
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT md5(string_agg(xmin::text, ',' ORDER BY id)) FROM {table}")).scalar()


def days(n: int) -> list[str]:
    return [f"2024-01-{d:02d}" for d in range(1, n + 1)]


def test_rewrap_touches_only_data_keys_reencrypt_rewrites_every_value(make_key_class, vault, pg):
    """100,020 rows in 30 partitions, in batches of 2,000 (each partition spans two). How the time grows
    with rows (a million and more) is measured by `make bench` (bench/sql_table.py), not here."""
    config = sql_key_class(make_key_class, pg, "sqlbig", columns="email", batch=2_000)
    rt = runtime(config, vault)
    table, dataset = config.datasets[0].table, "sqlbig_rows"
    parts = days(30)
    seed(rt, dataset, parts, rows=3_334, columns=("email",))
    engine = rt.engine(dataset)
    assert rt.census(dataset).by_version() == {1: 30}
    assert sum(p.rows for p in rt.census(dataset).partitions.values()) == 100_020
    digests = {p: engine.validate(p).digest for p in parts}

    v2 = rt.backend.rotate()
    before = fingerprint(pg, table)
    results = engine.run(parts, lambda p: engine.process(p, v2, "rewrap"))
    assert {r.action for r in results} == {"rewrapped"}
    assert fingerprint(pg, table) == before  # not one row of the table was written
    assert rt.census(dataset).by_version() == {v2: 30}
    rewrapped = rt.ledger.rows(events_in=(lg.PARTITION_REWRAPPED,))
    assert sum(__import__("json").loads(r["detail"])["data_keys"] for r in rewrapped) == 30

    v3 = rt.backend.rotate()
    update_reference(rt.name, v3, rt.ledger, RunContext(actor="test"))
    results = engine.run(parts, lambda p: engine.process(p, v3, "reencrypt"))
    assert {r.action for r in results} == {"reencrypted"}
    with pg[0].connect() as conn:
        old_keys = conn.execute(sa.text(f"SELECT count(*) FROM {table} t JOIN {DATA_KEYS} k ON k.key_id = "
                                        f"substring(t.email FROM :off FOR 16) WHERE k.created_under < :v"),
                                {"off": key_id_offset(rt.name), "v": v3}).scalar()
    assert old_keys == 0  # every value rewritten under a data key made under v3
    assert rt.census(dataset).by_version() == {v3: 30}
    assert {p: engine.validate(p, min_version=v3).digest for p in parts} == digests  # plaintext identical

    plan = rt.retirement_plan()
    state = retire(rt.backend, rt.config.key_class, plan, rt.censuses(), rt.ledger, RunContext(actor="test"))
    assert state.min_decryption_version == v3
    assert engine.validate(parts[0], min_version=v3).action == "validated"


def test_concurrent_writers_lose_no_update(make_key_class, vault, pg):
    config = sql_key_class(make_key_class, pg, "sqlbusy", batch=50)
    rt = runtime(config, vault)
    table, dataset = config.datasets[0].table, "sqlbusy_rows"
    seed(rt, dataset, ["2024-02-01"], rows=2_000)
    v1 = 1
    v2 = rt.backend.rotate()
    engine = rt.engine(dataset)
    # An application that has not noticed the rotation yet keeps writing under v1 while the sweep runs.
    app = KeyRotationClient(rt.backend, rt.ledger, rt.name, db=rt.sql_db(config.datasets[0]),
                            poll_interval_s=3600)  # the ledger's reference: still v1
    assert app.current_version == v1
    expected: dict[int, str] = {}
    stop = threading.Event()
    writer_errors: list[BaseException] = []  # the application's single-row updates may only wait for a row lock

    def writer() -> None:
        rng = random.Random(3)
        db = sa.create_engine(PG_URL)
        n = 0
        try:
            while not stop.is_set():
                pk = rng.randrange(2_000)
                value = f"{CANARY}-updated-{n}"
                blob = app.encrypt(value, {"table": table, "column": "email", "pk": pk, "partition": "2024-02-01"})
                with db.begin() as conn:
                    conn.execute(sa.text(f"UPDATE {table} SET email = :v WHERE id = :pk"), {"v": blob, "pk": pk})
                expected[pk] = value
                n += 1
        except BaseException as exc:  # recorded, and asserted absent below
            writer_errors.append(exc)
        finally:
            db.dispose()

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.3)
    # The sweep either finishes, or (rows updated under v1 behind it, or still changing after its retries) refuses
    # to call the partition done, with exactly this error; anything else fails the test.
    try:
        first = engine.process("2024-02-01", v2, "reencrypt")
    except PartitionError as exc:
        first = exc
    finally:
        stop.set()
        thread.join()
    assert writer_errors == []
    if isinstance(first, PartitionError):
        assert re.fullmatch(r"partition 2024-02-01: ([1-9]\d* rows kept changing under concurrent writes(; |$))?"
                            r"(rows under v1 were written after this pass read them \(an application still "
                            r"encrypting with an older version\); )?left for the next pass \(every row still "
                            r"decrypts\)", str(first)), str(first)
        assert "kept changing" in str(first) or "were written after" in str(first)
    else:
        assert (first.partition, first.action, first.to_version) == ("2024-02-01", "reencrypted", v2)
    assert len(expected) > 20
    # The next pass brings every row written under v1 meanwhile under v2.
    second = engine.process("2024-02-01", v2, "reencrypt")
    assert second.action in ("reencrypted", "up_to_date", "reconciled"), first
    values = plaintexts(rt, dataset)
    assert len(values) == 2_000
    for pk, value in expected.items():
        assert values[pk][0] == value.encode()
    untouched = [pk for pk in range(2_000) if pk not in expected]
    assert all(values[pk][0] == f"{CANARY}-email-{pk}".encode() for pk in untouched)
    assert rt.census(dataset).by_version() == {v2: 1}


def test_a_crash_mid_partition_then_a_rerun_loses_nothing(make_key_class, vault, pg, monkeypatch):
    from keyrotation.stores.sql_table import SqlTableStore

    config = sql_key_class(make_key_class, pg, "sqlcrash", batch=100)
    rt = runtime(config, vault)
    dataset = "sqlcrash_rows"
    seed(rt, dataset, ["2024-03-01", "2024-03-02"], rows=1_000)
    before = plaintexts(rt, dataset)
    v2 = rt.backend.rotate()
    real = SqlTableStore.compare_and_set
    calls = {"n": 0}

    def crash_after_three_batches(self, updates):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("injected: connection lost mid-batch")
        return real(self, updates)

    monkeypatch.setattr(SqlTableStore, "compare_and_set", crash_after_three_batches)
    engine = rt.engine(dataset)
    results = engine.run(["2024-03-01", "2024-03-02"], lambda p: engine.process(p, v2, "reencrypt"))
    assert [r.action for r in results] == ["failed", "reencrypted"]
    assert "injected" in results[0].error
    assert plaintexts(rt, dataset) == before  # half-done: both versions' rows decrypt
    monkeypatch.setattr(SqlTableStore, "compare_and_set", real)
    again = engine.run(["2024-03-01", "2024-03-02"], lambda p: engine.process(p, v2, "reencrypt"))
    assert [r.action for r in again] == ["reencrypted", "up_to_date"]
    assert plaintexts(rt, dataset) == before
    assert rt.census(dataset).by_version() == {v2: 2}


def test_tampered_moved_and_unknown_values_are_named_and_left_alone(make_key_class, vault, pg):
    import uuid

    from keyrotation.formats.envelope import EnvelopeError

    config = sql_key_class(make_key_class, pg, "sqlbad", batch=100)
    rt = runtime(config, vault)
    table, dataset = config.datasets[0].table, "sqlbad_rows"
    seed(rt, dataset, ["2024-04-01", "2024-04-02", "2024-04-03", "2024-04-04"], rows=100)
    engine_db = pg[0]
    with engine_db.begin() as conn:
        email = bytes(conn.execute(sa.text(f"SELECT email FROM {table} WHERE id = 5")).scalar())
        tampered = email[:-1] + bytes([email[-1] ^ 1])
        conn.execute(sa.text(f"UPDATE {table} SET email = :v WHERE id = 5"), {"v": tampered})
        moved = conn.execute(sa.text(f"SELECT ssn FROM {table} WHERE id = 101")).scalar()
        conn.execute(sa.text(f"UPDATE {table} SET ssn = :v WHERE id = 102"), {"v": moved})
        unknown = bytearray(conn.execute(sa.text(f"SELECT email FROM {table} WHERE id = 250")).scalar())
        offset = 5 + len(rt.name)
        unknown[offset:offset + 16] = uuid.uuid4().bytes
        conn.execute(sa.text(f"UPDATE {table} SET email = :v WHERE id = 250"), {"v": bytes(unknown)})
        snapshot = {pk: conn.execute(sa.text(f"SELECT email, ssn FROM {table} WHERE id = :pk"), {"pk": pk}).one()
                    for pk in (5, 102, 250)}
    census = rt.census(dataset)
    assert "1 values in" in census.errors["2024-04-03"] and "unknown key version" in census.errors["2024-04-03"]
    v2 = rt.backend.rotate()
    engine = rt.engine(dataset)
    parts = ["2024-04-01", "2024-04-02", "2024-04-03", "2024-04-04"]
    results = {r.partition: r for r in engine.run(parts, lambda p: engine.process(p, v2, "reencrypt"))}
    assert f"{table}.email row id=5: does not decrypt: the value was altered" in results["2024-04-01"].error
    assert f"{table}.ssn row id=102: does not decrypt" in results["2024-04-02"].error
    assert "unknown key version" in results["2024-04-03"].error
    assert results["2024-04-04"].action == "reencrypted"
    assert "99 other rows re-encrypted" in results["2024-04-01"].error
    with engine_db.connect() as conn:
        for pk, (email_now, ssn_now) in snapshot.items():
            row = conn.execute(sa.text(f"SELECT email, ssn FROM {table} WHERE id = :pk"), {"pk": pk}).one()
            assert (bytes(row.email), bytes(row.ssn)) == (bytes(email_now), bytes(ssn_now))
    with pytest.raises(EnvelopeError, match=f"{table}.email row 5: does not decrypt"):
        KeyRotationClient(rt.backend, rt.ledger, rt.name, db=engine_db).decrypt(
            tampered, {"table": table, "column": "email", "pk": 5})
    assert CANARY not in " ".join(r.error or "" for r in results.values())


def seeded(make_key_class, vault, pg, name: str, parts: list[str], rows: int):
    """A key class ``name`` whose table holds ``rows`` rows in each of ``parts`` under v1: (runtime, table,
    dataset, engine)."""
    config = sql_key_class(make_key_class, pg, name, batch=100)
    rt = runtime(config, vault)
    dataset = f"{name}_rows"
    seed(rt, dataset, parts, rows=rows)
    return rt, config.datasets[0].table, dataset, rt.engine(dataset)


def _unknown_key(conn, table: str, key_class: str, pk: int) -> None:
    """Give row ``pk``'s email a data key id that is in no data-key table."""
    import uuid

    value = bytearray(conn.execute(sa.text(f"SELECT email FROM {table} WHERE id = :pk"), {"pk": pk}).scalar())
    offset = key_id_offset(key_class) - 1
    value[offset:offset + 16] = uuid.uuid4().bytes
    conn.execute(sa.text(f"UPDATE {table} SET email = :v WHERE id = :pk"), {"v": bytes(value), "pk": pk})


def test_rewrap_reads_only_data_keys_and_the_gate_still_blocks_an_unknown_key(make_key_class, vault, pg):
    """The rewrap reads the data-key table only (O(data keys)); the proof that no value is under a data key
    outside it comes from the census (the key-id index: the planner answers it with one probe per data key)
    and from validation (every value decrypted), so a value under an unknown key still refuses retirement."""
    from keyrotation.errors import RetirementRefused

    parts = ["2024-06-01", "2024-06-02"]
    rt, table, dataset, engine = seeded(make_key_class, vault, pg, "sqlidx", parts, 150)
    assert rt.census(dataset).by_version() == {1: 2}
    assert engine.store.ensure_key_id_indexes(rt.name, create=False) is None  # the census made them
    with pg[0].connect() as conn:
        for column in ("email", "ssn"):
            plan = "\n".join(r[0] for r in conn.execute(
                sa.text("EXPLAIN " + engine.store.key_ids_sql(column, rt.name)), {"partition": parts[0]}))
            assert engine.store.key_id_index(column, rt.name) in plan and "Seq Scan" not in plan, plan
    with pg[0].begin() as conn:
        _unknown_key(conn, table, rt.name, 170)

    v2 = rt.backend.rotate()
    update_reference(rt.name, v2, rt.ledger, RunContext(actor="test"))
    before = fingerprint(pg, table)
    results = engine.run(parts, lambda p: engine.process(p, v2, "rewrap"))
    assert [r.action for r in results] == ["rewrapped", "rewrapped"]  # the data keys only: right either way
    assert fingerprint(pg, table) == before
    census = rt.census(dataset)
    assert "1 values in" in census.errors[parts[1]] and "unknown key version" in census.errors[parts[1]]
    assert census.by_version() == {v2: 1}
    [failed] = engine.run([parts[1]], lambda p: engine.validate(p, v2))
    assert failed.action == "failed" and "unknown key version" in failed.error
    assert engine.validate(parts[0], v2).action == "validated"
    with pytest.raises(RetirementRefused, match="unknown key version"):
        retire(rt.backend, rt.config.key_class, rt.retirement_plan(), rt.censuses(), rt.ledger,
               RunContext(actor="test"))
    assert rt.backend.key_state().min_decryption_version == 1


def test_validation_names_values_under_another_partitions_data_key(make_key_class, vault, pg):
    from keyrotation.errors import ValidationError

    parts = ["2024-07-01", "2024-07-02"]
    rt, table, dataset, engine = seeded(make_key_class, vault, pg, "sqlforeign", parts, 50)
    app = KeyRotationClient(rt.backend, rt.ledger, rt.name, db=rt.sql_db(rt.config.datasets[0]),
                            poll_interval_s=3600)
    blob = app.encrypt(f"{CANARY}-x", {"table": table, "column": "email", "pk": 7, "partition": parts[1]})
    with pg[0].begin() as conn:
        conn.execute(sa.text(f"UPDATE {table} SET email = :v WHERE id = 7"), {"v": blob})
    assert engine.validate(parts[1]).action == "validated"
    with pytest.raises(ValidationError, match=f"1 values are under data keys of another table or partition, not of "
                                              f"{table} partition {parts[0]}: {table} partition {parts[1]}"):
        engine.validate(parts[0])


def test_without_a_key_id_index_the_census_scans_and_proves_the_same(make_key_class, vault, pg):
    """A timestamptz partition column: its day is not immutable, so no key-id index can hold it; the census
    reads every value instead, with the same findings."""
    config = sql_key_class(make_key_class, pg, "sqlnoidx", batch=100)
    rt = runtime(config, vault)
    table, dataset = config.datasets[0].table, "sqlnoidx_rows"
    with pg[0].begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {table} ALTER COLUMN day TYPE timestamptz"))
    seed(rt, dataset, ["2024-08-01", "2024-08-02"], rows=60)
    engine = rt.engine(dataset)
    assert rt.census(dataset).by_version() == {1: 2}
    assert "cannot create the key-id index" in engine.store.ensure_key_id_indexes(rt.name)
    assert sum(p.rows for p in rt.census(dataset).partitions.values()) == 120
    with pg[0].begin() as conn:
        _unknown_key(conn, table, rt.name, 61)
    census = rt.census(dataset)
    assert "1 values in" in census.errors["2024-08-02"] and "unknown key version" in census.errors["2024-08-02"]


def test_create_key_id_index_false_never_creates_one_and_uses_a_dbas(make_key_class, vault, pg, caplog):
    """``create_key_id_index: false``: the engine creates no index (the census scans, same findings); an index a
    DBA creates afterwards is found and used."""
    config = sql_key_class(make_key_class, pg, "sqlnocreate", batch=100, extra="    create_key_id_index: false\n")
    rt = runtime(config, vault)
    table, dataset = config.datasets[0].table, "sqlnocreate_rows"
    seed(rt, dataset, ["2024-09-01", "2024-09-02"], rows=40)
    engine = rt.engine(dataset)
    assert rt.census(dataset).by_version() == {1: 2}

    def indexes() -> set[str]:
        with pg[0].connect() as conn:
            return set(conn.execute(sa.text("SELECT indexname FROM pg_indexes WHERE tablename = :t"),
                                    {"t": table}).scalars())

    names = {engine.store.key_id_index(c, rt.name) for c in ("email", "ssn")}
    assert not names & indexes()
    assert engine.store.ensure_key_id_indexes(rt.name, create=False) == "no valid key-id index on email, ssn"
    with pg[0].begin() as conn:
        _unknown_key(conn, table, rt.name, 41)
    census = rt.census(dataset)
    assert "1 values in" in census.errors["2024-09-02"] and "unknown key version" in census.errors["2024-09-02"]
    assert not names & indexes()

    advice = [r.getMessage() for r in caplog.records if "create_key_id_index is false" in r.getMessage()]
    assert advice and len(set(advice)) == 1  # once per engine, the same advice
    assert all(engine.store.key_id_index_ddl(c, rt.name) in advice[0] for c in ("email", "ssn"))
    with pg[0].connect().execution_options(isolation_level="AUTOCOMMIT") as conn:  # the DBA, from the log line
        for statement in advice[0].split("a DBA can create it with: ")[1].split("; "):
            conn.execute(sa.text(statement))
    assert names <= indexes()
    fresh = rt.engine(dataset)
    assert fresh.store.create_indexes is False and fresh._index_problem() is None
    assert rt.census(dataset).by_version() == {1: 1}


@pytest.mark.airflow
def test_a_table_dataset_through_the_dags(make_key_class, vault, pg, airflow_db):
    from dag_runs import key_class_dags as _dags
    from dag_runs import state as _state

    config = sql_key_class(make_key_class, pg, "sqldag", batch=40)
    rt = runtime(config, vault)
    dags = _dags("sqldag")
    assert _state(dags["rotate__sqldag"].test(run_conf={"force": False, "reason": "first version"})) == "success"
    seed(rt, "sqldag_rows", ["2024-05-01", "2024-05-02", "2024-05-03"], rows=100)
    before = plaintexts(rt, "sqldag_rows")
    assert _state(dags["rotate__sqldag"].test(run_conf={"force": True, "reason": "test"})) == "success"
    sweep = dags["reencrypt__sqldag_rows"].test(run_conf={"scope": "auto", "partition_from": None,
                                                         "partition_to": None, "mode": "reencrypt", "dry_run": False})
    assert _state(sweep) == "success"
    assert rt.census("sqldag_rows").by_version() == {2: 3}
    assert _state(dags["retire__sqldag"].test()) == "success"
    assert rt.backend.key_state().min_decryption_version == 2
    assert plaintexts(rt, "sqldag_rows") == before
    assert len(rt.ledger.rows(events_in=(lg.PARTITION_VALIDATED,))) == 3


def test_a_rewrap_after_a_retirement_leaves_the_retired_unused_data_keys_alone(make_key_class, vault, pg):
    """A reencrypt leaves the partition's old data keys in the table (no value names them); once their version
    is retired the KMS refuses to rewrap them. The next rotation's rewrap must not fail on them, nor remove them."""
    config = sql_key_class(make_key_class, pg, "sqlorphan", columns="email", batch=50)
    rt = runtime(config, vault)
    dataset = "sqlorphan_rows"
    parts = days(2)
    seed(rt, dataset, parts, rows=20, columns=("email",))
    engine = rt.engine(dataset)
    v2 = rt.backend.rotate()
    update_reference(rt.name, v2, rt.ledger, RunContext(actor="test"))
    assert {r.action for r in engine.run(parts, lambda p: engine.process(p, v2, "reencrypt"))} == {"reencrypted"}
    assert {engine.validate(p, min_version=v2).action for p in parts} == {"validated"}
    state = retire(rt.backend, rt.config.key_class, rt.retirement_plan(), rt.censuses(), rt.ledger,
                   RunContext(actor="test"))
    assert state.min_decryption_version == v2
    with pg[0].connect() as conn:
        retired_keys = conn.execute(sa.text(f"SELECT count(*) FROM {DATA_KEYS} WHERE table_name = :t AND version < :v"),
                                    {"t": config.datasets[0].table, "v": v2}).scalar()
    assert retired_keys == 2  # one per partition, named by no value

    v3 = rt.backend.rotate()
    engine = rt.engine(dataset)
    results = engine.run(parts, lambda p: engine.process(p, v3, "rewrap"))
    assert [(r.action, r.error) for r in results] == [("rewrapped", None)] * 2
    assert rt.census(dataset).by_version() == {v3: 2}
    with pg[0].connect() as conn:
        assert conn.execute(sa.text(f"SELECT count(*) FROM {DATA_KEYS} WHERE table_name = :t AND version < :v"),
                            {"t": config.datasets[0].table, "v": v2}).scalar() == 2  # left in place
    assert {engine.validate(p, min_version=v3).action for p in parts} == {"validated"}
