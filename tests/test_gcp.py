"""Cloud KMS key classes with their data in GCS, against the Cloud KMS test server (real gRPC, TLS,
service-account JWTs, IAM enforced) through the unmodified google-cloud-kms client, and GCS served by
gcp-storage-emulator with CMEK: the full cycle through Airflow, retirement that is real, the
deferrable sensor's trigger, and each role refused what it must not do."""

from __future__ import annotations

import asyncio
import json
import secrets

import pyarrow.fs as pafs
import pytest

from dag_runs import key_class_dags as _dags
from dag_runs import state as _state
from dag_runs import task_context as _context
from dag_runs import task_states as _task_states
from helpers import CANARY, days, gcp_runtime, partition_digests, seed
from keyrotation import ledger as lg
from keyrotation.errors import BackendError, PermissionDenied

OBJECTS_PER_PARTITION = 3
SWEEP_CONF = {"scope": "auto", "partition_from": None, "partition_to": None, "mode": "policy", "dry_run": False}


def seed_objects(rt, dataset: str, partitions: list[str]) -> None:
    """CMEK objects, as an application writing to GCS with the key class's key would leave them."""
    ds = rt.config.dataset(dataset)
    client = rt.storage(ds).gcs_client(ds.location)
    bucket_name, _, prefix = ds.location[len("gs://"):].partition("/")
    bucket = client.bucket(bucket_name)
    for partition in partitions:
        for i in range(OBJECTS_PER_PARTITION):
            blob = bucket.blob(f"{prefix}/dt={partition}/statement-{i}.json", kms_key_name=rt.backend.key_ref)
            blob.metadata = {"customer": str(i)}
            blob.upload_from_string(f'{{"canary": "{CANARY}", "i": {i}}}', content_type="application/json")


@pytest.mark.airflow
def test_full_cycle_on_gcs_rotate_reencrypt_census_disable_destroy(make_gcp_key_class, gcp, airflow_db, capfd):
    name = "gcp_cycle"
    config = make_gcp_key_class(name, dataset="gcp_customers", chunk_size=8)
    owner = gcp_runtime(config, gcp)
    dags = _dags(name)
    parts = days("2024-01-01", 30)

    assert _state(dags[f"rotate__{name}"].test(run_conf={"force": False, "reason": "first version"})) == "success"
    assert owner.backend.key_state().latest_version == 1
    seed(owner, "gcp_customers", parts, rows=20)
    seed_objects(owner, "gcp_customers_documents", parts[:10])
    digests = partition_digests(owner, "gcp_customers", parts)
    old_secret = owner.backend.wrap(b"an old data key")
    assert owner.backend.version_of(old_secret) == 1

    rotation = dags[f"rotate__{name}"].test(run_conf={"force": True, "reason": "test: quarterly"})
    assert _state(rotation) == "success"
    state = owner.backend.key_state()
    assert (state.latest_version, state.min_encryption_version) == (2, 2)  # added, then promoted to primary
    [promoted] = owner.ledger.rows(events_in=(lg.VERSION_PROMOTED,))
    assert promoted["to_version"] == 2 and promoted["task_id"] == "update_reference"
    assert owner.census("gcp_customers").by_version() == {1: 30}
    assert owner.census("gcp_customers_documents").by_version() == {1: 10}

    # Before re-encryption the retirement gate holds and nothing is disabled.
    from airflow.sdk.exceptions import AirflowFailException

    from keyrotation_airflow.operators.retire import RetireKeyVersionsOperator

    with pytest.raises(AirflowFailException, match="30 partitions still under versions below v2"):
        RetireKeyVersionsOperator(task_id="retire_versions", key_class=name).execute(
            _context(f"retire__{name}", "retire_versions"))
    assert gcp.kms.version_state(f"{config.key_class.key_ref}/cryptoKeyVersions/1").name == "ENABLED"

    rewrites_before = gcp.gcs.cmek_rewrites
    for dataset in ("gcp_customers", "gcp_customers_documents"):
        assert _state(dags[f"reencrypt__{dataset}"].test(run_conf=SWEEP_CONF)) == "success"
    assert owner.census("gcp_customers").by_version() == {2: 30}
    assert owner.census("gcp_customers_documents").by_version() == {2: 10}
    assert partition_digests(owner, "gcp_customers", parts) == digests
    assert gcp.gcs.cmek_rewrites - rewrites_before == 10 * OBJECTS_PER_PARTITION
    blob = owner.storage(config.dataset("gcp_customers_documents")).gcs_client("gs://x").bucket(
        config.datasets[1].location.split("/")[2]).get_blob(f"documents/dt={parts[0]}/statement-1.json")
    assert (blob.content_type, blob.metadata) == ("application/json", {"customer": "1"})  # kept by the rewrite

    retire = dags[f"retire__{name}"].test()
    assert _state(retire) == "success" and _task_states(retire)["retire_versions"] == "success"
    v1 = owner.backend.version(1)
    assert v1.state.name == "DESTROY_SCHEDULED"  # disabled, then (trim) destruction scheduled: 2 days later
    destroy_at = owner.backend.deletion_dates()[1]
    assert 47 * 3600 < (destroy_at - gcp.kms.now()).total_seconds() <= 48 * 3600
    assert owner.backend.key_state().min_decryption_version == 2
    [retired] = owner.ledger.rows(events_in=(lg.VERSIONS_RETIRED,))
    assert (retired["from_version"], retired["to_version"]) == (1, 2)

    # The retirement is real: ciphertext of v1 no longer decrypts; everything re-encrypted still does.
    with pytest.raises(BackendError, match="DESTROY_SCHEDULED|not enabled|FailedPrecondition"):
        owner.backend.unwrap(old_secret)
    assert partition_digests(owner, "gcp_customers", parts) == digests
    gcp.kms.advance(3 * 86400)
    assert owner.backend.version(1).state.name == "DESTROYED"
    out, err = capfd.readouterr()
    assert CANARY not in out + err


