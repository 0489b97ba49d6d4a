"""Fault injection against real servers; every case ends with every partition decrypting to its
original digest, and the old key version retired.

- SIGKILL of the re-encryption process at seeded checkpoints (staged data and key material,
  material rename, data rename, manifest commit, cleanup, ledger write) and at seeded times;
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

import pytest

from helpers import days, partition_digests, runtime, seed_and_rotate
from keyrotation import ledger as lg
from keyrotation.backends.retry import RetryPolicy
from keyrotation.backends.vault_transit import VaultTransitBackend
from keyrotation.devserver import OpenBaoFileServer, free_port
from keyrotation.ledger import RunContext
from keyrotation.rotation import update_reference
from keyrotation.runtime import KeyClassRuntime

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fault_worker.py")
CHECKPOINTS_PER_PARTITION = {"reencrypt": 6, "rewrap": 2}
pytestmark = pytest.mark.faults


def assert_all_under(rt, dataset, partitions, version, expected):
    """Every partition is under ``version`` only, and still decrypts once older versions are retired."""
    assert rt.census(dataset).by_version() == {version: len(partitions)}
    rt.backend.retire_below(version)
    assert partition_digests(rt, dataset, partitions) == expected


def changes_per_partition(rt) -> dict[str, int]:
    rows = rt.ledger.rows(events_in=(lg.PARTITION_REWRAPPED, lg.PARTITION_REENCRYPTED, lg.PARTITION_RECONCILED))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["partition"]] = counts.get(row["partition"], 0) + 1
    return counts


def start_worker(config, openbao, ledger_url, target, mode, kill_at, parts):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), str(ROOT / "tests")])}
    return subprocess.Popen(
        [sys.executable, str(WORKER), config.source, openbao.url, openbao.token, ledger_url, "customers",
         str(target), mode, str(kill_at), *parts],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def rerun_and_check(rt, parts, target, mode, expected):
    # Right after the kill, before any repair, every partition still decrypts to its original content.
    assert partition_digests(rt, "customers", parts) == expected
    engine = rt.engine("customers")
    results = engine.run(parts, lambda p: engine.process(p, target, mode))
    assert all(r.action != "failed" for r in results), results
    # Each partition's change is in the ledger exactly once: redone if the kill came before its
    # commit, reconciled if after, never done twice.
    assert changes_per_partition(rt) == dict.fromkeys(parts, 1)
    assert_all_under(rt, "customers", parts, target, expected)


def prepared(make_key_class, vault, mode, rows=200, count=4):
    config = make_key_class(mode=mode)
    rt = runtime(config, vault)
    parts = days("2024-01-01", count)
    expected, target = seed_and_rotate(rt, "customers", parts, rows=rows)
    update_reference(rt.name, target, rt.ledger, RunContext())
    return config, rt, parts, expected, target


@pytest.mark.parametrize("case", range(20))
def test_sigkill_at_seeded_checkpoints(case, make_key_class, vault, openbao):
    rng = random.Random(1000 + case)
    mode = ("reencrypt", "rewrap")[case % 2]
    config, rt, parts, expected, target = prepared(make_key_class, vault, mode)
    kill_at = rng.randint(1, CHECKPOINTS_PER_PARTITION[mode] * len(parts))
    proc = start_worker(config, openbao, rt.ledger.url, target, mode, kill_at, parts)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out
    assert f"killing at checkpoint {kill_at}" in out
    rerun_and_check(rt, parts, target, mode, expected)


@pytest.mark.parametrize("case", range(10))
def test_sigkill_at_seeded_times(case, make_key_class, vault, openbao):
    """Kills that land anywhere, including inside pyarrow's writes and KMS calls."""
    rng = random.Random(2000 + case)
    mode = ("reencrypt", "rewrap")[case % 2]
    config, rt, parts, expected, target = prepared(make_key_class, vault, mode, rows=20_000, count=6)
    proc = start_worker(config, openbao, rt.ledger.url, target, mode, 0, parts)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(rng.uniform(0.0, 0.6 if mode == "reencrypt" else 0.15))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    rerun_and_check(rt, parts, target, mode, expected)


@pytest.fixture
def restartable_kms(tmp_path):
    server = OpenBaoFileServer(tmp_path / "bao", port=free_port(), log_path=str(tmp_path / "bao.log")).start()
    yield server
    server.stop()


def kms_runtime(config, server, ledger, attempts):
    backend = VaultTransitBackend(server.client(), config.key_class.key_ref,
                                  retry=RetryPolicy(attempts=attempts, initial=0.2, maximum=2.0))
    return KeyClassRuntime(config, backend, ledger)


def test_kms_stopped_mid_run_and_started_again(make_key_class, vault, restartable_kms):
    config = make_key_class(mode="rewrap")
    rt = kms_runtime(config, restartable_kms, runtime(config, vault).ledger, attempts=30)
    parts = days("2024-02-01", 8)
    expected, target = seed_and_rotate(rt, "customers", parts)
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
    expected, target = seed_and_rotate(rt, "customers", parts)
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
    expected, target = seed_and_rotate(rt, "customers", parts, rows=5_000)
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
    assert partition_digests(rt, "customers", parts) == expected
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
