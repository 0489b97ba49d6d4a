"""The application client library (keyrotation.client) against a real OpenBao and PostgreSQL: values in the
same bytes as the sql_table DAGs, Parquet in the same PME format, rotations noticed without a restart,
retired versions refused, a bounded TTL'd cache of zeroed keys, and no plaintext anywhere it should not be."""

from __future__ import annotations

import logging
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
import sqlalchemy as sa

from helpers import CANARY, PG_URL, customers
from keyrotation import ledger as lg
from keyrotation.backends.vault_transit import VaultTransitBackend
from keyrotation.client import (
    InvalidInput,
    KeyRotationClient,
    NoCurrentVersion,
    RetiredVersionError,
    ValueContext,
)
from keyrotation.config import Dataset
from keyrotation.formats.envelope import EnvelopeError, open_sealed, parse_header, seal
from keyrotation.formats.parquet_pme import ParquetEncryption, key_material_path
from keyrotation.ledger import Ledger, RunContext
from keyrotation.rotation import update_reference
from keyrotation.stores.data_keys import DataKeyStore

ROOT = Path(__file__).resolve().parents[1]
ACTOR = RunContext(actor="test")


class Setup:
    """One key class: a fresh Transit key at v1 (the ledger's reference), a ledger, a table name."""

    def __init__(self, vault, tmp_path: Path, engine: sa.Engine, tables: list[str]) -> None:
        self.name = f"app_{secrets.token_hex(3)}"
        self.backend = VaultTransitBackend(vault, f"client-{secrets.token_hex(4)}")
        self.backend.create_key()
        self.ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
        update_reference(self.name, 1, self.ledger, ACTOR)
        self.db = engine
        self.table = f"accounts_{secrets.token_hex(3)}"
        tables.append(self.table)
        self.tmp_path = tmp_path

    def client(self, **kwargs) -> KeyRotationClient:
        kwargs.setdefault("poll_interval_s", 0.3)
        return KeyRotationClient(self.backend, self.ledger, self.name, db=self.db, **kwargs)

    def ctx(self, pk, partition: str | None = "2024-03-01", column: str = "email") -> dict:
        return {"table": self.table, "column": column, "pk": pk, "partition": partition}

    def rotate(self) -> int:
        version = self.backend.rotate()
        update_reference(self.name, version, self.ledger, ACTOR)
        return version

    def retire_below(self, version: int, *, kms: bool = False) -> None:
        if kms:
            self.backend.retire_below(version)
        self.ledger.record(lg.VERSIONS_RETIRED, self.name, ACTOR, from_version=1, to_version=version)



@pytest.fixture
def setup(vault, tmp_path, pg) -> Setup:
    return Setup(vault, tmp_path, *pg)