def test_reencrypt_mode_rewrites_files_with_new_data_keys(make_gcp_key_class, gcp):
    config = make_gcp_key_class("gcp_full", mode="reencrypt", dataset="gcp_full_customers")
    rt = gcp_runtime(config, gcp, role="reencrypt")
    owner = gcp_runtime(config, gcp)
    owner.backend.create_key()
    parts = days("2024-02-01", 3)
    seed(owner, "gcp_full_customers", parts, rows=10)
    before = partition_digests(owner, "gcp_full_customers", parts)
    files_before = {p: owner.store("gcp_full_customers").live_files(p) for p in parts}
    owner.backend.promote(owner.backend.rotate())
    engine = rt.engine("gcp_full_customers")
    results = engine.run(parts, lambda p: engine.process(p, 2, "reencrypt"))
    assert [r.action for r in results] == ["reencrypted"] * 3
    # module by module, from a local copy of each file (pyarrow reads GCS front to back here)
    details = [json.loads(r["detail"]) for r in owner.ledger.rows(events_in=(lg.PARTITION_REENCRYPTED,))]
    assert [(d["path"], d.get("fallback_reason")) for d in details] == [("module", None)] * 3
    assert {p: owner.store("gcp_full_customers").live_files(p) for p in parts} != files_before
    assert owner.census("gcp_full_customers").by_version() == {2: 3}
    assert partition_digests(owner, "gcp_full_customers", parts) == before


