"""Re-encryption engine against a real OpenBao: rewrap, reencrypt, crashes, validation."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from helpers import CANARY, customers, days, partition_digests, runtime, seed, seed_and_rotate
from keyrotation import ledger as lg
from keyrotation.errors import BackendError, ValidationError
from keyrotation.formats.digest import table_digest
from keyrotation.formats.parquet_pme import key_material_path


def _hashes(root: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob(pattern))}


def test_rewrap_30_partitions_keeps_data_files_and_reads_after_old_version_retired(make_key_class, vault):
    config = make_key_class(mode="rewrap")
    rt = runtime(config, vault)
    parts = days("2024-01-01", 30)
    v1 = seed(rt, "customers", parts)
    root = Path(config.dataset("customers").location)
    data_before = _hashes(root, "part-*.parquet")
    material_before = _hashes(root, "_KEY_MATERIAL_FOR_*")
    assert rt.census("customers").by_version() == {v1: 30}

    v2 = rt.backend.rotate()
    assert v2 == v1 + 1
    engine = rt.engine("customers")
    results = engine.run(parts, lambda p: engine.process(p, v2, "rewrap"))
    assert [r.action for r in results] == ["rewrapped"] * 30

    assert _hashes(root, "part-*.parquet") == data_before  # data files untouched
    material_after = _hashes(root, "_KEY_MATERIAL_FOR_*")
    assert material_after.keys() == material_before.keys()
    assert all(material_after[k] != material_before[k] for k in material_before)
    assert rt.census("customers").by_version() == {v2: 30}

    rt.backend.retire_below(v2)
    assert rt.backend.key_state().min_decryption_version == v2
    for p in parts:
        assert rt.engine("customers")._read(p, rt.store("customers").live_files(p)).equals(customers(p))

    # Idempotent: a second run does nothing and records nothing new.
    before = len(rt.ledger.rows())
    again = engine.run(parts, lambda p: engine.process(p, v2, "rewrap"))
    assert {r.action for r in again} == {"up_to_date"}
    assert len(rt.ledger.rows()) == before


def test_reencrypt_writes_new_data_keys_and_identical_plaintext(make_key_class, vault):
    config = make_key_class(mode="reencrypt")
    rt = runtime(config, vault)
    parts = days("2024-02-01", 5)
    seed(rt, "customers", parts)
    root = Path(config.dataset("customers").location)
    data_before = _hashes(root, "part-*.parquet")
    digests_before = partition_digests(rt, "customers", parts)

    v2 = rt.backend.rotate()
    engine = rt.engine("customers")
    results = engine.run(parts, lambda p: engine.process(p, v2, "reencrypt"))
    assert [r.action for r in results] == ["reencrypted"] * 5
    data_after = _hashes(root, "part-*.parquet")
    assert set(data_after).isdisjoint(data_before)  # new generation of files, old ones gone
    assert len(data_after) == 5
    rt.backend.retire_below(v2)
    assert partition_digests(rt, "customers", parts) == digests_before
    for p in parts:
        assert engine.validate(p, min_version=v2).action == "validated"
    rows = rt.ledger.rows(events_in=(lg.PARTITION_REENCRYPTED,))
    assert [r["partition"] for r in rows] == parts
    assert all(r["from_version"] == v2 - 1 and r["to_version"] == v2 and r["rows"] == 50 for r in rows)


@pytest.mark.parametrize("point", ["staged", "material_moved", "data_moved", "committed", "cleaned"])
def test_crash_at_any_step_leaves_partition_decryptable_and_rerun_completes(make_key_class, vault, point):
    config = make_key_class(mode="reencrypt")
    rt = runtime(config, vault)
    parts = days("2024-03-01", 2)
    expected, v2 = seed_and_rotate(rt, "customers", parts)

    class Crash(Exception):
        pass

    def crash(name):
        if name == point:
            raise Crash(name)

    crashing = rt.engine("customers", checkpoint=crash)
    with pytest.raises(Crash):
        crashing.process(parts[0], v2, "reencrypt")
    # Right after the crash, every partition still decrypts to what it held.
    assert partition_digests(rt, "customers", parts) == expected

    engine = rt.engine("customers")
    results = engine.run(parts, lambda p: engine.process(p, v2, "reencrypt"))
    assert results[0].action in ("reencrypted", "reconciled")
    assert results[1].action == "reencrypted"
    rt.backend.retire_below(v2)
    assert partition_digests(rt, "customers", parts) == expected
    assert rt.census("customers").by_version() == {v2: 2}
    # Exactly one generation of files per partition remains.
    root = Path(config.dataset("customers").location)
    assert sorted(p.parent.name for p in root.rglob("*.parquet")) == [f"dt={p}" for p in parts]
    # The second run did not re-encrypt the first partition twice when the crash came after the commit.
    if point in ("committed", "cleaned"):
        assert results[0].action == "reconciled"


def test_crash_during_rewrap_leaves_partitions_decryptable(make_key_class, vault):
    config = make_key_class(mode="rewrap")
    rt = runtime(config, vault)
    parts = days("2024-04-01", 3)
    expected, v2 = seed_and_rotate(rt, "customers", parts)
    calls = []

    def crash(name):
        calls.append(name)
        if calls.count("rewrapped_file") == 2:
            raise RuntimeError("killed")

    engine = rt.engine("customers", checkpoint=crash)
    with pytest.raises(RuntimeError):
        for p in parts:
            engine.process(p, v2, "rewrap")
    assert partition_digests(rt, "customers", parts) == expected
    assert rt.census("customers").by_version() == {v2: 2, v2 - 1: 1}
    engine = rt.engine("customers")
    # The second partition was re-wrapped but the crash came before its ledger row: reconciled, not redone.
    assert [r.action for r in engine.run(parts, lambda p: engine.process(p, v2, "rewrap"))] == [
        "up_to_date", "reconciled", "rewrapped"]
    rt.backend.retire_below(v2)
    assert partition_digests(rt, "customers", parts) == expected


def test_tampered_partition_fails_alone_and_is_left_untouched(make_key_class, vault):
    config = make_key_class(mode="reencrypt")
    rt = runtime(config, vault)
    parts = days("2024-05-01", 3)
    seed(rt, "customers", parts)
    root = Path(config.dataset("customers").location)
    material = Path(key_material_path(str(root / f"dt={parts[1]}" / "part-00001.parquet")))
    material.write_text("{not json")
    before = _hashes(root / f"dt={parts[1]}", "*")
    v2 = rt.backend.rotate()
    engine = rt.engine("customers")
    results = engine.run(parts, lambda p: engine.process(p, v2, "reencrypt"))
    assert [r.action for r in results] == ["reencrypted", "failed", "reencrypted"]
    assert parts[1] in results[1].error and "key material is not valid" in results[1].error
    assert _hashes(root / f"dt={parts[1]}", "*") == before
    failed = rt.ledger.rows(events_in=(lg.PARTITION_FAILED,))
    assert [r["partition"] for r in failed] == [parts[1]]
    census = rt.census("customers")
    assert list(census.errors) == [parts[1]]
    assert CANARY not in results[1].error


def test_validation_detects_a_digest_mismatch(make_key_class, vault):
    config = make_key_class(mode="reencrypt")
    rt = runtime(config, vault)
    [part] = days("2024-06-01", 1)
    v1 = seed(rt, "customers", [part])
    engine = rt.engine("customers")
    assert engine.validate(part).action == "validated"
    # Replace the partition's content behind the ledger's back: validation must catch it.
    engine.write_partition(part, customers(part, rows=49), v1)
    rt.ledger.record(lg.PARTITION_REWRAPPED, rt.name, dataset="customers", partition=part, to_version=v1,
                     digest=table_digest(customers(part)))
    with pytest.raises(ValidationError, match=part):
        engine.validate(part)


def test_wrong_key_class_for_dataset_is_named(make_key_class, vault):
    config = make_key_class(name="pii", mode="rewrap")
    rt = runtime(config, vault)
    [part] = days("2024-07-01", 1)
    seed(rt, "customers", [part])
    other = runtime(make_key_class(name="other", mode="rewrap", dataset="customers"), vault)
    other.backend.create_key()
    with pytest.raises(BackendError, match="protected by master key"):
        other.pme("customers").wrapping_versions(
            rt.store("customers").path(part, "part-00001.parquet"), rt.store("customers").fs)


def test_rewrap_is_server_side_on_transit(make_key_class, vault):
    """Transit re-wraps KEKs in the KMS: nothing is unwrapped here. (Cloud KMS, which cannot, re-wraps in
    memory: tests/test_gcp.py.)"""
    config = make_key_class(mode="rewrap")
    rt = runtime(config, vault)
    parts = days("2024-08-01", 4)
    expected, v2 = seed_and_rotate(rt, "customers", parts)
    unwrapped = []
    real_unwrap = rt.backend.unwrap
    rt.backend.unwrap = lambda wrapped: unwrapped.append(wrapped) or real_unwrap(wrapped)
    engine = rt.engine("customers")
    engine.process(parts[0], v2, "rewrap")
    engine.process(parts[1], v2, "rewrap")
    engine.process(parts[2], v2, "rewrap")
    engine.process(parts[3], v2, "rewrap")
    assert unwrapped == []  # server-side: no KEK came back in plaintext
    assert rt.census("customers").by_version() == {v2: 4}
    rt.backend.retire_below(v2)
    assert partition_digests(rt, "customers", parts) == expected


@pytest.mark.parametrize("mode", ["rewrap", "reencrypt"])
def test_two_runs_of_the_same_partitions_at_once_do_the_work_once(make_key_class, vault, mode):
    """A backfill overlapping a sweep: each partition is changed once, and none is lost."""
    from concurrent.futures import ThreadPoolExecutor

    config = make_key_class(mode=mode)
    rt = runtime(config, vault)
    parts = days("2024-09-01", 6)
    expected, v2 = seed_and_rotate(rt, "customers", parts)

    def sweep(order):
        engine = rt.engine("customers")
        return engine.run(order, lambda p: engine.process(p, v2, mode))

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(sweep, [parts, list(reversed(parts))])
    actions = sorted(r.action for r in a + b)
    done = "rewrapped" if mode == "rewrap" else "reencrypted"
    assert actions == sorted([done] * 6 + ["up_to_date"] * 6)
    changes = rt.ledger.rows(events_in=(lg.PARTITION_REWRAPPED, lg.PARTITION_REENCRYPTED))
    assert sorted(r["partition"] for r in changes) == parts
    rt.backend.retire_below(v2)
    assert partition_digests(rt, "customers", parts) == expected


def test_a_lease_left_by_a_killed_process_on_this_host_is_taken_over(make_key_class, vault):
    import subprocess
    import sys
    from datetime import UTC, datetime, timedelta

    from keyrotation.locks import PartitionLeases, PartitionLocked, leases

    rt = runtime(make_key_class(), vault)
    [part] = days("2024-10-01", 1)
    seed(rt, "customers", [part])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    with rt.ledger.db.begin() as conn:
        conn.execute(leases.insert().values(dataset="customers", partition=part, expires_at=datetime.now(UTC)
                                            + timedelta(hours=1), owner=f"{socket.gethostname()}:"
                                            f"{dead.stdout.strip()}:x"))
    v2 = rt.backend.rotate()
    assert rt.engine("customers").process(part, v2, "rewrap").action == "rewrapped"
    # A live holder (this process) is waited for, then reported by name.
    with rt.engine("customers").leases.hold("customers", part), pytest.raises(PartitionLocked, match=part):
        with PartitionLeases(rt.ledger).hold("customers", part, wait=0.2):
            pass


def test_reencrypt_streams_the_partition_batch_by_batch(make_key_class, vault):
    """The data passes through in batches of batch_rows: the new file's row groups are those batches, and the
    digest taken on the way equals the whole table's."""
    config = make_key_class(mode="reencrypt", name="streaming")
    rt = runtime(config, vault)
    table = customers("2024-09-01", 4_500)
    rt.backend.create_key()
    rt.engine("customers").write_partition("2024-09-01", table, 1)
    v2 = rt.backend.rotate()
    engine = rt.engine("customers")
    engine.batch_rows = 1_000
    engine.module_path = False  # the decode path (the module path keeps the file's row groups)
    result = engine.process("2024-09-01", v2, "reencrypt")
    assert (result.action, result.rows, result.digest) == ("reencrypted", 4_500, table_digest(table))
    store = rt.store("customers")
    [name] = store.live_files("2024-09-01")
    opened = engine.pme.open(store.path("2024-09-01", name), store.fs)
    assert [opened.metadata.row_group(i).num_rows for i in range(opened.metadata.num_row_groups)] == \
        [1_000] * 4 + [500]
    assert engine.validate("2024-09-01", min_version=v2).digest == table_digest(table)


