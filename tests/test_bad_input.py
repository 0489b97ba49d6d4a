"""Bad input: each gives a clear error naming the partition or field, is recorded in the ledger as a
failure, never stops the other partitions and never modifies the bad one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import days, runtime, seed
from keyrotation import ledger as lg
from keyrotation.errors import PartitionError
from keyrotation.formats.parquet_pme import key_material_path


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _material(rt, partition) -> Path:
    return Path(key_material_path(rt.store("customers").path(partition, "part-00001.parquet")))


def _truncate_parquet(rt, partition):
    path = Path(rt.store("customers").path(partition, "part-00001.parquet"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_parquet_pages(rt, partition):
    path = Path(rt.store("customers").path(partition, "part-00001.parquet"))
    data = bytearray(path.read_bytes())
    for i in range(100, 400):  # flip bytes inside the encrypted column chunks; the footer stays valid
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate_material(rt, partition):
    path = _material(rt, partition)
    path.write_text(path.read_text()[:40])


def _tamper_material(rt, partition):
    """Swap the wrapped KEK for another valid Transit ciphertext: decrypts, but to the wrong key."""
    path = _material(rt, partition)
    entries = {k: json.loads(v) for k, v in json.loads(path.read_text()).items()}
    other = rt.backend.wrap(b"\x00" * 16, 1)
    for material in entries.values():
        material["wrappedKEK"] = other
    path.write_text(json.dumps({k: json.dumps(v) for k, v in entries.items()}))


def _unknown_version(rt, partition):
    path = _material(rt, partition)
    path.write_text(path.read_text().replace("vault:v1:", "vault:v99:"))


def _empty_partition(rt, partition):
    directory = Path(rt.store("customers").partition_dir(partition))
    shutil.rmtree(directory)
    directory.mkdir()


CASES = {
    # name: (damage, mode, expected words in the error)
    "truncated parquet": (_truncate_parquet, "reencrypt", "parquet"),
    "corrupt parquet pages": (_corrupt_parquet_pages, "reencrypt", ""),
    "truncated key material": (_truncate_material, "rewrap", "key material is not valid"),
    "tampered key material": (_tamper_material, "reencrypt", ""),
    "unknown key version": (_unknown_version, "rewrap", "unknown key version"),
    "empty partition": (_empty_partition, "rewrap", "its manifest _PARTITION.json is missing and the ledger's last "
                                                    "record (partition_written,"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_partition_fails_alone_clearly_and_untouched(case, make_key_class, vault):
    damage, mode, words = CASES[case]
    rt = runtime(make_key_class(mode=mode), vault)
    parts = days("2024-01-01", 3)
    seed(rt, "customers", parts)
    bad = parts[1]
    damage(rt, bad)
    bad_dir = Path(rt.store("customers").partition_dir(bad))
    before = _files(bad_dir)
    target = rt.backend.rotate()
    engine = rt.engine("customers")
    results = engine.run(parts, lambda p: engine.process(p, target, mode))
    assert [r.action for r in results][0::2] == ["rewrapped" if mode == "rewrap" else "reencrypted"] * 2
    failed = results[1]
    assert failed.action == "failed" and bad in failed.error
    assert words.lower() in failed.error.lower()
    assert _files(bad_dir) == before
    rows = rt.ledger.rows(events_in=(lg.PARTITION_FAILED,))
    assert [(r["partition"], r["status"]) for r in rows] == [(bad, "failed")]
    assert bad in json.loads(rows[0]["detail"])["error"]


def test_wrong_key_class_for_a_dataset_is_refused_and_recorded(make_key_class, vault):
    owner = runtime(make_key_class(name="owner", mode="rewrap"), vault)
    parts = days("2024-02-01", 2)
    seed(owner, "customers", parts)
    before = {p: _files(Path(owner.store("customers").partition_dir(p))) for p in parts}
    intruder = runtime(make_key_class(name="intruder", mode="rewrap",
                                      location=owner.config.dataset("customers").location), vault)
    intruder.backend.create_key()
    target = intruder.backend.rotate()
    engine = intruder.engine("customers")
    results = engine.run(parts, lambda p: engine.process(p, target, "rewrap"))
    assert {r.action for r in results} == {"failed"}
    assert all("protected by master key" in r.error and owner.config.key_class.key_ref in r.error for r in results)
    assert {p: _files(Path(owner.store("customers").partition_dir(p))) for p in parts} == before
    assert len(intruder.ledger.rows(events_in=(lg.PARTITION_FAILED,))) == 2


def test_missing_dataset_location_is_named_and_recorded(make_key_class, vault, tmp_path):
    from keyrotation_airflow.operators.reencrypt import PlanReencryptionOperator

    rt = runtime(make_key_class(name="lost", location=tmp_path / "nowhere"), vault)
    rt.backend.create_key()
    with pytest.raises(PartitionError, match="dataset location .*nowhere does not exist"):
        rt.census("customers")

    class TI:
        dag_id, run_id, task_id, try_number = "reencrypt__customers", "manual__1", "plan", 1

    plan = PlanReencryptionOperator(task_id="plan", key_class="lost", dataset="customers", scope="sweep")
    with pytest.raises(PartitionError, match="nowhere does not exist"):
        plan.execute({"ti": TI(), "dag_run": None})
    [row] = rt.ledger.rows(events_in=(lg.PARTITION_FAILED,))
    assert row["dataset"] == "customers" and "nowhere does not exist" in json.loads(row["detail"])["error"]