def test_each_role_is_refused_what_it_must_not_do(make_gcp_key_class, gcp, monkeypatch):
    config = make_gcp_key_class("gcp_roles", dataset="gcp_roles_customers")
    owner = gcp_runtime(config, gcp)
    owner.backend.create_key()
    wrapped = owner.backend.wrap(b"data key")
    rotate, reencrypt, retire, report = (gcp_runtime(config, gcp, role=r).backend
                                         for r in ("rotate", "reencrypt", "retire", "report"))

    def refused(call, action: str, permission: str, resource: str | None = None) -> None:
        """``call`` raises PermissionDenied, naming the request and the permission the role lacks, exactly."""
        with pytest.raises(PermissionDenied) as refusal:
            call()
        assert str(refusal.value) == (
            f"Cloud KMS key {owner.backend.key_ref!r}: {action} refused: Permission 'cloudkms.{permission}' denied "
            f"on resource '{resource or owner.backend.key_ref}' (or it may not exist). (the role's IAM bindings do "
            "not allow it)")

    for backend in (rotate, retire, report):
        refused(lambda backend=backend: backend.unwrap(wrapped), "decrypt (ciphertext version v1)",
                "cryptoKeyVersions.useToDecrypt")
    refused(lambda: report.wrap(b"x"), "encrypt with the primary", "cryptoKeyVersions.useToEncrypt")
    for backend in (reencrypt, retire, report):
        refused(backend.rotate, "add a version", "cryptoKeyVersions.create")
    for backend in (rotate, reencrypt, report):
        refused(lambda backend=backend: _disable(backend, 1), "set v1 to state 2", "cryptoKeyVersions.update",
                owner.backend.version_name(1))
    refused(lambda: _promote(reencrypt, 1), "promote", "cryptoKeys.update")

    # What each role is for, it can do.
    assert reencrypt.unwrap(reencrypt.wrap(b"data key")) == b"data key"
    version = rotate.rotate()
    assert rotate.is_version_usable(version) and rotate.promote(version)
    assert report.key_state().min_encryption_version == version
    assert retire.retirement_effect([1]) == (
        f"disables v1 of `{retire.key_ref}`: no decryption under v1 (no trim: a disabled version can be enabled again)")
    assert retire.retire_below(version).min_decryption_version == version
    with pytest.raises(BackendError, match="FailedPrecondition|DISABLED"):
        reencrypt.unwrap(wrapped)  # v1 disabled by the retire role

    # cryptoKeyVersions.update, which disables, re-enables as well (IAM cannot tell them apart; here by the
    # retire account itself, right after the task disabled v1): the task reads the key back and fails.
    call = retire._call

    def then_enabled(api: str, action: str, done=None, **request):
        answer = call(api, action, done=done, **request)
        if api == "update_crypto_key_version" and request["crypto_key_version"]["state"] == 2:
            _disable(retire, 1, state=1, call=call)
        return answer

    _disable(retire, 1, state=1)
    assert retire.key_state().min_decryption_version == 1 and reencrypt.unwrap(wrapped) == b"data key"
    monkeypatch.setattr(retire, "_call", then_enabled)
    with pytest.raises(BackendError, match=f"after retiring below v{version}, v1 is still enabled"):
        retire.retire_below(version)
    monkeypatch.undo()
    assert retire.retire_below(version).min_decryption_version == version


def _disable(backend, version: int, state: int = 2, call=None) -> None:
    """Set the version's state (2: DISABLED, 1: ENABLED) through ``call`` (default: the backend's)."""
    from google.protobuf import field_mask_pb2

    (call or backend._call)("update_crypto_key_version", f"set v{version} to state {state}",
                            crypto_key_version={"name": backend.version_name(version), "state": state},
                            update_mask=field_mask_pb2.FieldMask(paths=["state"]))


def _promote(backend, version: int) -> None:
    backend._call("update_crypto_key_primary_version", "promote", name=backend.key_ref,
                  crypto_key_version_id=str(version))


def test_used_primary_cross_checks_the_version_label(make_gcp_key_class, gcp):
    config = make_gcp_key_class("gcp_label", dataset="gcp_label_customers")
    backend = gcp_runtime(config, gcp).backend
    backend.create_key()
    v1 = backend.wrap(b"k")
    backend.promote(backend.rotate())
    relabelled = "gcp:v2:" + v1.split(":", 2)[2]  # v1's ciphertext claiming to be under the primary v2
    with pytest.raises(BackendError, match="labelled v2 was decrypted without the primary v2"):
        backend.unwrap(relabelled)
    assert backend.unwrap(v1) == b"k"
    assert backend.rewrap([v1]) != [v1] and backend.version_of(backend.rewrap([v1])[0]) == 2