def test_values_round_trip_in_the_same_bytes_as_the_sql_table_dags(setup):
    from keyrotation.census import take_census
    from keyrotation.sql_engine import SqlTableEngine
    from keyrotation.stores.sql_table import SqlTableStore

    s = setup
    with s.db.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {s.table} (id bigint PRIMARY KEY, day date NOT NULL, email bytea)"))
    dataset = Dataset(name="accounts", location=PG_URL, format="sql_table", table=s.table, partition_column="day",
                      encrypted_columns=["email"])
    dag_engine = SqlTableEngine(s.name, dataset.name, SqlTableStore(s.db, dataset), s.backend, s.ledger)
    day = "2024-03-01"
    dag_engine.write_partition(day, pd.DataFrame({"id": range(10), "day": [day] * 10,
                                                  "email": [f"{CANARY}-{i}@example.test" for i in range(10)]}), 1)
    client = s.client()
    with s.db.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT id, email FROM {s.table} ORDER BY id")).fetchall()
    # Values the DAG path wrote decrypt through the client...
    assert [client.decrypt(v, s.ctx(pk, None)) for pk, v in rows] == [f"{CANARY}-{i}@example.test".encode()
                                                                      for i in range(10)]
    # ...and values the client writes are the DAG path's: same data key of the partition, readable by the
    # engine (validation decrypts every value bound to its row) and by the data-key store with the envelope.
    mine = {pk: client.encrypt(f"{CANARY}-{pk}@example.test", s.ctx(pk, day)) for pk in range(10, 20)}
    assert {parse_header(v, "").key_id for v in mine.values()} == {parse_header(bytes(rows[0][1]), "").key_id}
    with s.db.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {s.table} (id, day, email) VALUES (:id, :day, :email)"),
                     [{"id": pk, "day": day, "email": v} for pk, v in mine.items()])
    assert dag_engine.validate(day).rows == 20
    assert take_census(dag_engine).by_version() == {1: 1}
    store = DataKeyStore(s.db, s.backend, s.name)  # a second reader and writer: the store and the envelope
    header = parse_header(mine[12], "")
    assert open_sealed(mine[12], store.key(header.key_id, "").aead, header, s.table, "email", 12, "") == \
        f"{CANARY}-12@example.test".encode()
    key_id, key = store.current(s.table, day, 1)
    theirs = seal(b"from the data-key store", key.aead, key_id, s.name, s.table, "email", 99)
    assert client.decrypt(theirs, ValueContext(s.table, "email", 99)) == b"from the data-key store"
    assert client.decrypt(mine[11], s.ctx(__import__("numpy").int64(11))) == f"{CANARY}-11@example.test".encode()
    assert client.describe(mine[10]) | {"data_key_id": None} == {
        "key_class": s.name, "data_key_id": None, "created_under": 1, "version": 1, "table": s.table, "partition": day}

    # Bound to its row and column, checked and named.
    with pytest.raises(EnvelopeError, match=rf"{s.table}\.email row 11: does not decrypt"):
        client.decrypt(mine[10], s.ctx(11))
    with pytest.raises(EnvelopeError, match="does not decrypt"):
        client.decrypt(mine[10], s.ctx(10, column="phone"))
    tampered = bytearray(mine[10])
    tampered[-1] ^= 1
    with pytest.raises(EnvelopeError, match="row 10: does not decrypt"):
        client.decrypt(bytes(tampered), s.ctx(10))
    with pytest.raises(EnvelopeError, match="belongs to key class"):
        KeyRotationClient(s.backend, s.ledger, "other_class", db=s.db).decrypt(mine[10], s.ctx(10))
    assert client.metrics()["errors"] == {"does_not_decrypt": 3}


def test_parquet_round_trip_in_the_dags_format(setup, tmp_path):
    s = setup
    fs = pafs.LocalFileSystem()
    client = s.client(encrypted_columns=["email", "ssn"])
    table = customers("2024-01-01", rows=20)
    mine = str(tmp_path / "mine.parquet")
    assert client.write_parquet(table, mine) == 1
    pme = ParquetEncryption(s.backend, ["email", "ssn"])
    assert pme.read(mine, fs).equals(table)  # the DAGs' reader
    assert pme.wrapping_versions(mine, fs) == {1}
    assert "vault:v1:" in Path(key_material_path(mine)).read_text()
    theirs = str(tmp_path / "theirs.parquet")
    pme.write(table, theirs, fs, 1)  # the DAGs' writer
    assert client.read_parquet(theirs).equals(table)

    v2 = s.rotate()
    client.refresh()
    pme.rewrap(theirs, fs, v2)  # the rewrap sweep: key material only
    assert client.read_parquet(theirs).equals(table) and client.read_parquet(mine).equals(table)
    newer = str(tmp_path / "newer.parquet")
    assert client.write_parquet(table, newer) == v2 and pme.wrapping_versions(newer, fs) == {v2}

    s.retire_below(v2)
    client.refresh()
    assert client.read_parquet(theirs).equals(table)
    with pytest.raises(RetiredVersionError, match=r"mine\.parquet: refusing to read: .* under v1 .* below v2"):
        client.read_parquet(mine)
    with pytest.raises(InvalidInput, match="no encrypted columns"):
        s.client().write_parquet(table, str(tmp_path / "x.parquet"))