def _rewrap_scenario(rt, batched: bool):  # noqa: ANN001, ANN202
    """Five partitions: the first already under the target, the third's wrapped KEK one the KMS refuses."""
    import json

    parts = days("2024-11-01", 5)
    expected, v2 = seed_and_rotate(rt, "customers", parts)
    engine = rt.engine("customers")
    engine.process(parts[0], v2, "rewrap")
    material = Path(key_material_path(str(Path(rt.config.dataset("customers").location) / f"dt={parts[2]}"
                                          / "part-00001.parquet")))
    entries = {k: json.loads(v) for k, v in json.loads(material.read_text()).items()}
    material.write_text(json.dumps({k: json.dumps({**e, "wrappedKEK": "vault:v1:bm90IGEga2V5"})
                                    for k, e in entries.items()}))
    calls: list[int] = []
    real = rt.backend.rewrap
    rt.backend.rewrap = lambda wrapped, version=None: calls.append(len(wrapped)) or real(wrapped, version)
    seen = len(rt.ledger.rows())
    engine = rt.engine("customers")
    started = time.monotonic()
    results = engine.process_many(parts, v2, "rewrap") if batched else \
        engine.run(parts, lambda p: engine.process(p, v2, "rewrap"))
    return parts, expected, v2, results, rt.ledger.rows()[seen:], calls, time.monotonic() - started