def test_hsm_version_waits_in_the_trigger_then_fires(make_gcp_key_class, gcp):
    from keyrotation_airflow.triggers.key_version import KeyVersionReadyTrigger

    config = make_gcp_key_class("gcp_hsm", dataset="gcp_hsm_customers", protection_level="HSM")
    rt = gcp_runtime(config, gcp, role="rotate")
    gcp.kms.generation_delay = 1.5
    gcp_runtime(config, gcp).backend.create_key()
    version = rt.backend.rotate()
    assert rt.backend.version(version).state.name == "PENDING_GENERATION"
    assert not rt.backend.is_version_usable(version)
    with pytest.raises(BackendError, match="FailedPrecondition|PENDING_GENERATION"):
        rt.backend.promote(version)  # Cloud KMS refuses a pending version as primary

    async def first_event(trigger):
        return await asyncio.wait_for(anext(trigger.run()), 30)

    event = asyncio.run(first_event(KeyVersionReadyTrigger("gcp_hsm", version, poll_interval=0.2, timeout=20)))
    assert event.payload == {"status": "ready", "version": version}
    assert gcp.kms.calls["GetCryptoKeyVersion"] >= 2  # polled while pending, with the async client
    assert rt.backend.promote(version)


def test_trigger_times_out_with_the_state_the_version_is_still_in(make_gcp_key_class, gcp):
    from airflow.sdk.exceptions import AirflowSensorTimeout

    from keyrotation_airflow.sensors.key_version import KeyVersionReadySensor
    from keyrotation_airflow.triggers.key_version import KeyVersionReadyTrigger

    config = make_gcp_key_class("gcp_slow", dataset="gcp_slow_customers", protection_level="HSM")
    gcp.kms.generation_delay = 600
    try:
        gcp_runtime(config, gcp).backend.create_key()
        trigger = KeyVersionReadyTrigger("gcp_slow", 1, poll_interval=0.2, timeout=1.0)
        event = asyncio.run(asyncio.wait_for(anext(trigger.run()), 30))
    finally:
        gcp.kms.generation_delay = 1.0
    assert event.payload["status"] == "timeout" and "v1 still PENDING_GENERATION after 1s" in event.payload["message"]
    sensor = KeyVersionReadySensor(task_id="wait", key_class="gcp_slow", version=1, deferrable=True, timeout=1)
    with pytest.raises(AirflowSensorTimeout, match="still PENDING_GENERATION after 1s: the version is not usable"):
        sensor.execute_complete({}, event.payload)


def test_config_names_the_field_for_gcp_mistakes(tmp_path):
    from helpers import GCP_KEY_CLASS_YAML
    from keyrotation.config import load_key_class_file
    from keyrotation.errors import ConfigError

    text = GCP_KEY_CLASS_YAML.format(name="bad", key_id="k", mode="rewrap", chunk_size=4, dataset="d",
                                     location="gs://b/d", documents="gs://b/docs", protection_level="SOFTWARE",
                                     trim="false")
    cases = {
        "projects/keyrotation-test/locations/europe-west1/keyRings/tests/cryptoKeys/k": ("key-name", "CryptoKey"),
        "protection_level: SOFTWARE": ("protection_level: EXTERNAL", "key_class.gcp.protection_level"),
        "destroy_scheduled_duration: 2d": ("destroy_scheduled_duration: 200d", "1 to 120 days"),
        "location: gs://b/docs": ("location: s3://b/docs", "gcs_cmek_objects needs a gs:// location"),
    }
    for old, (new, message) in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(text.replace(old, new))
        with pytest.raises(ConfigError, match=message) as error:
            load_key_class_file(path)
        assert str(path) in str(error.value) and "'bad'" in str(error.value)


