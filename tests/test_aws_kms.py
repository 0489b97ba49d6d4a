"""The AWS KMS backend against moto_server over HTTP: both strategies, rewrap, retirement, errors."""

from __future__ import annotations

import secrets

import pyarrow as pa
import pytest

from helpers import CANARY
from keyrotation.backends.aws_kms import AwsKmsBackend
from keyrotation.errors import BackendError, KeyNotFoundError
from keyrotation.formats.parquet_pme import ParquetEncryption


def alias_backend(moto, **kwargs) -> AwsKmsBackend:
    return AwsKmsBackend(moto.client("kms"), f"alias/t-{secrets.token_hex(4)}", key_class="t", **kwargs)


def test_alias_strategy_each_version_is_a_key_behind_the_alias(moto):
    kms = moto.client("kms")
    backend = alias_backend(moto)
    assert not backend.key_state().exists
    with pytest.raises(KeyNotFoundError, match="does not exist"):
        backend.rotate()
    assert backend.create_key().latest_version == 1
    v1 = backend.wrap(CANARY.encode())
    assert v1.startswith("aws:v1:") and CANARY not in v1
    assert backend.rotate() == 2
    state = backend.key_state()
    assert (state.latest_version, state.min_decryption_version, sorted(state.versions)) == (2, 1, [1, 2])
    # The alias now points at v2's key; v1's key stays enabled behind its version alias.
    target = kms.describe_key(KeyId=backend.key_ref)["KeyMetadata"]["Arn"]
    assert target == backend.key_id_of(2) != backend.key_id_of(1)
    tags = {t["TagKey"]: t["TagValue"] for t in kms.list_resource_tags(KeyId=target)["Tags"]}
    assert tags == {"keyrotation:key-class": "t", "keyrotation:version": "2"}
    assert backend.wrap(b"x").startswith("aws:v2:")
    [rewrapped] = backend.rewrap([v1])
    assert rewrapped.startswith("aws:v2:") and backend.unwrap(rewrapped) == CANARY.encode()
    assert backend.unwrap(v1) == CANARY.encode()
    assert backend.version_of_key_id(backend.key_id_of(1)) == 1 and backend.version_of_key_id("nope") is None


def test_alias_strategy_retirement_disables_and_schedules_deletion(moto):
    kms = moto.client("kms")
    backend = alias_backend(moto, deletion_window_days=7)
    backend.create_key()
    backend.rotate()
    backend.rotate()
    with pytest.raises(BackendError, match="cannot retire below v4, latest is v3"):
        backend.retire_below(4)
    old_keys = [backend.key_id_of(1), backend.key_id_of(2)]
    assert backend.retirement_effect([1, 2]) == (
        f"disables the KMS keys of versions v1..v2 of `{backend.key_ref}` and schedules the deletion 7 days after "
        "the approval (CancelKeyDeletion restores a key until then)")
    state = backend.retire_below(3)
    assert (state.min_decryption_version, sorted(state.versions)) == (3, [3])
    for key in old_keys:
        meta = kms.describe_key(KeyId=key)["KeyMetadata"]
        assert meta["KeyState"] == "PendingDeletion" and meta["DeletionDate"]
    assert sorted(backend.deletion_dates()) == [1, 2]
    assert not backend.is_version_usable(2) and backend.is_version_usable(3)
    assert backend.retire_below(3).min_decryption_version == 3  # again: nothing more to do


def test_on_demand_strategy_versions_are_rotations_and_cannot_be_retired(moto):
    kms = moto.client("kms")
    alias = f"alias/od-{secrets.token_hex(4)}"
    backend = AwsKmsBackend(kms, alias, strategy="on_demand", key_class="od", rotation_period_days=180)
    state = backend.create_key()
    assert (state.latest_version, state.min_decryption_version) == (1, 1)
    key_id = kms.describe_key(KeyId=alias)["KeyMetadata"]["KeyId"]
    status = kms.get_key_rotation_status(KeyId=key_id)
    assert status["KeyRotationEnabled"]  # moto 5.2.5 does not echo RotationPeriodInDays back
    v1 = backend.wrap(CANARY.encode())
    assert backend.rotate() == 2 and backend.rotate() == 3
    state = backend.key_state()
    assert sorted(state.versions) == [1, 2, 3] and state.min_decryption_version == 1
    assert [r["RotationType"] for r in kms.list_key_rotations(KeyId=key_id)["Rotations"]] == ["ON_DEMAND"] * 2
    [moved] = backend.rewrap([v1])
    assert moved.startswith("aws:v3:") and backend.unwrap(moved) == CANARY.encode()
    with pytest.raises(BackendError, match="only the current key material encrypts"):
        backend.wrap(b"x", version=1)
    assert not backend.can_retire and "in perpetuity" in backend.cannot_retire_reason
    with pytest.raises(BackendError, match="in perpetuity"):
        backend.retire_below(3)


def test_parquet_files_wrapped_by_aws_kms_rewrap_server_side(moto, tmp_path):
    import pyarrow.fs as pafs

    backend = alias_backend(moto)
    backend.create_key()
    pme = ParquetEncryption(backend, ["email"])
    fs = pafs.LocalFileSystem()
    path = str(tmp_path / "part.parquet")
    table = pa.table({"id": [1, 2], "email": [CANARY, "b@example.com"]})
    pme.write(table, path, fs, 1)
    assert pme.wrapping_versions(path, fs) == {1}
    backend.rotate()
    before = dict(backend.calls)
    pme.rewrap(path, fs, 2)
    assert backend.calls.get("re_encrypt", 0) - before.get("re_encrypt", 0) >= 1
    assert backend.calls.get("decrypt", 0) == before.get("decrypt", 0)  # nothing unwrapped here
    assert pme.wrapping_versions(path, fs) == {2}
    assert pme.read(path, fs).equals(table)
    assert CANARY not in (tmp_path / "_KEY_MATERIAL_FOR_part.parquet.json").read_text()


def test_bad_configuration_and_foreign_ciphertexts_are_named(moto):
    with pytest.raises(BackendError, match="needs an alias"):
        AwsKmsBackend(moto.client("kms"), "1234abcd", strategy="alias")
    with pytest.raises(BackendError, match="unknown strategy 'yearly'"):
        AwsKmsBackend(moto.client("kms"), "alias/x", strategy="yearly")  # type: ignore[arg-type]
    backend = alias_backend(moto)
    with pytest.raises(BackendError, match="no aws:vN: prefix"):
        backend.version_of("vault:v1:abc")
