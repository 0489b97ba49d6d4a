"""Fault injection against real servers; every case ends with every partition decrypting, read by the
independent oracle (``tests/oracle.py``), to the rows generated for it, and the old key version retired.

- SIGKILL of the re-encryption process at seeded times, each proven to have landed mid-run (the kill at
  every checkpoint of the commit protocol, on every store: ``tests/test_kill_matrix.py``);
- the KMS stopped in the middle of a run and started again, and staying down;
- disk full and permission denied on the data location.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import oracle
import pytest
from oracle import TransitKms, assert_source

from helpers import customers, days, runtime, seed
from keyrotation import ledger as lg
from keyrotation.backends.registry import open_backend
from keyrotation.backends.retry import RetryPolicy
from keyrotation.ledger import RunContext
from keyrotation.rotation import update_reference
from keyrotation.runtime import KeyClassRuntime
from keyrotation_dev.devserver import OpenBaoFileServer, free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fault_worker.py")
pytestmark = pytest.mark.faults


def source_of(partitions: list[str], rows: int) -> dict:
    """The rows ``seed`` generated for each partition: what the oracle compares with."""
    return {p: customers(p, rows) for p in partitions}


def assert_oracle(rt, dataset: str, source: dict, versions: set[int]) -> None:
    """Read by the oracle (its own KMS client, no product code): every partition is the source, under
    ``versions`` only."""
    backend = rt.backend
    assert_source(rt.config.dataset(dataset).location,
                  TransitKms(backend.client.url, backend.client.token, backend.mount_point), source, versions)


def assert_all_under(rt, dataset, partitions, version, source):
    """Every partition is under ``version`` only, and still decrypts to its source once older versions are
    retired."""
    assert rt.census(dataset).by_version() == {version: len(partitions)}
    assert_oracle(rt, dataset, source, {version})
    rt.backend.retire_below(version)
    assert_oracle(rt, dataset, source, {version})


def changes_per_partition(rt) -> dict[str, int]:
    return oracle.changes_per_partition(rt.ledger.url.removeprefix("sqlite:///"))


def start_worker(config, openbao, ledger_url, target, mode, kill_at, parts):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), str(ROOT / "tests")])}
    return subprocess.Popen(
        [sys.executable, str(WORKER), config.source, openbao.url, openbao.token, ledger_url, "customers",
         str(target), mode, str(kill_at), *parts],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def rerun_and_check(rt, parts, target, mode, source):
    # Right after the kill, before any repair, every partition still decrypts to its source.
    assert_oracle(rt, "customers", source, {target - 1, target})
    engine = rt.engine("customers")
    results = engine.run(parts, lambda p: engine.process(p, target, mode))
    assert all(r.action != "failed" for r in results), results
    # Each partition's change is in the ledger exactly once: redone if the kill came before its
    # commit, reconciled if after, never done twice.
    assert changes_per_partition(rt) == dict.fromkeys(parts, 1)
    assert_all_under(rt, "customers", parts, target, source)


def prepared(make_key_class, vault, mode, rows=200, count=4, location=None, ledger_url=None):
    config = make_key_class(mode=mode, location=location)
    rt = runtime(config, vault, ledger_url)
    parts = days("2024-01-01", count)
    seed(rt, "customers", parts, rows=rows)
    target = rt.backend.rotate()
    update_reference(rt.name, target, rt.ledger, RunContext())
    return config, rt, parts, source_of(parts, rows), target


@pytest.mark.parametrize("case", range(10))
def test_sigkill_at_seeded_times(case, make_key_class, vault, openbao, tmp_path):
    """Kills that land anywhere, including inside pyarrow's writes and KMS calls; each proven to have landed
    mid-run: after the first checkpoint, before the run finished, with a partition not yet changed in the
    ledger. A kill that came after the run's end is tried again, sooner, on a fresh dataset."""
    rng = random.Random(2000 + case)
    mode = ("reencrypt", "rewrap")[case % 2]
    latest = 0.3 if mode == "reencrypt" else 0.04  # a run's length after its first checkpoint, measured here
    for attempt in range(5):
        config, rt, parts, source, target = prepared(make_key_class, vault, mode, rows=20_000, count=6,
                                                      location=tmp_path / f"try{attempt}",
                                                      ledger_url=f"sqlite:///{tmp_path / f'ledger{attempt}.db'}")
        proc = start_worker(config, openbao, rt.ledger.url, target, mode, "0", parts)
        assert proc.stdout.readline().strip() == "started"
        first = proc.stdout.readline().strip()
        assert first.startswith("checkpoint "), first
        time.sleep(rng.uniform(0.0, latest))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL and "finished" not in out and len(changes_per_partition(rt)) < len(parts):
            break
        latest /= 2
    else:
        pytest.fail(f"no kill landed mid-run in 5 attempts ({mode})")
    rerun_and_check(rt, parts, target, mode, source)