def test_example_gcp_key_classes_load_and_wire_the_deferrable_sensor(monkeypatch):
    from pathlib import Path

    from keyrotation_factory import key_class_dags

    monkeypatch.setenv("KEYROTATION_CONFIG_DIR", str(Path(__file__).parents[1] / "include/config/examples/gcp"))
    pii = key_class_dags("customer_pii")
    assert sorted(pii) == ["reencrypt__customer_documents", "reencrypt__customers", "retire__customer_pii",
                           "rotate__customer_pii"]
    rotate = pii["rotate__customer_pii"]
    assert rotate.get_task("wait_version_ready").deferrable is True
    assert rotate.get_task("update_reference").pool == "keyrotation_gcp_kms"  # it promotes: a KMS call
    assert "approve" in pii["retire__customer_pii"].task_ids
    assert key_class_dags("payment_tokens")["reencrypt__payments"].get_task("reencrypt").pool == "default_pool"


def test_client_side_rewrap_never_reuses_a_plaintext_across_keys(make_gcp_key_class, gcp):
    config = make_gcp_key_class("gcp_rewrap", dataset="gcp_rewrap_customers")
    owner = gcp_runtime(config, gcp)
    owner.backend.create_key()
    seed(owner, "gcp_rewrap_customers", ["2024-03-01"], rows=5)
    owner.backend.promote(owner.backend.rotate())
    calls_before = dict(gcp.kms.calls)
    engine = gcp_runtime(config, gcp, role="reencrypt").engine("gcp_rewrap_customers")
    [result] = engine.run(["2024-03-01"], lambda p: engine.process(p, 2, "rewrap"))
    assert result.action == "rewrapped"
    made = {k: gcp.kms.calls[k] - calls_before.get(k, 0) for k in ("Decrypt", "Encrypt")}
    assert made == {"Decrypt": 1, "Encrypt": 1}  # one KEK per file: one decrypt, one encrypt, no data read
    assert owner.engine("gcp_rewrap_customers").validate("2024-03-01").action == "validated"


def test_client_library_follows_a_cloud_kms_rotation(make_gcp_key_class, gcp, pg, tmp_path):
    """Applications: the client decrypts values written under any live version and encrypts with the
    reference, over the reencrypt role's Cloud KMS client."""
    from keyrotation.client import KeyRotationClient
    from keyrotation.ledger import Ledger, RunContext
    from keyrotation.rotation import update_reference

    config = make_gcp_key_class("gcp_app", dataset="gcp_app_customers")
    owner = gcp_runtime(config, gcp)
    owner.backend.create_key()
    engine, tables = pg
    ledger = Ledger(f"sqlite:///{tmp_path / 'app-ledger.db'}")
    app = gcp_runtime(config, gcp, role="reencrypt").backend
    client = KeyRotationClient.from_key_class(config, kms_client=app.client, ledger=ledger, db=engine)
    update_reference("gcp_app", 1, ledger, RunContext(actor="test"))
    table = f"gcp_{secrets.token_hex(3)}"
    tables.append(table)
    ctx = {"table": table, "column": "c", "pk": 1, "partition": "2024-01-01"}
    before = client.encrypt(f"{CANARY}-gcp", ctx)
    owner.backend.promote(owner.backend.rotate())
    update_reference("gcp_app", 2, ledger, RunContext(actor="test"))
    client.refresh()
    after, version = client.encrypt_versioned("after", ctx)
    assert version == 2 and client.describe(after)["created_under"] == 2
    assert client.decrypt(before, ctx) == f"{CANARY}-gcp".encode() and client.decrypt(after, ctx) == b"after"


