"""Safety (issue 15): the gate opens only on positive proof, and no sweep deletes, decrypts or weakens what
it did not write. Each case is a hostile tester's reproduction, against the real OpenBao and the real DAGs
(``dag.test()``) or the engine the DAGs run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dag_runs import key_class_dags as _dags
from dag_runs import seed_and_rotate_through_dags, task_context
from dag_runs import state as _state
from helpers import CANARY, customers, days, runtime, seed, sweep
from keyrotation import ledger as lg
from keyrotation.errors import RetirementRefused
from keyrotation.ledger import RunContext
from keyrotation.retirement import plan_retirement, retire
from keyrotation.rotation import update_reference
from keyrotation.stores.partitions import MANIFEST

pytestmark = pytest.mark.airflow


def _folder(rt, dataset: str, partition: str) -> Path:
    return Path(rt.config.dataset(dataset).location) / f"dt={partition}"


def _material(folder: Path) -> Path:
    [path] = folder.glob("_KEY_MATERIAL_FOR_part-*.json")
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _rotated(make_key_class, vault, name: str, parts: list[str], **kwargs):
    rt = runtime(make_key_class(name=name, dataset=f"{name}_data", **kwargs), vault)
    seed(rt, f"{name}_data", parts)
    v2 = rt.backend.rotate()
    update_reference(rt.name, v2, rt.ledger, RunContext(actor="test"))
    return rt, f"{name}_data", v2


def _refused(rt, v2: int, match: str) -> None:
    plan = plan_retirement(rt.config.key_class, rt.backend.key_state(), v2)
    with pytest.raises(RetirementRefused, match=match):
        retire(rt.backend, rt.config.key_class, plan, rt.censuses(), rt.ledger, RunContext())
    assert rt.backend.key_state().min_decryption_version == 1


# -- 1. positive proof -----------------------------------------------------------------------------

def test_a_partition_labelled_with_a_version_the_kms_lacks_blocks_the_sweep_and_the_gate(
        make_key_class, vault, airflow_db):
    """The reproduction: `vault:v1:` replaced by `vault:v99:` in one partition's key material."""
    rt = runtime(make_key_class(name="lbl", dataset="lbl_data"), vault)
    dags = _dags("lbl")
    parts = days("2024-03-01", 4)
    seed_and_rotate_through_dags(rt, dags, "lbl_data", parts)
    material = _material(_folder(rt, "lbl_data", parts[1]))
    original = material.read_text()
    assert "vault:v1:" in original
    material.write_text(original.replace("vault:v1:", "vault:v99:"))

    census = rt.census("lbl_data")
    assert census.errors == {parts[1]: f"partition {parts[1]}: key material names version(s) [99] that the master "
                                       f"key {rt.config.key_class.key_ref!r} does not have (it has v1, v2): unknown "
                                       "key version"}
    swept = dags["reencrypt__lbl_data"].test(run_conf={"scope": "sweep", "dry_run": False})
    assert _state(swept) == "failed"
    failed = rt.ledger.rows(events_in=(lg.PARTITION_FAILED,))
    assert [(r["partition"], "unknown key version" in r["detail"]) for r in failed] == [(parts[1], True)]
    assert sorted(rt.census("lbl_data").partitions) == [parts[0], *parts[2:]]
    # The retire DAG's census gate keeps waiting, and its retire task refuses, with the reason.
    from airflow.sdk.exceptions import AirflowFailException

    from keyrotation_airflow.operators.retire import RetireKeyVersionsOperator
    from keyrotation_airflow.sensors.census import CensusGateSensor

    assert CensusGateSensor(task_id="census_gate", key_class="lbl").poke({}).is_done is False
    with pytest.raises(AirflowFailException, match=f"1 partitions unreadable or blocking, .*{parts[1]}: partition "
                                                   f"{parts[1]}: key material names version\\(s\\) \\[99\\]"):
        retire_task = RetireKeyVersionsOperator(task_id="retire_versions", key_class="lbl")
        retire_task.execute(task_context("retire__lbl", "retire_versions"))
    assert rt.backend.key_state().min_decryption_version == 1
    refusal = json.loads(rt.ledger.rows(events_in=(lg.RETIREMENT_REFUSED,))[-1]["detail"])
    assert any("unknown key version" in r for r in refusal["reasons"])

    material.write_text(original)  # the data really is under v1: with its label back, it decrypts and rewraps
    assert _state(dags["reencrypt__lbl_data"].test(run_conf={"scope": "sweep", "dry_run": False})) == "success"
    assert _state(dags["retire__lbl"].test()) == "success"
    assert rt.backend.key_state().min_decryption_version == 2
    assert rt.census("lbl_data").by_version() == {2: 4}


