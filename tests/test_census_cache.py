"""The census at scale: one listing of the dataset, and censuses of unchanged partitions reused by plans and
pages (never by the gate), against a real OpenBao and the moto server's S3."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import aws_runtime, days, runtime, seed, seed_and_rotate
from keyrotation.formats.parquet_pme import key_material_path
from keyrotation.parquet_engine import ParquetEngine


@pytest.fixture
def reads(monkeypatch):
    """The partitions whose folder a census reads (every other one it took from the cache)."""
    seen: list[str] = []
    real = ParquetEngine.partition_census

    def counted(self, partition, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.append(partition)
        return real(self, partition, *args, **kwargs)

    monkeypatch.setattr(ParquetEngine, "partition_census", counted)
    return seen


def _material(rt, partition: str) -> Path:  # noqa: ANN001
    return Path(key_material_path(str(Path(rt.config.dataset("customers").location) / f"dt={partition}"
                                      / "part-00001.parquet")))


def _same(a, b) -> None:  # noqa: ANN001
    assert a.partitions == b.partitions and a.errors == b.errors


def test_a_reused_census_reads_only_the_partitions_that_changed(make_key_class, vault, reads):
    rt = runtime(make_key_class(mode="rewrap"), vault)
    parts = days("2024-03-01", 6)
    _, v2 = seed_and_rotate(rt, "customers", parts)
    engine = rt.engine("customers")
    engine.process(parts[0], v2, "rewrap")
    reads.clear()
    fresh = rt.census("customers")
    assert fresh.by_version() == {1: 5, v2: 1} and sorted(reads) == parts

    reads.clear()
    _same(rt.census("customers", reuse=True), fresh)
    assert reads == []
    v3 = rt.backend.rotate()  # a new version the KMS has: what the kept censuses name still holds
    _same(rt.census("customers", reuse=True), fresh)
    assert reads == []

    engine = rt.engine("customers")
    engine.process(parts[1], v3, "rewrap")
    (_material(rt, parts[2]).parent / "notes.txt").write_text("left by someone")
    reads.clear()
    reused = rt.census("customers", reuse=True)
    assert sorted(reads) == parts[1:3]
    assert reused.by_version() == {1: 4, v2: 1, v3: 1}
    assert [f.name for f in reused.partitions[parts[2]].unmanaged] == ["notes.txt"]
    _same(rt.census("customers"), reused)


def test_what_a_listing_cannot_see_the_ledger_or_any_fresh_census_does(make_key_class, vault, reads):
    """S3 dates objects to the second: a change of the same size in the same second lists the same. The engine's
    own changes are seen through the ledger's rows; a change made behind its back is seen by the next fresh
    census (the gate's, the one after a sweep), which the reused censuses then follow."""
    rt = runtime(make_key_class(mode="rewrap"), vault)
    parts = days("2024-04-01", 3)
    _, v2 = seed_and_rotate(rt, "customers", parts)
    rt.census("customers")

    material = _material(rt, parts[0])
    before = os.stat(material)
    rt.engine("customers").process(parts[0], v2, "rewrap")
    after = os.stat(material)
    assert after.st_size == before.st_size  # a rewrap changes the labels, not the length
    os.utime(material, ns=(before.st_atime_ns, before.st_mtime_ns))
    reads.clear()
    assert rt.census("customers", reuse=True).by_version() == {1: 2, v2: 1}
    assert reads == [parts[0]]

    forged = _material(rt, parts[1])
    stat = os.stat(forged)
    text = forged.read_text()
    assert "vault:v1:" in text
    forged.write_text(text.replace("vault:v1:", "vault:v9:"))  # the label only: same length
    assert os.stat(forged).st_size == stat.st_size
    os.utime(forged, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    gate = rt.censuses()[0]  # what the census sensor and the retirement read: never the kept censuses
    assert "unknown key version" in gate.errors[parts[1]] and parts[1] not in gate.partitions
    reads.clear()
    reused = rt.census("customers", reuse=True)
    assert "unknown key version" in reused.errors[parts[1]] and reads == [parts[1]]


def test_on_s3_one_listing_gives_the_census_partition_by_partition_gives(make_aws_key_class, moto):
    config = make_aws_key_class("census_s3", dataset="customers")
    rt = aws_runtime(config, moto)
    parts = days("2024-05-01", 4)
    v1 = seed(rt, "customers", parts, rows=10)
    bucket, prefix = config.datasets[0].location.removeprefix("s3://").split("/", 1)
    s3 = moto.client("s3")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/dt={parts[1]}/notes.txt", Body=b"x")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/dt={parts[2]}/sub/part-9.parquet", Body=b"x")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/dt={parts[3]}/.staging-part-00002.parquet", Body=b"x")

    one_by_one = rt.census("customers", partitions=parts)
    listed = rt.census("customers")
    _same(listed, one_by_one)
    assert listed.by_version() == {v1: 4}
    assert [f.name for f in listed.partitions[parts[1]].unmanaged] == ["notes.txt"]
    assert [f.describe() for f in listed.partitions[parts[2]].unmanaged] == ["sub (not a Parquet file)"]
    assert listed.partitions[parts[3]].leftovers == (".staging-part-00002.parquet",)

    log = Path(moto.log_path)
    start = log.stat().st_size
    _same(rt.census("customers", reuse=True), listed)
    requests = log.read_bytes()[start:].decode(errors="replace")
    reads_of_objects = [line for line in requests.splitlines() if f"/{bucket}/{prefix}/dt=" in line]
    assert reads_of_objects == [] and f"/{bucket}" in requests  # the listing only