def test_rotation_schedule_synced_to_cloud_kms_and_its_own_rotations_adopted(make_gcp_key_class, gcp):
    """With sync_rotation_schedule, Cloud KMS rotates by itself too (e.g. while Airflow is down); the rotation
    DAG's check then adopts the version Cloud KMS added instead of adding another."""
    from datetime import UTC, datetime, timedelta

    from keyrotation.rotation import check_rotation

    config = make_gcp_key_class("gcp_sched", dataset="gcp_sched_customers", **{
        "destroy_scheduled_duration: 2d": "destroy_scheduled_duration: 2d\n    sync_rotation_schedule: true"})
    rt = gcp_runtime(config, gcp, role="rotate")
    gcp_runtime(config, gcp).backend.create_key()
    assert rt.backend.key_state().latest_version == 1  # created by the owner: no schedule yet
    rt.backend.sync_rotation_schedule()
    key = rt.backend.client.get_crypto_key(name=config.key_class.key_ref)
    assert key.rotation_period == timedelta(days=90)  # rotate_after unset: the cryptoperiod
    assert timedelta(days=89) < key.next_rotation_time - datetime.now(UTC) <= timedelta(days=90)
    gcp.kms.advance(91 * 86400)
    state = rt.backend.key_state()
    assert (state.latest_version, state.min_encryption_version) == (2, 2)  # Cloud KMS's own rotation
    check = check_rotation(config.key_class, state, reference_version=1)
    assert check.action == "adopt" and "behind the KMS's v2" in check.reason


@pytest.mark.airflow
def test_rotation_dag_waits_for_an_hsm_version_in_its_deferred_sensor(make_gcp_key_class, gcp, airflow_db, capfd):
    """Through Airflow: the new HSM version is PENDING_GENERATION when the sensor first looks, so the sensor
    defers (dag.test runs its trigger in process, as the triggerer would), and the version is promoted only
    once it is enabled."""
    name = "gcp_hsm_dag"
    config = make_gcp_key_class(name, dataset="gcp_hsm_dag_customers", protection_level="HSM")
    gcp.kms.generation_delay = 2.0
    rotate = _dags(name)[f"rotate__{name}"]
    assert _state(rotate.test(run_conf={"force": False, "reason": "first version"})) == "success"
    run = rotate.test(run_conf={"force": True, "reason": "test: HSM rotation"})
    assert _state(run) == "success"
    out, err = capfd.readouterr()
    # The sensor deferred, and its trigger polled the version while it was still being generated.
    assert "Pausing task as DEFERRED" in out + err and "v2 PENDING_GENERATION yet" in out + err
    owner = gcp_runtime(config, gcp)
    state = owner.backend.key_state()
    assert (state.latest_version, state.min_encryption_version) == (2, 2)
    assert owner.backend.version(2).state.name == "ENABLED"


@pytest.mark.parametrize("point", ["staged", "material_moved", "data_moved", "committed"])
def test_crash_in_a_gcs_partition_leaves_it_decryptable_and_the_rerun_completes(make_gcp_key_class, gcp, point):
    """GCS has no rename (a move is a rewrite then a delete): the manifest is still the one commit point."""
    config = make_gcp_key_class(f"gcp_crash_{point}", mode="reencrypt", dataset=f"gcp_crash_{point}_customers")
    dataset = config.datasets[0].name
    owner = gcp_runtime(config, gcp)
    owner.backend.create_key()
    parts = days("2024-04-01", 2)
    seed(owner, dataset, parts, rows=10)
    expected = partition_digests(owner, dataset, parts)
    owner.backend.promote(owner.backend.rotate())

    class Crash(Exception):
        pass

    def crash(name):
        if name == point:
            raise Crash(name)

    rt = gcp_runtime(config, gcp, role="reencrypt")
    with pytest.raises(Crash):
        rt.engine(dataset, checkpoint=crash).process(parts[0], 2, "reencrypt")
    assert partition_digests(owner, dataset, parts) == expected
    engine = rt.engine(dataset)
    results = engine.run(parts, lambda p: engine.process(p, 2, "reencrypt"))
    assert [r.action for r in results][1:] == ["reencrypted"] and results[0].action in ("reencrypted", "reconciled")
    owner.backend.retire_below(2)
    assert partition_digests(owner, dataset, parts) == expected
    assert owner.census(dataset).by_version() == {2: 2}
    store = owner.store(dataset)
    for p in parts:  # one generation left, nothing staged
        names = [i.path.rsplit("/", 1)[1] for i in store.fs.get_file_info(pafs.FileSelector(store.partition_dir(p)))]
        assert len([n for n in names if n.endswith(".parquet")]) == 1 and not any(n.startswith(".") for n in names)
