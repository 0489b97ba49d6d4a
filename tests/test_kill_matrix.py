"""Issue 18, item 2: the kill matrix, exact. Every checkpoint of the commit protocol, listed from the code,
is killed (SIGKILL, the process kills itself there) for ``rewrap`` and ``reencrypt``, with the dataset on local
disk, in S3 (moto server) and in GCS (emulator). Each kill is proven to have landed mid-run: the checkpoints
the process passed are exactly the first partition's and the second's up to the kill point, the first
partition is changed in the ledger and the third is not. Then, with ``tests/oracle.py`` (no product code)
comparing every partition with the source the test generated: right after the kill, after the re-run, and
after the old version is retired.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs
import pytest
from oracle import TransitKms, assert_source, changes_per_partition

from helpers import customers, days, seed
from keyrotation.backends.registry import open_backend
from keyrotation.ledger import Ledger, RunContext
from keyrotation.rotation import update_reference
from keyrotation.runtime import KeyClassRuntime
from keyrotation.stores.filesystems import AwsCredentials, GcpCredentials, Storage

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fault_worker.py")
CODE = (ROOT / "include" / "keyrotation" / "parquet_engine.py",
        ROOT / "include" / "keyrotation" / "formats" / "parquet_pme.py")
#: The checkpoints one partition passes, in order, per mode (checked against the code and a run below).
MODES = {
    "reencrypt": ["staged", "staging_recorded", "material_moved", "data_moved", "committed", "cleaned", "recorded"],
    "rewrap": ["material_staged", "rewrapped_file", "recorded"],
}
MATRIX = [(mode, point) for mode, points in MODES.items() for point in points]
STORES = ("local", "s3", "gcs")
PARTS = days("2024-01-01", 3)
#: The batched KEK rotation (``process_many``) of the three partitions: each one's key material written in turn
#: (after one KMS request for all their KEKs), then their ledger rows together.
BATCHED = ["material_staged", "rewrapped_file"] * len(PARTS) + ["recorded"] * len(PARTS)
ROWS = 150
pytestmark = pytest.mark.faults


@dataclass
class Place:
    """Where a dataset lives, as the product's runtime reaches it and as the oracle reads it."""

    location: str
    storage: Storage | None
    spec: dict  # $FAULT_STORAGE of the worker
    fs: pafs.FileSystem
    root: str


def _place(store: str, tmp_path: Path, request) -> Place:  # noqa: ANN001
    if store == "local":
        return Place(str(tmp_path / "data" / "customers"), None, {}, pafs.LocalFileSystem(),
                     str(tmp_path / "data" / "customers"))
    bucket = f"kill-{secrets.token_hex(4)}"
    if store == "s3":
        moto = request.getfixturevalue("moto")
        moto.client("s3").create_bucket(Bucket=bucket)
        aws = {"access_key": moto.access_key, "secret_key": moto.secret_key, "region_name": moto.region,
               "endpoint_url": moto.url}
        url = urlparse(moto.url)
        fs = pafs.S3FileSystem(access_key=moto.access_key, secret_key=moto.secret_key, region=moto.region,
                               endpoint_override=url.netloc, scheme=url.scheme)
        return Place(f"s3://{bucket}/customers", Storage(AwsCredentials(**aws)), {"aws": aws}, fs,
                     f"{bucket}/customers")
    gcp = request.getfixturevalue("gcp")
    gcp.gcs.create_bucket(bucket)
    spec = {"project": gcp.project, "storage_endpoint": gcp.gcs.url}
    url = urlparse(gcp.gcs.url)
    fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=url.netloc, scheme=url.scheme, project_id=gcp.project)
    return Place(f"gs://{bucket}/customers", Storage(gcp=GcpCredentials(**spec)), {"gcp": spec}, fs,
                 f"{bucket}/customers")


def _oracle(place: Place, kms: TransitKms, source: dict, versions: set[int]) -> None:
    assert_source(place.root, kms, source, versions, place.fs)


def _changed(ledger: Ledger) -> dict[str, int]:
    return changes_per_partition(ledger.url.removeprefix("sqlite:///"))


def _worker(config, openbao, ledger_url: str, target: int, mode: str, kill_at: str,  # noqa: ANN001
            place: Place) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), str(ROOT / "tests")]),
           "FAULT_STORAGE": json.dumps(place.spec)}
    done = subprocess.run([sys.executable, str(WORKER), config.source, openbao.url, openbao.token, ledger_url,
                           "customers", str(target), mode, kill_at, *PARTS], env=env, capture_output=True,
                          text=True, timeout=180)
    return done.returncode, done.stdout + done.stderr


def _prepared(make_key_class, vault, mode: str, place: Place):  # noqa: ANN001, ANN202
    config = make_key_class(mode=mode, location=place.location)
    kc = config.key_class
    rt = KeyClassRuntime(config, open_backend(kc, vault), Ledger(),
                         **({"storage": lambda _ds: place.storage} if place.storage else {}))
    seed(rt, "customers", PARTS, rows=ROWS)
    source = {p: customers(p, ROWS) for p in PARTS}
    target = rt.backend.rotate()
    update_reference(rt.name, target, rt.ledger, RunContext(actor="test"))
    return config, rt, source, target