def test_a_label_moved_to_an_existing_version_is_caught_by_the_kms(make_key_class, vault):
    """`vault:v1:` relabelled `vault:v2:`: the census believes v2, the KMS does not; retirement stays shut."""
    rt, ds, v2 = _rotated(make_key_class, vault, "relbl", days("2024-03-01", 3))
    sweep(rt, ds, v2)
    target = days("2024-03-01", 3)[2]
    material = _material(_folder(rt, ds, target))
    # Put a v1 ciphertext in the v2 file's place, under a v2 label: an attacker, or a buggy tool.
    v1_kek = rt.backend.wrap(b"k" * 32, 1).removeprefix("vault:v1:")
    entries = {k: json.loads(v) for k, v in json.loads(material.read_text()).items()}
    for entry in entries.values():
        entry["wrappedKEK"] = "vault:v2:" + v1_kek
    material.write_text(json.dumps({k: json.dumps(v) for k, v in entries.items()}))
    assert rt.census(ds).by_version() == {2: 3}  # the labels alone look fine

    _refused(rt, v2, f"1 partitions not proven under v2 or newer by a validation in the ledger .*{target}: its key "
                     "material changed since it was validated")
    results = sweep(rt, ds, v2, partitions=[target])  # what the next sweep does with it: the KMS refuses
    assert [(r.action, "decrypt" in (r.error or "")) for r in results] == [("failed", True)]
    _refused(rt, v2, f"1 partitions not proven under v2 or newer by a validation in the ledger .*{target}: its last "
                     "validation failed: Transit key .* decrypt \\(ciphertext version v2\\) failed: cipher: message "
                     "authentication failed")