@pytest.fixture
def restartable_kms(tmp_path):
    server = OpenBaoFileServer(tmp_path / "bao", port=free_port(), log_path=str(tmp_path / "bao.log")).start()
    yield server
    server.stop()


def kms_runtime(config, server, ledger, attempts):
    backend = open_backend(config.key_class, server.client(), RetryPolicy(attempts=attempts, initial=0.2, maximum=2.0))
    return KeyClassRuntime(config, backend, ledger)


def test_kms_stopped_mid_run_and_started_again(make_key_class, vault, restartable_kms):
    config = make_key_class(mode="rewrap")
    rt = kms_runtime(config, restartable_kms, runtime(config, vault).ledger, attempts=30)
    parts = days("2024-02-01", 8)
    seed(rt, "customers", parts)
    target = rt.backend.rotate()
    expected = source_of(parts, 50)
    calls = []

    def outage(name):
        calls.append(name)
        if len(calls) == 4:  # after two partitions: stop the KMS, start it again 2 s later
            restartable_kms.stop()
            threading.Timer(2.0, restartable_kms.start).start()

    engine = rt.engine("customers", checkpoint=outage)
    started = time.monotonic()
    results = engine.run(parts, lambda p: engine.process(p, target, "rewrap"))
    assert [r.action for r in results] == ["rewrapped"] * 8
    assert time.monotonic() - started > 2.0  # the run did wait for the KMS
    assert_all_under(rt, "customers", parts, target, expected)


def test_kms_staying_down_fails_cleanly_and_a_rerun_completes(make_key_class, vault, restartable_kms):
    config = make_key_class(mode="rewrap")
    rt = kms_runtime(config, restartable_kms, runtime(config, vault).ledger, attempts=3)
    parts = days("2024-03-01", 3)
    seed(rt, "customers", parts)
    target = rt.backend.rotate()
    expected = source_of(parts, 50)
    restartable_kms.stop()
    engine = rt.engine("customers")
    results = engine.run(parts, lambda p: engine.process(p, target, "rewrap"))
    assert [r.action for r in results] == ["failed"] * 3
    assert "KMS unreachable" in results[0].error and "gave up after 3 attempts" in results[0].error
    assert restartable_kms.url in results[0].error and parts[0] in results[0].error
    assert len(rt.ledger.rows(events_in=(lg.PARTITION_FAILED,))) == 3
    restartable_kms.start()
    engine = rt.engine("customers")
    assert [r.action for r in engine.run(parts, lambda p: engine.process(p, target, "rewrap"))] == ["rewrapped"] * 3
    assert_all_under(rt, "customers", parts, target, expected)


def _file_hashes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_leaves_the_source_untouched(make_key_class, vault, small_disk):
    rt = runtime(make_key_class(mode="reencrypt", location=small_disk / "customers"), vault)
    parts = days("2024-04-01", 3)
    seed(rt, "customers", parts, rows=5_000)
    target = rt.backend.rotate()
    expected = source_of(parts, 5_000)
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    before = _file_hashes(small_disk / "customers")
    engine = rt.engine("customers")
    results = engine.run(parts, lambda p: engine.process(p, target, "reencrypt"))
    assert {r.action for r in results} == {"failed"}
    assert "No space left on device" in results[0].error and parts[0] in results[0].error
    assert_oracle(rt, "customers", expected, {target - 1})
    leftovers = set(_file_hashes(small_disk / "customers")) - set(before)
    assert all(".staging-" in name for name in leftovers)
    assert all(_file_hashes(small_disk / "customers")[k] == v for k, v in before.items())
    filler.unlink()
    engine = rt.engine("customers")
    assert {r.action for r in engine.run(parts, lambda p: engine.process(p, target, "reencrypt"))} == {"reencrypted"}
    assert_all_under(rt, "customers", parts, target, expected)


@pytest.mark.parametrize("mode", ["reencrypt", "rewrap"])
def test_permission_denied_leaves_the_source_untouched(make_key_class, vault, mode):
    config, rt, parts, expected, target = prepared(make_key_class, vault, mode)
    locked = Path(rt.store("customers").partition_dir(parts[1]))
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        before = _file_hashes(locked)
        engine = rt.engine("customers")
        results = engine.run(parts, lambda p: engine.process(p, target, mode))
        assert [r.action for r in results][0::2] == [("rewrapped", "reencrypted")[mode == "reencrypt"]] * 2
        assert results[1].action == "failed" and parts[1] in results[1].error
        assert "not permitted" in results[1].error or "Permission denied" in results[1].error
        assert _file_hashes(locked) == before
        assert [r["partition"] for r in rt.ledger.rows(events_in=(lg.PARTITION_FAILED,))] == [parts[1]]
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    engine = rt.engine("customers")
    assert [r.action for r in engine.run(parts, lambda p: engine.process(p, target, mode))][1] != "failed"
    assert_all_under(rt, "customers", parts, target, expected)