def test_rewrap_many_gives_what_process_gives_with_one_kms_request_and_a_bad_partition_alone(make_key_class,
                                                                                            vault, tmp_path):
    one_by_one = _rewrap_scenario(runtime(make_key_class(mode="rewrap", name="single", location=str(tmp_path / "a")),
                                          vault, f"sqlite:///{tmp_path / 'single.db'}"), batched=False)
    rt = runtime(make_key_class(mode="rewrap", name="batched", location=str(tmp_path / "b")), vault,
                 f"sqlite:///{tmp_path / 'batched.db'}")
    parts, expected, v2, results, rows, calls, elapsed = _rewrap_scenario(rt, batched=True)
    assert [r.action for r in results] == ["up_to_date", "rewrapped", "failed", "rewrapped", "rewrapped"]
    # Each partition's duration is its own share of the batch: together they fit in the call's wall time.
    assert 0 < sum(r.duration_s for r in results) <= elapsed
    assert all(r.duration_s > 0 for r in results if r.action == "rewrapped")
    assert parts[2] in results[2].error and results[2].retryable is False

    def same(r):  # noqa: ANN001, ANN202
        return r.partition, r.action, r.from_version, r.to_version, r.rows, r.bytes, r.digest, r.error is None

    assert [same(r) for r in results] == [same(r) for r in one_by_one[3]]
    columns = ("event", "status", "dataset", "partition", "from_version", "to_version", "rows", "bytes", "digest",
               "task_id", "actor")
    assert [tuple(r[c] for c in columns) for r in rows] == [tuple(r[c] for c in columns) for r in one_by_one[4]]
    assert [r["detail"] for r in rows if r["status"] == "ok"] == \
        [r["detail"] for r in one_by_one[4] if r["status"] == "ok"]
    assert [r["event"] for r in rows] == [lg.PARTITION_REWRAPPED, lg.PARTITION_FAILED, lg.PARTITION_REWRAPPED,
                                          lg.PARTITION_REWRAPPED]
    assert rt.ledger.verify().ok
    # One request for the four partitions' KEKs together; refused (the bad one), then each partition's alone.
    assert calls == [4, 1, 1, 1, 1] and one_by_one[5] == [1, 1, 1, 1]
    assert rt.census("customers").by_version() == {v2: 4, v2 - 1: 1}
    rt.backend.retire_below(v2)
    good = [p for p in parts if p != parts[2]]
    assert partition_digests(rt, "customers", good) == {p: expected[p] for p in good}