def test_a_flipped_byte_or_a_missing_data_file_keeps_the_gate_shut_in_rewrap_mode(make_key_class, vault):
    parts = days("2024-03-01", 3)
    rt, ds, v2 = _rotated(make_key_class, vault, "flip", parts)
    data = _folder(rt, ds, parts[0]) / "part-00001.parquet"
    opened = rt.pme(ds).open(str(data), rt.store(ds).fs)
    names = opened.schema_arrow.names
    chunk = opened.metadata.row_group(0).column(names.index("email"))  # an encrypted column's pages
    opened.close()
    raw = bytearray(data.read_bytes())
    raw[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    (_folder(rt, ds, parts[1]) / "part-00001.parquet").unlink()  # its key material stays: orphan

    results = {r.partition: r for r in sweep(rt, ds, v2)}
    assert results[parts[0]].action == "failed"  # rewrap succeeded (data untouched); validation did not
    assert [r["partition"] for r in rt.ledger.rows(events_in=(lg.VALIDATION_FAILED,))] == [parts[0]]
    census = rt.census(ds)
    assert census.errors[parts[1]] == (f"partition {parts[1]}: data file part-00001.parquet named by the manifest is "
                                       "missing (its key material is still there)")
    failed = [r["partition"] for r in rt.ledger.rows(events_in=(lg.PARTITION_FAILED,))]
    assert failed == [parts[1]]
    _refused(rt, v2, f"1 partitions unreadable or blocking, .*{parts[1]}: partition {parts[1]}: data file "
                     f"part-00001.parquet named by the manifest is missing")
    _refused(rt, v2, f"1 partitions not proven under v2 or newer .*{parts[0]}: its last validation failed")


# -- 2. never delete what the engine did not write -------------------------------------------------

def test_files_the_engine_did_not_write_are_reported_left_in_place_and_block_retirement(
        make_key_class, vault, tmp_path, caplog):
    from keyrotation.client import InvalidInput, KeyRotationClient

    parts = days("2024-04-01", 2)
    rt = runtime(make_key_class(name="stray", dataset="stray_data"), vault)
    ds = "stray_data"
    seed(rt, ds, parts)
    folder = _folder(rt, ds, parts[0])
    pq.write_table(customers(parts[0], 5), folder / "extra.parquet")  # a stray plain file
    (folder / "_SUCCESS").write_text("")
    client = KeyRotationClient(rt.backend, rt.ledger, key_class=rt.name, encrypted_columns=["email", "ssn"])
    # The client refuses to write into a partition the DAGs manage...
    with pytest.raises(InvalidInput, match=f"refusing to write into a partition the keyrotation DAGs manage "
                                           f"\\(its folder holds {MANIFEST}\\)"):
        client.write_parquet(customers(parts[0], 5), str(folder / "app.parquet"))
    assert not (folder / "app.parquet").exists()
    # ... so an application that writes elsewhere (under v1) and copies the file in leaves an unmanaged file.
    elsewhere = tmp_path / "app" / "app.parquet"
    elsewhere.parent.mkdir()
    assert client.write_parquet(customers(parts[0], 5), str(elsewhere)) == 1
    v2 = rt.backend.rotate()
    update_reference(rt.name, v2, rt.ledger, RunContext(actor="test"))
    for f in elsewhere.parent.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    before = _files(folder)
    unmanaged = {"extra.parquet", "_SUCCESS", "app.parquet", "_KEY_MATERIAL_FOR_app.parquet.json"}
    assert unmanaged <= set(before)

    caplog.set_level(logging.INFO)
    assert {r.action for r in sweep(rt, ds, v2)} == {"validated"}
    after = _files(folder)
    assert {n: after[n] for n in unmanaged} == {n: before[n] for n in unmanaged}  # byte for byte
    census = rt.census(ds)
    described = sorted(f.describe() for f in census.partitions[parts[0]].unmanaged)
    assert described == ["_SUCCESS (not a Parquet file)", "app.parquet (under v1)", "extra.parquet (not encrypted)"]
    assert "3 unmanaged files (left in place)" in census.format()
    _refused(rt, v2, f"2 unmanaged files \\(not in a manifest; left in place\\) under versions below v2 or of "
                     f"unknown protection: {parts[0]}/app.parquet: under v1; {parts[0]}/extra.parquet: not encrypted")
    assert not [r for r in rt.ledger.rows(events_in=(lg.PARTITION_CLEANED,)) if r["partition"] == parts[0]]

    for name in unmanaged - {"_SUCCESS"}:  # the operator moves them out: the gate opens
        (folder / name).unlink()
    plan = plan_retirement(rt.config.key_class, rt.backend.key_state(), v2)
    assert retire(rt.backend, rt.config.key_class, plan, rt.censuses(), rt.ledger,
                  RunContext()).min_decryption_version == 2


def test_a_deleted_manifest_is_rebuilt_from_the_ledger_with_a_word(make_key_class, vault, caplog):
    parts = days("2024-04-01", 2)
    rt, ds, v2 = _rotated(make_key_class, vault, "nomani", parts)
    (_folder(rt, ds, parts[0]) / MANIFEST).unlink()
    caplog.set_level(logging.WARNING)
    assert {r.action for r in sweep(rt, ds, v2)} == {"validated"}
    assert f"partition {parts[0]}: manifest missing: rebuilt from the ledger's last record ['part-00001.parquet']" \
        in caplog.text
    rebuilt = rt.ledger.rows(events_in=(lg.MANIFEST_REBUILT,))
    assert [(r["partition"], json.loads(r["detail"])) for r in rebuilt] == [
        (parts[0], {"files": ["part-00001.parquet"]})]


# -- 3. a crash right after the commit is finished by the next run ---------------------------------

class _Crash(BaseException):
    pass


def test_a_crash_right_after_the_commit_is_finished_by_the_next_sweep(make_key_class, vault, airflow_db):
    config = make_key_class(name="crash", dataset="crash_data", mode="reencrypt")
    rt = runtime(config, vault)
    dags = _dags("crash")
    parts = days("2024-05-01", 3)
    seed_and_rotate_through_dags(rt, dags, "crash_data", parts)

    def crash(step: str) -> None:
        if step == "committed":
            raise _Crash

    with pytest.raises(_Crash):
        rt.engine("crash_data", checkpoint=crash).process(parts[0], 2, "reencrypt")
    folder = _folder(rt, "crash_data", parts[0])
    assert {"part-00001.parquet", "part-00002.parquet"} <= set(_files(folder))  # both generations on disk
    assert json.loads((folder / MANIFEST).read_text())["files"] == ["part-00002.parquet"]
    assert rt.census("crash_data").under(2) == parts[1:]  # the census already counts it as done

    assert _state(dags["reencrypt__crash_data"].test(run_conf={"scope": "sweep", "dry_run": False})) == "success"
    assert sorted(_files(folder)) == ["_KEY_MATERIAL_FOR_part-00002.parquet.json", MANIFEST, "part-00002.parquet"]
    cleaned = {r["partition"]: json.loads(r["detail"])["removed"] for r in rt.ledger.rows(events_in=(
        lg.PARTITION_CLEANED,))}  # the crashed one by the repair, the others when their new generation committed
    assert cleaned == dict.fromkeys(parts, ["_KEY_MATERIAL_FOR_part-00001.parquet.json", "part-00001.parquet"])
    rows = [r for r in rt.ledger.rows(dataset="crash_data") if r["partition"] == parts[0]]
    events = [r["event"] for r in rows if r["event"] in (*lg.PARTITION_CHANGES, lg.PARTITION_VALIDATED)]
    assert events == [lg.PARTITION_WRITTEN, lg.PARTITION_RECONCILED, lg.PARTITION_VALIDATED]
    from keyrotation.locks import leases

    with rt.ledger.db.connect() as conn:
        assert conn.execute(leases.select()).fetchall() == []
    assert _state(dags["retire__crash"].test()) == "success"
    assert rt.backend.key_state().min_decryption_version == 2


# -- 4. encryption never silently removed ----------------------------------------------------------

def test_a_column_dropped_from_encrypted_columns_is_never_written_in_plaintext(make_key_class, vault):
    parts = days("2024-06-01", 2)
    rt, ds, v2 = _rotated(make_key_class, vault, "cols", parts, mode="reencrypt")
    config_file = Path(rt.config.source)
    config_file.write_text(config_file.read_text().replace("encrypted_columns: [email, ssn]",
                                                           "encrypted_columns: [email, day]"))
    from keyrotation.config import load_key_class

    rt = runtime(load_key_class("cols"), vault)
    before = {p: _files(_folder(rt, ds, p)) for p in parts}
    results = sweep(rt, ds, v2, mode="reencrypt")
    assert results == []  # nothing processed, so nothing validated
    failed = rt.ledger.rows(events_in=(lg.PARTITION_FAILED,))
    assert sorted(r["partition"] for r in failed) == parts
    assert json.loads(failed[0]["detail"])["error"] == (
        f"partition {failed[0]['partition']}: column(s) ssn are encrypted in its files but not in the key class's "
        "encrypted_columns: re-encrypting would write them in plaintext, refused (add them back to "
        "encrypted_columns)")
    assert {p: _files(_folder(rt, ds, p)) for p in parts} == before
    for files in before.values():
        assert all(CANARY.encode() not in content for content in files.values())

    # Adding a column (day) with ssn back: the next reencrypt encrypts it.
    config_file.write_text(config_file.read_text().replace("encrypted_columns: [email, day]",
                                                           "encrypted_columns: [email, ssn, day]"))
    rt = runtime(load_key_class("cols"), vault)
    assert any(p.encode() in c for p in parts for c in before[p].values())  # day was plaintext
    assert {r.action for r in sweep(rt, ds, v2, mode="reencrypt")} == {"validated"}
    for p in parts:
        data = (_folder(rt, ds, p) / "part-00002.parquet").read_bytes()
        assert p.encode() not in data and CANARY.encode() not in data
    validated = rt.ledger.rows(events_in=(lg.PARTITION_VALIDATED,))
    assert {tuple(json.loads(r["detail"])["encrypted_columns"]) for r in validated} == {("day", "email", "ssn")}


def test_a_file_without_encryption_and_a_column_not_encrypted_block(make_key_class, vault):
    parts = days("2024-06-01", 2)
    rt, ds, v2 = _rotated(make_key_class, vault, "plain", parts)
    folder = _folder(rt, ds, parts[0])
    # A plain Parquet file in the encrypted one's place, under its name.
    pq.write_table(pa.table({"id": [1], "day": [parts[0]], "email": ["x"], "ssn": ["y"]}),
                   folder / "part-00001.parquet")
    census = rt.census(ds)
    assert census.errors == {parts[0]: f"partition {parts[0]}: part-00001.parquet is not encrypted (plain Parquet), "
                                       "but the dataset requires encryption"}
    _refused(rt, v2, "1 partitions unreadable or blocking")


def test_a_manifest_without_its_columns_is_checked_from_the_footers_not_rewritten(make_key_class, vault):
    """Manifests written before the engine recorded its encrypted columns: a reencrypt run at the target reads
    the footers (one KMS request per file) and rewrites nothing when every configured column is encrypted."""
    parts = days("2024-09-01", 2)
    rt, ds, v2 = _rotated(make_key_class, vault, "oldmani", parts, mode="reencrypt")
    assert {r.action for r in sweep(rt, ds, v2, mode="reencrypt")} == {"validated"}
    folder = _folder(rt, ds, parts[0])
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["encrypted_columns"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    before = _files(folder)
    [result] = rt.engine(ds).run([parts[0]], lambda p: rt.engine(ds).process(p, v2, "reencrypt"))
    assert result.action in ("up_to_date", "reconciled")
    assert _files(folder) == before