def test_values_written_before_a_rotation_decrypt_after_it_and_new_ones_follow_the_reference(setup):
    s = setup
    poll = 0.5
    client = s.client(poll_interval_s=poll)
    before = {pk: client.encrypt(f"{CANARY}-{pk}", s.ctx(pk)) for pk in range(5)}
    assert {client.describe(v)["created_under"] for v in before.values()} == {1}

    v2 = s.rotate()  # the rotate DAG: new version, then the ledger's reference
    moved = time.monotonic()
    while True:  # no restart, no refresh(): the next poll notices
        blob, version = client.encrypt_versioned("after", s.ctx(100))
        if version == v2:
            break
        assert time.monotonic() - moved < poll + 1.0, "the client did not notice the new reference in time"
        time.sleep(0.05)
    assert time.monotonic() - moved <= poll + 1.0
    assert client.describe(blob)["created_under"] == v2
    assert client.metrics()["rotations_noticed"] == 1

    # Old values decrypt before and after the rewrap sweep re-wraps their data keys.
    assert all(client.decrypt(v, s.ctx(pk)) == f"{CANARY}-{pk}".encode() for pk, v in before.items())
    store = DataKeyStore(s.db, s.backend, s.name)
    assert store.rewrap(store.keys_of(s.table, "2024-03-01"), v2) == 2  # the v1 and v2 data keys
    fresh = s.client()
    assert all(fresh.decrypt(v, s.ctx(pk)) == f"{CANARY}-{pk}".encode() for pk, v in before.items())
    assert fresh.describe(before[0]) | {"data_key_id": None} == {
        "key_class": s.name, "data_key_id": None, "created_under": 1, "version": v2, "table": s.table,
        "partition": "2024-03-01"}

    # refresh() forces it at once.
    v3 = s.rotate()
    slow = s.client(poll_interval_s=3600)
    assert slow.encrypt_versioned("x", s.ctx(1))[1] == v3
    v4 = s.rotate()
    assert slow.encrypt_versioned("x", s.ctx(1))[1] == v3  # not polled yet
    slow.refresh()
    assert slow.encrypt_versioned("x", s.ctx(1))[1] == v4


def test_versions_retired_in_the_ledger_or_the_kms_are_refused_with_a_clear_error(setup):
    s = setup
    client = s.client()
    old = client.encrypt(f"{CANARY}-old", s.ctx(7, "2024-03-01"))
    kept = client.encrypt(f"{CANARY}-kept", s.ctx(8, "2024-03-02"))
    v2 = s.rotate()
    store = DataKeyStore(s.db, s.backend, s.name)
    store.rewrap(store.keys_of(s.table, "2024-03-02"), v2)  # one partition swept, the other not
    s.retire_below(v2)
    client.refresh()
    calls = client.metrics()["kms_calls_total"]
    with pytest.raises(RetiredVersionError) as err:
        client.decrypt(old, s.ctx(7))
    message = str(err.value)
    assert f"{s.table}.email row 7: refusing to decrypt" in message
    assert "partition 2024-03-01" in message and "under v1" in message and "ledger marks it retired" in message
    assert "below v2" in message and CANARY not in message
    assert (err.value.version, err.value.min_version) == (1, v2)
    assert client.metrics()["kms_calls_total"] == calls  # refused before any KMS call
    assert client.decrypt(kept, s.ctx(8)) == f"{CANARY}-kept".encode()  # re-wrapped: live
    assert client.metrics()["errors"] == {"retired_version": 1}

    # Encrypting under a retired version is refused too (a reference moved back below the floor).
    update_reference(s.name, 1, s.ledger, ACTOR)
    client.refresh()
    with pytest.raises(RetiredVersionError, match=r"refusing to encrypt .*row 9 under v1, the ledger's current "
                                                  r"version, which the ledger marks retired"):
        client.encrypt("x", s.ctx(9))
    update_reference(s.name, v2, s.ledger, ACTOR)

    # The KMS retired a version the ledger does not mark yet: its refusal is named as a retirement.
    s.backend.retire_below(v2)
    behind = Ledger(f"sqlite:///{s.tmp_path / 'behind.db'}")  # a ledger that has not recorded the retirement
    update_reference(s.name, v2, behind, ACTOR)
    lagging = KeyRotationClient(s.backend, behind, s.name, db=s.db)
    with pytest.raises(RetiredVersionError, match=r"row 7: refusing to decrypt: .* under v1 .* the KMS has "
                                                  r"retired it \(min_decryption_version\): versions below v2"):
        lagging.decrypt(old, s.ctx(7))