def test_rewrap_many_takes_the_free_leases_together_and_waits_for_a_held_one(make_key_class, vault):
    import threading
    import time

    from keyrotation.locks import PartitionLeases

    rt = runtime(make_key_class(mode="rewrap"), vault)
    parts = days("2024-12-01", 6)
    expected, v2 = seed_and_rotate(rt, "customers", parts)
    calls: list[int] = []
    real = rt.backend.rewrap
    rt.backend.rewrap = lambda wrapped, version=None: calls.append(len(wrapped)) or real(wrapped, version)
    taken, release = threading.Event(), threading.Event()

    def holder() -> None:
        with PartitionLeases(rt.ledger).hold("customers", parts[1]):
            taken.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    taken.wait(10)
    threading.Timer(0.5, release.set).start()
    started = time.monotonic()
    results = rt.engine("customers").process_many(parts, v2, "rewrap")
    thread.join()
    assert time.monotonic() - started >= 0.4  # it waited for the held lease
    assert [r.action for r in results] == ["rewrapped"] * 6
    assert calls == [5, 1]
    assert {r["partition"] for r in rt.ledger.rows(events_in=(lg.PARTITION_REWRAPPED,))} == set(parts)
    with rt.ledger.db.connect() as conn:
        from keyrotation.locks import leases

        assert conn.execute(leases.select()).all() == []
    rt.backend.retire_below(v2)
    assert partition_digests(rt, "customers", parts) == expected


def test_rewrap_many_with_the_kms_away_fails_each_partition_retryable_after_one_request(make_key_class, vault):
    from keyrotation.errors import KmsUnreachable

    rt = runtime(make_key_class(mode="rewrap"), vault)
    parts = days("2024-12-10", 3)
    expected, v2 = seed_and_rotate(rt, "customers", parts)
    calls: list[int] = []

    def away(wrapped, version=None):  # noqa: ANN001, ANN202
        calls.append(len(wrapped))
        raise KmsUnreachable("KMS unreachable or over quota: test")

    rt.backend.rewrap = away
    results = rt.engine("customers").process_many(parts, v2, "rewrap")
    assert [(r.action, r.retryable) for r in results] == [("failed", True)] * 3 and calls == [3]
    assert [r["partition"] for r in rt.ledger.rows(events_in=(lg.PARTITION_FAILED,))] == parts
    assert rt.census("customers").by_version() == {v2 - 1: 3}
    assert partition_digests(rt, "customers", parts) == expected