def test_the_matrix_is_every_checkpoint_of_the_code_in_the_order_a_run_passes_them(make_key_class, vault, openbao,
                                                                                  tmp_path, request):
    in_code = {name for path in CODE for name in re.findall(r'checkpoint\("(\w+)"\)', path.read_text())}
    assert {p for points in MODES.values() for p in points} == in_code
    for mode in MODES:
        place = _place("local", tmp_path / mode, request)
        config, rt, source, target = _prepared(make_key_class, vault, mode, place)
        code, out = _worker(config, openbao, rt.ledger.url, target, mode, "0", place)
        assert code == 0 and out.splitlines()[-1] == "finished", out
        assert [line.split()[1] for line in out.splitlines() if line.startswith("checkpoint ")] == \
            MODES[mode] * len(PARTS)
    place = _place("local", tmp_path / "rewrap_many", request)
    config, rt, source, target = _prepared(make_key_class, vault, "rewrap", place)
    code, out = _worker(config, openbao, rt.ledger.url, target, "rewrap_many", "0", place)
    assert code == 0 and out.splitlines()[-1] == "finished", out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("checkpoint ")] == BATCHED
    assert set(BATCHED) == set(MODES["rewrap"])


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize(("mode", "point"), MATRIX, ids=[f"{m}-{p}" for m, p in MATRIX])
def test_a_kill_at_each_checkpoint_loses_nothing_before_and_after_retirement(store, mode, point, make_key_class,
                                                                              vault, openbao, tmp_path, request):
    place = _place(store, tmp_path, request)
    config, rt, source, target = _prepared(make_key_class, vault, mode, place)
    kms = TransitKms(openbao.url, openbao.token)
    code, out = _worker(config, openbao, rt.ledger.url, target, mode, f"{point}#2", place)
    assert code == -signal.SIGKILL and f"killing at {point}#2" in out and "finished" not in out, out
    # Landed mid-run: all of the first partition's checkpoints, the second's up to the kill point, and the ledger
    # has the first partition changed and the third untouched.
    passed = [line.split()[1] for line in out.splitlines() if line.startswith("checkpoint ")]
    assert passed == MODES[mode] + MODES[mode][: MODES[mode].index(point) + 1]
    changed = _changed(rt.ledger)
    assert PARTS[0] in changed and PARTS[2] not in changed, changed
    _oracle(place, kms, source, {target - 1, target})  # nothing lost before any repair

    engine = rt.engine("customers")
    results = engine.run(PARTS, lambda p: engine.process(p, target, mode))
    assert [r.action for r in results if r.action == "failed"] == [], results
    assert _changed(rt.ledger) == dict.fromkeys(PARTS, 1)  # each change recorded once: redone or reconciled
    _oracle(place, kms, source, {target})
    rt.backend.retire_below(target)
    _oracle(place, kms, source, {target})  # nothing the kill left needs the retired version


@pytest.mark.parametrize("store", ("local", "s3"))
@pytest.mark.parametrize("point", MODES["rewrap"])
def test_a_kill_in_a_batched_rewrap_loses_nothing_before_and_after_retirement(point, store, make_key_class, vault,
                                                                             openbao, tmp_path, request):
    """The batched path (a chunk's KEKs re-wrapped in one KMS request, then each partition's key material written
    as one by one): killed at the second pass of each checkpoint, on local disk and in S3."""
    place = _place(store, tmp_path, request)
    config, rt, source, target = _prepared(make_key_class, vault, "rewrap", place)
    kms = TransitKms(openbao.url, openbao.token)
    code, out = _worker(config, openbao, rt.ledger.url, target, "rewrap_many", f"{point}#2", place)
    assert code == -signal.SIGKILL and f"killing at {point}#2" in out and "finished" not in out, out
    passed = [line.split()[1] for line in out.splitlines() if line.startswith("checkpoint ")]
    kill = [i for i, name in enumerate(BATCHED) if name == point][1]
    assert passed == BATCHED[: kill + 1]
    # The chunk's rows are written together after its key material: none before, all at the second "recorded".
    assert _changed(rt.ledger) == ({} if point != "recorded" else dict.fromkeys(PARTS, 1))
    _oracle(place, kms, source, {target - 1, target})  # nothing lost before any repair

    engine = rt.engine("customers")
    results = engine.process_many(PARTS, target, "rewrap")
    assert [r.action for r in results if r.action == "failed"] == [], results
    assert _changed(rt.ledger) == dict.fromkeys(PARTS, 1)  # each change recorded once: redone or reconciled
    _oracle(place, kms, source, {target})
    rt.backend.retire_below(target)
    _oracle(place, kms, source, {target})  # nothing the kill left needs the retired version