def test_the_cache_is_bounded_ttld_zeroed_and_saves_kms_calls(setup):
    s = setup
    now = [0.0]
    writer = s.client()
    days = ["2024-03-01", "2024-03-02", "2024-03-03", "2024-03-04"]
    values = {d: writer.encrypt(f"{CANARY}-{d}", s.ctx(1, d)) for d in days}
    assert writer.metrics()["kms_calls"] == {"wrap": 4}  # one new data key per partition

    client = s.client(cache_size=2, cache_ttl_s=60, clock=lambda: now[0], poll_interval_s=1000)
    for _ in range(500):
        assert client.decrypt(values[days[0]], s.ctx(1)) == f"{CANARY}-{days[0]}".encode()
    m = client.metrics()
    assert (m["kms_calls"], m["cache_misses"], m["cache_hits"], m["requests"]) == ({"unwrap": 1}, 1, 499,
                                                                                    {"decrypt": 500})
    first = parse_header(values[days[0]], "").key_id
    held = client._cache._entries[first].key
    assert len(held) == 32 and any(held)
    assert "bytearray" not in repr(client._cache) and repr(client._cache._entries[first]).endswith("hidden>")

    client.decrypt(values[days[1]], s.ctx(1))
    client.decrypt(values[days[2]], s.ctx(1))  # a third key: the least recently used one is evicted...
    assert len(client._cache) == 2 and first not in client._cache._entries
    assert held == bytearray(32)  # ...and zeroed
    assert client.metrics()["cache_evictions"] == 1

    client.decrypt(values[days[2]], s.ctx(1))
    assert client.metrics()["kms_calls"] == {"unwrap": 3}
    now[0] += 61  # past the TTL: unwrapped again
    client.decrypt(values[days[2]], s.ctx(1))
    assert client.metrics()["kms_calls"] == {"unwrap": 4}

    # Concurrent misses on one key make one KMS call, not one per thread.
    cold = s.client(poll_interval_s=1000)
    cold.refresh()
    barrier = threading.Barrier(16)
    results: list[bytes] = []

    def read() -> None:
        barrier.wait()
        results.append(cold.decrypt(values[days[3]], s.ctx(1)))

    threads = [threading.Thread(target=read) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [f"{CANARY}-{days[3]}".encode()] * 16
    assert cold.metrics()["kms_calls"] == {"unwrap": 1}
    cold.close()
    assert len(cold._cache) == 0


def test_no_plaintext_or_key_reaches_logs_errors_metrics_or_repr(setup, caplog):
    caplog.set_level(logging.DEBUG)
    s = setup
    client = s.client()
    blob = client.encrypt(f"{CANARY}-secret", s.ctx(1))
    key = bytes(next(iter(client._cache._entries.values())).key)
    errors = []
    for bad in (lambda: client.decrypt(blob, s.ctx(2)), lambda: client.decrypt(blob[:-1] + b"x", s.ctx(1)),
                lambda: client.encrypt(f"{CANARY}", {"table": s.table, "column": "email", "pk": 1}),
                lambda: client.decrypt(f"{CANARY}".encode(), s.ctx(1))):
        with pytest.raises(Exception) as err:  # noqa: PT011 - each kind is checked in its own test
            bad()
        errors.append(str(err.value))
    s.rotate()
    s.retire_below(2)
    client.refresh()
    with pytest.raises(RetiredVersionError) as err:
        client.decrypt(blob, s.ctx(1))
    errors.append(str(err.value))
    shown = "\n".join([caplog.text, repr(client), str(client.metrics()), *errors])
    assert "refusing to decrypt" in shown and "reference moved" in caplog.text
    assert CANARY not in shown
    for form in (key, key.hex(), __import__("base64").b64encode(key)):
        assert (form if isinstance(form, str) else form.decode("latin-1")) not in shown


def test_bad_context_and_missing_reference_are_refused_clearly(setup, tmp_path):
    s = setup
    client = s.client()
    for context, message in [
        ({"table": s.table, "column": "email", "pk": 1}, "context.partition is required to encrypt"),
        ({"table": "", "column": "email", "pk": 1, "partition": "p"}, "context.table is required"),
        ({"table": s.table, "column": "e\x00mail", "pk": 1, "partition": "p"}, "without NUL"),
        ({"table": s.table, "column": "email", "pk": None, "partition": "p"}, "context.pk is required"),
        ({"table": s.table, "column": "email", "pk": True, "partition": "p"}, "context.pk is required"),
        ({"table": s.table, "column": "email", "pk": 1, "partition": "p" * 101}, "at most 100"),
        ({"table": s.table, "column": "email", "pk": 1, "partition": "p", "extra": 1}, "unknown field"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            client.encrypt("x", context)
    with pytest.raises(InvalidInput, match="plaintext must be bytes or str"):
        client.encrypt(12, s.ctx(1))
    with pytest.raises(EnvelopeError, match="not a keyrotation envelope"):
        client.decrypt(b"plain", s.ctx(1))
    empty = KeyRotationClient(s.backend, Ledger(f"sqlite:///{tmp_path / 'empty.db'}"), "nobody", db=s.db)
    with pytest.raises(NoCurrentVersion, match="holds no current version yet"):
        empty.encrypt("x", s.ctx(1))


def test_a_ledger_that_goes_away_keeps_the_last_version_and_health_says_so(setup, tmp_path):
    s = setup
    client = s.client(poll_interval_s=0.1)
    assert client.health() == {"kms": "ok", "ledger": "ok", "data_keys_db": "ok"}
    client.encrypt("x", s.ctx(1))
    s.ledger.db.dispose()
    (tmp_path / "ledger.db").rename(tmp_path / "ledger.moved")
    time.sleep(0.15)
    assert client.encrypt_versioned("y", s.ctx(2))[1] == 1  # the last answer stays in force
    assert client.metrics()["errors"] == {"ledger_unavailable": 1}
    assert "unreachable" in client.health()["ledger"]
    client.close()


def test_the_client_and_sidecar_import_no_airflow():
    code = ("import sys, keyrotation.client, keyrotation.sidecar; "
            "bad = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "include"), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def test_from_key_class_on_aws_kms(moto, tmp_path, pg):
    """The same client over an aws_kms key class (alias strategy), built from its config and a boto3 client."""
    from keyrotation.config import load_key_class_file

    engine, tables = pg
    path = tmp_path / "awsapp.yaml"
    path.write_text(f"key_class:\n  name: awsapp\n  backend: aws_kms\n  key_ref: alias/awsapp-{secrets.token_hex(3)}\n"
                    "  conn_id: unused\n  rotation: {cryptoperiod: 90d}\ndatasets: []\n")
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    client = KeyRotationClient.from_key_class(load_key_class_file(path), kms_client=moto.client("kms"), ledger=ledger,
                                              db=engine)
    update_reference("awsapp", client._backend.create_key().latest_version, ledger, ACTOR)
    table = f"aws_{secrets.token_hex(3)}"
    tables.append(table)
    ctx = {"table": table, "column": "c", "pk": 1, "partition": "2024-01-01"}
    before = client.encrypt(f"{CANARY}-aws", ctx)
    update_reference("awsapp", client._backend.rotate(), ledger, ACTOR)
    client.refresh()
    after, version = client.encrypt_versioned("after", ctx)
    assert version == 2 and client.describe(after)["created_under"] == 2
    assert client.decrypt(before, ctx) == f"{CANARY}-aws".encode() and client.decrypt(after, ctx) == b"after"
    assert client.metrics()["kms_calls"] == {"wrap": 2}
