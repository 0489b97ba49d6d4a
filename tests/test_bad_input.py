"""Bad input: each gives a clear error naming the partition or field, is recorded in the ledger as a
failure, never stops the other partitions and never modifies the bad one."""

from __future__ import annotations

import base64
import json
import shutil
import struct
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
import pytest

from helpers import days, runtime, seed
from keyrotation import ledger as lg
from keyrotation.errors import PartitionError
from keyrotation.formats.parquet_pme import key_material_path


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _material(rt, partition) -> Path:
    return Path(key_material_path(rt.store("customers").path(partition, "part-00001.parquet")))


def _truncate_parquet(rt, partition, _vault):
    path = Path(rt.store("customers").path(partition, "part-00001.parquet"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class _TransitUnwrapOnly(pe.KmsClient):
    """A KMS client of the test's own: unwraps keys by OpenBao Transit decrypt, to read a file's footer."""

    def __init__(self, vault, mount_point: str) -> None:
        super().__init__()
        self._vault, self._mount_point = vault, mount_point

    def wrap_key(self, key_bytes, master_key_identifier):
        raise AssertionError("the test only reads")

    def unwrap_key(self, wrapped_key, master_key_identifier):
        resp = self._vault.secrets.transit.decrypt_data(master_key_identifier, wrapped_key,
                                                        mount_point=self._mount_point)
        return base64.b64decode(resp["data"]["plaintext"])


def _encrypted_data_page_body(rt, path: Path, vault) -> tuple[str, int, int]:
    """An encrypted column's first data page's ciphertext (nonce and GCM tag excluded), located from the
    decrypted footer: the column name and the body's [start, end) in the file."""
    kc = rt.config.key_class
    factory = pe.CryptoFactory(lambda _config: _TransitUnwrapOnly(vault, kc.mount_point))
    properties = factory.file_decryption_properties(pe.KmsConnectionConfig(), pe.DecryptionConfiguration(),
                                                    str(path), pafs.LocalFileSystem())
    metadata = pq.ParquetFile(path, decryption_properties=properties).metadata
    assert metadata.num_row_groups == 1
    row_group = metadata.row_group(0)
    encrypted = rt.config.dataset("customers").encrypted_columns
    column = next(row_group.column(i) for i in range(row_group.num_columns)
                  if row_group.column(i).path_in_schema == encrypted[0])
    chunk_start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    chunk_end = chunk_start + column.total_compressed_size
    data = path.read_bytes()
    # An encrypted page is two modules, each a 4-byte little-endian length, then nonce (12), ciphertext and
    # GCM tag (16): first the page header, then the page.
    header_length = struct.unpack_from("<I", data, column.data_page_offset)[0]
    page = column.data_page_offset + 4 + header_length
    page_length = struct.unpack_from("<I", data, page)[0]
    start, end = page + 4 + 12, page + 4 + page_length - 16
    assert chunk_start <= column.data_page_offset < start < end <= chunk_end
    return column.path_in_schema, start, end


def _corrupt_parquet_pages(rt, partition, vault):
    """Flip bytes in the middle of an encrypted column's data page body; the footer and headers stay valid."""
    path = Path(rt.store("customers").path(partition, "part-00001.parquet"))
    column, start, end = _encrypted_data_page_body(rt, path, vault)
    assert column in rt.config.dataset("customers").encrypted_columns
    middle = (start + end) // 2
    data = bytearray(path.read_bytes())
    for i in range(max(start, middle - 4), min(end, middle + 4)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate_material(rt, partition, _vault):
    path = _material(rt, partition)
    path.write_text(path.read_text()[:40])


def _tamper_material(rt, partition, _vault):
    """Swap the wrapped KEK for another valid Transit ciphertext: decrypts, but to the wrong key."""
    path = _material(rt, partition)
    entries = {k: json.loads(v) for k, v in json.loads(path.read_text()).items()}
    other = rt.backend.wrap(b"\x00" * 16, 1)
    for material in entries.values():
        material["wrappedKEK"] = other
    path.write_text(json.dumps({k: json.dumps(v) for k, v in entries.items()}))


def _unknown_version(rt, partition, _vault):
    path = _material(rt, partition)
    path.write_text(path.read_text().replace("vault:v1:", "vault:v99:"))


def _empty_partition(rt, partition, _vault):
    directory = Path(rt.store("customers").partition_dir(partition))
    shutil.rmtree(directory)
    directory.mkdir()


# The error each case must give, whole: {partition} is the bad partition, {data} its data file, {material} that
# file's key material, {key_ref} the master key, and {versions} the versions the master key has.
CASES = {
    # name: (damage, mode, the error)
    "truncated parquet": (_truncate_parquet, "reencrypt",
                          "partition {partition}: {data}: Parquet magic bytes not found at the end of the file"),
    "corrupt parquet pages": (_corrupt_parquet_pages, "reencrypt",
                              "partition {partition}: cannot read part-00001.parquet: Failed decryption finalization"
                              " (file or key material altered, or protected by another key)"),
    "truncated key material": (_truncate_material, "rewrap",
                               "partition {partition}: {material}: key material is not valid (JSONDecodeError)"),
    "tampered key material": (_tamper_material, "reencrypt",
                              "partition {partition}: {material}: a data key does not authenticate under its KEK"),
    "unknown key version": (_unknown_version, "rewrap",
                            "partition {partition}: key material names version(s) [99] that the master key "
                            "'{key_ref}' does not have (it has {versions}): unknown key version"),
    "empty partition": (_empty_partition, "rewrap",
                        "partition {partition}: its manifest _PARTITION.json is missing and the ledger's last record "
                        "(partition_written, id {written_id}) names files ['part-00001.parquet'] that are not all "
                        "there: restore the manifest; nothing was changed"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_partition_fails_alone_clearly_and_untouched(case, make_key_class, vault):
    damage, mode, message = CASES[case]
    rt = runtime(make_key_class(mode=mode), vault)
    parts = days("2024-01-01", 3)
    seed(rt, "customers", parts)
    bad = parts[1]
    [written] = [r for r in rt.ledger.rows(events_in=(lg.PARTITION_WRITTEN,)) if r["partition"] == bad]
    damage(rt, bad, vault)
    bad_dir = Path(rt.store("customers").partition_dir(bad))
    before = _files(bad_dir)
    target = rt.backend.rotate()
    engine = rt.engine("customers")
    results = engine.run(parts, lambda p: engine.process(p, target, mode))
    assert [r.action for r in results][0::2] == ["rewrapped" if mode == "rewrap" else "reencrypted"] * 2
    failed = results[1]
    data = rt.store("customers").path(bad, "part-00001.parquet")
    expected = message.format(partition=bad, data=data, material=key_material_path(data),
                              key_ref=rt.config.key_class.key_ref, versions=f"v1, v{target}",
                              written_id=written["id"])
    assert failed.action == "failed"
    assert failed.error == expected
    assert _files(bad_dir) == before
    rows = rt.ledger.rows(events_in=(lg.PARTITION_FAILED,))
    assert [(r["partition"], r["status"]) for r in rows] == [(bad, "failed")]
    assert json.loads(rows[0]["detail"])["error"] == expected


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
