"""The Cloud KMS test server through the unmodified google-cloud-kms clients (TLS, service-account JWTs)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import grpc
import pytest
from gcp_kms_server import CloudKmsTestServer, generate_service_account_keyfile, trust_in_process
from google.api_core import exceptions
from google.api_core.client_options import ClientOptions
from google.auth import crypt
from google.auth import jwt as google_jwt
from google.cloud import kms_v1
from google.iam.v1 import policy_pb2
from google.oauth2 import service_account
from google.protobuf import field_mask_pb2

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
PROJECT = "keyrotation-test"
LOCATION = f"projects/{PROJECT}/locations/global"
State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState
Level = kms_v1.ProtectionLevel


@pytest.fixture(scope="module")
def kms_server(tmp_path_factory):
    # gRPC reads its roots once per process: serve the certificate conftest made trusted, if any.
    existing = os.environ.get("KEYROTATION_TEST_GCP_TLS_DIR") or ""
    tls_dir = Path(existing) if existing else tmp_path_factory.mktemp("gcp-kms-tls")
    with CloudKmsTestServer(tls_dir=tls_dir, project=PROJECT) as server:
        trust_in_process(server.ca_path)
        yield server
        assert not server.errors, server.errors


def credentials(keyfile: dict) -> service_account.Credentials:
    return service_account.Credentials.from_service_account_info(keyfile, scopes=SCOPES)


def make_client(server: CloudKmsTestServer, keyfile: dict | None = None) -> kms_v1.KeyManagementServiceClient:
    return kms_v1.KeyManagementServiceClient(credentials=credentials(keyfile or server.owner_keyfile),
                                             client_options=ClientOptions(api_endpoint=server.endpoint))


@pytest.fixture(scope="module")
def kms(kms_server):
    return make_client(kms_server)


@pytest.fixture
def ring(kms) -> str:
    return kms.create_key_ring(parent=LOCATION, key_ring_id=f"ring-{secrets.token_hex(4)}", key_ring={}).name


def create_key(kms, ring: str, key_id: str = "key", level=Level.SOFTWARE, **spec) -> kms_v1.CryptoKey:
    skip = spec.pop("skip_initial_version_creation", False)
    crypto_key = {"purpose": kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT,
                  "version_template": {"protection_level": level}, **spec}
    return kms.create_crypto_key(request={"parent": ring, "crypto_key_id": key_id, "crypto_key": crypto_key,
                                          "skip_initial_version_creation": skip})


def crc(data: bytes) -> int:
    return google_crc32c.value(data)


def set_state(kms, version_name: str, state) -> kms_v1.CryptoKeyVersion:
    return kms.update_crypto_key_version(crypto_key_version={"name": version_name, "state": state},
                                         update_mask=field_mask_pb2.FieldMask(paths=["state"]))


def service_account_for(server, name: str) -> dict:
    return server.add_service_account(f"{name}-{secrets.token_hex(3)}@{PROJECT}.iam.gserviceaccount.com")


def member(keyfile: dict) -> str:
    return f"serviceAccount:{keyfile['client_email']}"


# ------------------------------------------------------------------------------------------------ crypto


def test_software_round_trip_with_crc32c_fields(kms, ring):
    key = create_key(kms, ring)
    v1 = f"{key.name}/cryptoKeyVersions/1"
    assert key.primary.name == v1 and key.primary.state == State.ENABLED
    assert key.primary.protection_level == Level.SOFTWARE and key.destroy_scheduled_duration == dt.timedelta(days=30)
    plaintext, aad = b"the data encryption key", b"table=payments"
    response = kms.encrypt(request={"name": key.name, "plaintext": plaintext, "plaintext_crc32c": crc(plaintext),
                                    "additional_authenticated_data": aad,
                                    "additional_authenticated_data_crc32c": crc(aad)})
    assert response.name == v1 and response.protection_level == Level.SOFTWARE
    assert response.verified_plaintext_crc32c and response.verified_additional_authenticated_data_crc32c
    assert response.ciphertext_crc32c == crc(response.ciphertext) and plaintext not in response.ciphertext
    decrypted = kms.decrypt(request={"name": key.name, "ciphertext": response.ciphertext,
                                     "ciphertext_crc32c": crc(response.ciphertext),
                                     "additional_authenticated_data": aad})
    assert decrypted.plaintext == plaintext and decrypted.plaintext_crc32c == crc(plaintext)
    assert decrypted.used_primary and decrypted.protection_level == Level.SOFTWARE
    # Without checksums nothing is "verified"; the same plaintext encrypts to a different ciphertext.
    again = kms.encrypt(request={"name": key.name, "plaintext": plaintext, "additional_authenticated_data": aad})
    assert not again.verified_plaintext_crc32c and not again.verified_additional_authenticated_data_crc32c
    assert again.ciphertext != response.ciphertext

    with pytest.raises(exceptions.InvalidArgument, match="ciphertext is invalid"):
        kms.decrypt(request={"name": key.name, "ciphertext": response.ciphertext,
                             "additional_authenticated_data": b"table=other"})
    with pytest.raises(exceptions.InvalidArgument) as err:
        kms.encrypt(request={"name": key.name, "plaintext": plaintext, "plaintext_crc32c": crc(plaintext) ^ 1})
    assert err.value.message == "The checksum in field plaintext_crc32c did not match the data in field plaintext."
    with pytest.raises(exceptions.InvalidArgument, match="additional_authenticated_data_crc32c did not match"):
        kms.encrypt(request={"name": key.name, "plaintext": plaintext, "additional_authenticated_data": aad,
                             "additional_authenticated_data_crc32c": crc(aad) + 1})
    with pytest.raises(exceptions.InvalidArgument, match="ciphertext_crc32c did not match"):
        kms.decrypt(request={"name": key.name, "ciphertext": response.ciphertext,
                             "ciphertext_crc32c": crc(response.ciphertext) ^ 1, "additional_authenticated_data": aad})
    assert kms.decrypt(name=key.name, ciphertext=kms.encrypt(name=key.name, plaintext=b"x" * 65536).ciphertext
                       ).plaintext == b"x" * 65536
    with pytest.raises(exceptions.InvalidArgument, match="no larger than 65536"):
        kms.encrypt(name=key.name, plaintext=b"x" * 65537)


def test_version_by_name_used_primary_and_primary_update(kms_server, kms, ring):
    key = create_key(kms, ring)
    v1 = key.primary.name
    v2 = kms.create_crypto_key_version(parent=key.name, crypto_key_version={})
    assert v2.name == f"{key.name}/cryptoKeyVersions/2" and v2.state == State.ENABLED
    assert kms.get_crypto_key(name=key.name).primary.name == v1  # a new version is not made primary
    by_name = kms.encrypt(name=v2.name, plaintext=b"secret")
    assert by_name.name == v2.name
    assert not kms.decrypt(name=key.name, ciphertext=by_name.ciphertext).used_primary
    old = kms.encrypt(name=key.name, plaintext=b"old")
    assert old.name == v1

    updated = kms.update_crypto_key_primary_version(name=key.name, crypto_key_version_id="2")
    assert updated.primary.name == v2.name == kms_server.primary_version_name(key.name)
    assert kms.decrypt(name=key.name, ciphertext=by_name.ciphertext).used_primary
    old_decrypted = kms.decrypt(name=key.name, ciphertext=old.ciphertext)
    assert old_decrypted.plaintext == b"old" and not old_decrypted.used_primary
    assert kms.encrypt(name=key.name, plaintext=b"new").name == v2.name
    with pytest.raises(exceptions.InvalidArgument, match="must be a CryptoKey"):
        kms.decrypt(name=v2.name, ciphertext=by_name.ciphertext)
    with pytest.raises(exceptions.NotFound, match="CryptoKeyVersion .*/cryptoKeyVersions/9 not found"):
        kms.update_crypto_key_primary_version(name=key.name, crypto_key_version_id="9")


def test_hsm_versions_are_pending_until_generated(kms_server, kms, ring):
    kms_server.generation_delay = 30.0
    try:
        key = create_key(kms, ring, level=Level.HSM)
        assert key.primary.state == State.PENDING_GENERATION and key.primary.protection_level == Level.HSM
        assert "generate_time" not in key.primary
        with pytest.raises(exceptions.FailedPrecondition, match="has value PENDING_GENERATION"):
            kms.encrypt(name=key.name, plaintext=b"too early")
        kms_server.advance(31)
        v2 = kms.create_crypto_key_version(parent=key.name, crypto_key_version={})
        assert v2.state == State.PENDING_GENERATION and v2.protection_level == Level.HSM
        with pytest.raises(exceptions.FailedPrecondition) as err:
            kms.update_crypto_key_primary_version(name=key.name, crypto_key_version_id="2")
        assert err.value.message == (f"The request cannot be fulfilled. Resource {v2.name} has value "
                                     "PENDING_GENERATION in field crypto_key_version.state.")
        with pytest.raises(exceptions.FailedPrecondition):
            set_state(kms, v2.name, State.DISABLED)
        response = kms.encrypt(name=key.name, plaintext=b"now")  # version 1 was generated meanwhile
        assert response.protection_level == Level.HSM and response.name == key.primary.name
        kms_server.advance(31)
        generated = kms.get_crypto_key_version(name=v2.name)
        assert generated.state == State.ENABLED and generated.generate_time >= generated.create_time
        assert kms.update_crypto_key_primary_version(name=key.name, crypto_key_version_id="2").primary.name == v2.name
        decrypted = kms.decrypt(name=key.name, ciphertext=response.ciphertext)
        assert decrypted.plaintext == b"now" and decrypted.protection_level == Level.HSM and not decrypted.used_primary
        # The delay is measured on the real clock too.
        kms_server.generation_delay = 0.2
        v3 = kms.create_crypto_key_version(parent=key.name, crypto_key_version={})
        assert kms_server.version_state(v3.name) == State.PENDING_GENERATION
        asyncio.run(asyncio.sleep(0.3))
        assert kms.get_crypto_key_version(name=v3.name).state == State.ENABLED
    finally:
        kms_server.generation_delay = 1.0


def test_disabled_versions_refuse_decrypt_until_re_enabled(kms, ring):
    key = create_key(kms, ring)
    v1 = key.primary.name
    ciphertext = kms.encrypt(name=key.name, plaintext=b"payload").ciphertext
    assert set_state(kms, v1, State.DISABLED).state == State.DISABLED
    with pytest.raises(exceptions.FailedPrecondition) as err:
        kms.decrypt(name=key.name, ciphertext=ciphertext)
    assert err.value.message == (f"The request cannot be fulfilled. Resource {v1} has value DISABLED in field "
                                 "crypto_key_version.state.")
    with pytest.raises(exceptions.FailedPrecondition, match="has value DISABLED"):
        kms.encrypt(name=key.name, plaintext=b"the primary is disabled")
    with pytest.raises(exceptions.FailedPrecondition):
        kms.update_crypto_key_primary_version(name=key.name, crypto_key_version_id="1")
    with pytest.raises(exceptions.InvalidArgument):
        set_state(kms, v1, State.DESTROYED)
    with pytest.raises(exceptions.InvalidArgument, match="cannot be updated"):
        kms.update_crypto_key_version(crypto_key_version={"name": v1, "state": State.ENABLED},
                                      update_mask=field_mask_pb2.FieldMask(paths=["state", "algorithm"]))
    assert set_state(kms, v1, State.ENABLED).state == State.ENABLED
    assert kms.decrypt(name=key.name, ciphertext=ciphertext).plaintext == b"payload"


def test_destroy_schedule_restore_and_destruction(kms_server, kms, ring):
    key = create_key(kms, ring, destroy_scheduled_duration=dt.timedelta(days=1))
    assert key.destroy_scheduled_duration == dt.timedelta(days=1)
    v1 = key.primary.name
    v2 = kms.create_crypto_key_version(parent=key.name, crypto_key_version={}).name
    ciphertext = kms.encrypt(name=key.name, plaintext=b"doomed").ciphertext

    before = kms_server.now()
    scheduled = kms.destroy_crypto_key_version(name=v1)
    assert scheduled.state == State.DESTROY_SCHEDULED
    assert before + dt.timedelta(days=1) <= scheduled.destroy_time <= kms_server.now() + dt.timedelta(days=1)
    with pytest.raises(exceptions.FailedPrecondition, match="has value DESTROY_SCHEDULED"):
        kms.destroy_crypto_key_version(name=v1)
    with pytest.raises(exceptions.FailedPrecondition):
        set_state(kms, v1, State.ENABLED)
    with pytest.raises(exceptions.FailedPrecondition, match="has value DESTROY_SCHEDULED"):
        kms.decrypt(name=key.name, ciphertext=ciphertext)
    with pytest.raises(exceptions.FailedPrecondition):
        kms.restore_crypto_key_version(name=v2)  # ENABLED: nothing to restore

    restored = kms.restore_crypto_key_version(name=v1)
    assert restored.state == State.DISABLED and "destroy_time" not in restored
    set_state(kms, v1, State.ENABLED)
    assert kms.decrypt(name=key.name, ciphertext=ciphertext).plaintext == b"doomed"

    kms.destroy_crypto_key_version(name=v1)
    kms_server.advance(12 * 3600)
    assert kms.get_crypto_key_version(name=v1).state == State.DESTROY_SCHEDULED
    kms_server.advance(12 * 3600 + 1)
    destroyed = kms.get_crypto_key_version(name=v1)
    assert destroyed.state == State.DESTROYED and destroyed.destroy_event_time == destroyed.destroy_time
    assert kms_server.version_state(v1) == State.DESTROYED
    with pytest.raises(exceptions.FailedPrecondition, match="has value DESTROYED"):
        kms.decrypt(name=key.name, ciphertext=ciphertext)
    with pytest.raises(exceptions.FailedPrecondition):
        kms.restore_crypto_key_version(name=v1)
    with pytest.raises(exceptions.FailedPrecondition):
        kms.encrypt(name=v1, plaintext=b"x")
    assert kms.get_crypto_key_version(name=v2).state == State.ENABLED  # other versions are untouched


def test_tampered_and_foreign_ciphertext_is_refused(kms, ring):
    key = create_key(kms, ring, "a")
    other = create_key(kms, ring, "b")
    ciphertext = kms.encrypt(name=key.name, plaintext=b"payload").ciphertext
    for bad in (ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]), ciphertext[:10], b"not a ciphertext at all" * 3,
                ciphertext[:5] + bytes([ciphertext[5] ^ 0x80]) + ciphertext[6:]):
        with pytest.raises(exceptions.InvalidArgument) as err:
            kms.decrypt(name=key.name, ciphertext=bad)
        assert err.value.message == "Decryption failed: the ciphertext is invalid."
    with pytest.raises(exceptions.InvalidArgument, match="Decryption failed"):
        kms.decrypt(name=other.name, ciphertext=ciphertext)


def test_not_found_already_exists_and_invalid_arguments(kms, ring):
    key = create_key(kms, ring)
    with pytest.raises(exceptions.NotFound) as err:
        kms.get_crypto_key(name=f"{ring}/cryptoKeys/missing")
    assert err.value.message == f"CryptoKey {ring}/cryptoKeys/missing not found."
    with pytest.raises(exceptions.NotFound, match="KeyRing .* not found"):
        create_key(kms, f"{LOCATION}/keyRings/no-such-ring")
    with pytest.raises(exceptions.NotFound, match="cryptoKeyVersions/5 not found"):
        kms.get_crypto_key_version(name=f"{key.name}/cryptoKeyVersions/5")
    with pytest.raises(exceptions.NotFound):
        kms.encrypt(name=f"{ring}/cryptoKeys/missing", plaintext=b"x")
    with pytest.raises(exceptions.AlreadyExists, match="already exists"):
        create_key(kms, ring)
    with pytest.raises(exceptions.AlreadyExists, match=f"KeyRing {ring} already exists"):
        kms.create_key_ring(parent=LOCATION, key_ring_id=ring.rsplit("/", 1)[1], key_ring={})
    with pytest.raises(exceptions.InvalidArgument):
        kms.get_crypto_key(name="projects/keyrotation-test/keyRings/r/cryptoKeys/k")
    with pytest.raises(exceptions.InvalidArgument):
        create_key(kms, ring, "bad id!")
    with pytest.raises(exceptions.InvalidArgument, match="ENCRYPT_DECRYPT"):
        create_key(kms, ring, "signing", purpose=kms_v1.CryptoKey.CryptoKeyPurpose.ASYMMETRIC_SIGN)
    with pytest.raises(exceptions.InvalidArgument):
        create_key(kms, ring, "external", level=Level.EXTERNAL)
    with pytest.raises(exceptions.InvalidArgument):
        create_key(kms, ring, "short", destroy_scheduled_duration=dt.timedelta(hours=1))
    with pytest.raises(exceptions.InvalidArgument, match="next_rotation_time must be set"):
        create_key(kms, ring, "rotating", rotation_period=dt.timedelta(days=90))
    assert kms.get_key_ring(name=ring).name == ring


def test_key_without_initial_version_has_no_primary(kms_server, kms, ring):
    key = create_key(kms, ring, skip_initial_version_creation=True)
    assert "primary" not in key and kms_server.primary_version_name(key.name) is None
    with pytest.raises(exceptions.FailedPrecondition, match="no primary"):
        kms.encrypt(name=key.name, plaintext=b"x")
    version = kms.create_crypto_key_version(parent=key.name, crypto_key_version={})
    assert version.name.endswith("/cryptoKeyVersions/1")
    kms.update_crypto_key_primary_version(name=key.name, crypto_key_version_id="1")
    assert kms.encrypt(name=key.name, plaintext=b"x").name == version.name


def test_pagination_and_filters(kms_server, kms, ring):
    key = create_key(kms, ring)
    for _ in range(6):
        kms.create_crypto_key_version(parent=key.name, crypto_key_version={})
    set_state(kms, f"{key.name}/cryptoKeyVersions/3", State.DISABLED)
    first = kms.list_crypto_key_versions(request={"parent": key.name, "page_size": 3})
    page = next(iter(first.pages))
    assert [v.name.rsplit("/", 1)[1] for v in page.crypto_key_versions] == ["1", "2", "3"]
    assert page.next_page_token and page.total_size == 7
    calls = kms_server.calls["ListCryptoKeyVersions"]
    names = [v.name for v in kms.list_crypto_key_versions(request={"parent": key.name, "page_size": 3})]
    assert names == [f"{key.name}/cryptoKeyVersions/{n}" for n in range(1, 8)]
    assert kms_server.calls["ListCryptoKeyVersions"] == calls + 3
    last = kms.list_crypto_key_versions(request={"parent": key.name, "page_size": 3,
                                                 "page_token": page.next_page_token})
    assert [v.name.rsplit("/", 1)[1] for v in last.crypto_key_versions] == ["4", "5", "6"]
    disabled = kms.list_crypto_key_versions(request={"parent": key.name, "filter": "state=DISABLED"})
    assert [v.name for v in disabled] == [f"{key.name}/cryptoKeyVersions/3"]
    assert len(list(kms.list_crypto_key_versions(request={"parent": key.name, "filter": "NOT state=DISABLED"}))) == 6
    with pytest.raises(exceptions.InvalidArgument, match="page token"):
        kms.list_crypto_key_versions(request={"parent": key.name, "page_token": "garbage"})

    for key_id in ("k2", "k3", "k4"):
        create_key(kms, ring, key_id)
    keys = kms.list_crypto_keys(request={"parent": ring, "page_size": 2})
    assert [k.name.rsplit("/", 1)[1] for k in keys] == ["k2", "k3", "k4", "key"]
    assert kms.list_crypto_keys(request={"parent": ring}).total_size == 4
    assert all(k.primary.state == State.ENABLED for k in kms.list_crypto_keys(parent=ring))
    assert ring in [r.name for r in kms.list_key_rings(parent=LOCATION)]


def test_update_crypto_key_and_automatic_rotation(kms_server, kms, ring):
    key = create_key(kms, ring, labels={"team": "payments"})
    next_time = kms_server.now() + dt.timedelta(days=2)
    updated = kms.update_crypto_key(
        crypto_key={"name": key.name, "rotation_period": dt.timedelta(days=30), "next_rotation_time": next_time,
                    "labels": {"team": "ledger"}},
        update_mask=field_mask_pb2.FieldMask(paths=["rotation_period", "next_rotation_time", "labels"]))
    assert updated.rotation_period == dt.timedelta(days=30) and updated.next_rotation_time == next_time
    assert dict(updated.labels) == {"team": "ledger"}
    with pytest.raises(exceptions.InvalidArgument, match="purpose"):
        kms.update_crypto_key(crypto_key={"name": key.name}, update_mask=field_mask_pb2.FieldMask(paths=["purpose"]))
    with pytest.raises(exceptions.InvalidArgument, match="at least 24 hours"):
        kms.update_crypto_key(crypto_key={"name": key.name, "rotation_period": dt.timedelta(hours=1)},
                              update_mask=field_mask_pb2.FieldMask(paths=["rotation_period"]))
    old = kms.encrypt(name=key.name, plaintext=b"before rotation").ciphertext

    kms_server.advance(2 * 86400 + 1)  # Cloud KMS rotates at next_rotation_time and makes the new version primary
    rotated = kms.get_crypto_key(name=key.name)
    assert rotated.primary.name == f"{key.name}/cryptoKeyVersions/2"
    assert rotated.next_rotation_time == next_time + dt.timedelta(days=30)
    assert not kms.decrypt(name=key.name, ciphertext=old).used_primary
    cleared = kms.update_crypto_key(crypto_key={"name": key.name},
                                    update_mask=field_mask_pb2.FieldMask(paths=["rotation_period",
                                                                                "next_rotation_time"]))
    assert "rotation_period" not in cleared and "next_rotation_time" not in cleared


# ------------------------------------------------------------------------------------------------ auth and IAM


def test_unregistered_or_revoked_credentials_are_unauthenticated(kms_server, ring):
    stranger = generate_service_account_keyfile(f"stranger@{PROJECT}.iam.gserviceaccount.com", PROJECT)
    with pytest.raises(exceptions.Unauthenticated) as err:
        make_client(kms_server, stranger).get_key_ring(name=ring)
    assert err.value.message.startswith("Request had invalid authentication credentials.")
    # The owner's email with a key that was never registered for it.
    forged = dict(generate_service_account_keyfile(kms_server.owner_email, PROJECT),
                  private_key_id=kms_server.owner_keyfile["private_key_id"])
    with pytest.raises(exceptions.Unauthenticated):
        make_client(kms_server, forged).get_key_ring(name=ring)
    revoked = service_account_for(kms_server, "revoked")
    kms_server.set_policy(ring, {"roles/cloudkms.viewer": [member(revoked)]})
    client = make_client(kms_server, revoked)
    assert client.get_key_ring(name=ring).name == ring
    kms_server.remove_service_account(revoked["client_email"])
    with pytest.raises(exceptions.Unauthenticated):
        client.get_key_ring(name=ring)


def test_missing_expired_or_narrow_tokens(kms_server, ring):
    """Raw gRPC calls with hand-made tokens: no token, an expired one, one without a KMS scope."""
    roots = Path(kms_server.ca_path).read_bytes()
    channel = grpc.secure_channel(kms_server.endpoint, grpc.ssl_channel_credentials(roots))
    get_key_ring = channel.unary_unary("/google.cloud.kms.v1.KeyManagementService/GetKeyRing",
                                       request_serializer=kms_v1.GetKeyRingRequest.serialize,
                                       response_deserializer=kms_v1.KeyRing.deserialize)
    signer = crypt.RSASigner.from_service_account_info(kms_server.owner_keyfile)
    email, now = kms_server.owner_email, int(time.time())

    def call(claims: dict | None):
        metadata = [] if claims is None else [("authorization", "Bearer " + google_jwt.encode(signer, {
            "iss": email, "sub": email, **claims}).decode())]
        return get_key_ring(kms_v1.GetKeyRingRequest(name=ring), metadata=metadata, timeout=10)

    try:
        assert call({"iat": now, "exp": now + 600, "scope": SCOPES[0]}).name == ring
        storage, expired = "https://www.googleapis.com/auth/devstorage.read_only", now - 3600
        unauthenticated, denied = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
        for claims, code in ((None, unauthenticated),
                             ({"iat": expired - 600, "exp": expired, "scope": SCOPES[0]}, unauthenticated),
                             ({"iat": now, "exp": now + 600, "scope": storage}, denied)):
            with pytest.raises(grpc.RpcError) as err:
                call(claims)
            assert err.value.code() == code
        assert err.value.details() == "Request had insufficient authentication scopes."
    finally:
        channel.close()


def _denied(call, permission: str, resource: str) -> None:
    """``call`` is refused with PERMISSION_DENIED, naming the permission and the resource, exactly."""
    with pytest.raises(exceptions.PermissionDenied) as err:
        call()
    assert err.value.message == (f"Permission 'cloudkms.{permission}' denied on resource '{resource}' "
                                 "(or it may not exist).")


def test_least_privilege_roles(kms_server, kms, ring):
    key = create_key(kms, ring)
    other = create_key(kms, ring, "other")
    viewer, user, encrypter = (service_account_for(kms_server, n) for n in ("viewer", "user", "encrypter"))
    kms_server.set_policy(ring, {"roles/cloudkms.viewer": [member(viewer)]})
    kms_server.set_policy(key.name, {"roles/cloudkms.cryptoKeyEncrypterDecrypter": [member(user)],
                                     "roles/cloudkms.cryptoKeyEncrypter": [member(encrypter)]})

    as_viewer = make_client(kms_server, viewer)
    assert as_viewer.get_crypto_key(name=key.name).primary.state == State.ENABLED
    assert len(list(as_viewer.list_crypto_key_versions(parent=key.name))) == 1
    _denied(lambda: as_viewer.encrypt(name=key.name, plaintext=b"x"), "cryptoKeyVersions.useToEncrypt", key.name)
    _denied(lambda: as_viewer.create_crypto_key_version(parent=key.name, crypto_key_version={}),
            "cryptoKeyVersions.create", key.name)
    _denied(lambda: as_viewer.get_iam_policy(request={"resource": key.name}), "cryptoKeys.getIamPolicy", key.name)

    as_user = make_client(kms_server, user)
    ciphertext = as_user.encrypt(name=key.name, plaintext=b"x").ciphertext
    assert as_user.decrypt(name=key.name, ciphertext=ciphertext).plaintext == b"x"
    _denied(lambda: as_user.get_crypto_key(name=key.name), "cryptoKeys.get", key.name)
    # the grant is on the key, not the ring
    _denied(lambda: as_user.encrypt(name=other.name, plaintext=b"x"), "cryptoKeyVersions.useToEncrypt", other.name)
    missing = f"{ring}/cryptoKeys/missing"  # no existence leak: refused as the other key is
    _denied(lambda: as_user.encrypt(name=missing, plaintext=b"x"), "cryptoKeyVersions.useToEncrypt", missing)

    as_encrypter = make_client(kms_server, encrypter)
    ciphertext = as_encrypter.encrypt(name=key.name, plaintext=b"y").ciphertext
    assert as_user.decrypt(name=key.name, ciphertext=ciphertext).plaintext == b"y"
    _denied(lambda: as_encrypter.decrypt(name=key.name, ciphertext=ciphertext), "cryptoKeyVersions.useToDecrypt",
            key.name)


def test_custom_role_and_iam_policy_rpcs(kms_server, kms, ring):
    key = create_key(kms, ring)
    role = f"projects/{PROJECT}/roles/rotator"
    kms_server.define_role(role, ["cloudkms.cryptoKeys.get", "cloudkms.cryptoKeys.update",
                                  "cloudkms.cryptoKeyVersions.create"])
    rotator = service_account_for(kms_server, "rotator")
    policy = kms.get_iam_policy(request={"resource": key.name})
    assert not policy.bindings
    policy.bindings.append(policy_pb2.Binding(role=role, members=[member(rotator)]))
    stored = kms.set_iam_policy(request={"resource": key.name, "policy": policy})
    assert [(b.role, list(b.members)) for b in stored.bindings] == [(role, [member(rotator)])]
    assert stored.etag != policy.etag
    with pytest.raises(exceptions.Aborted):
        kms.set_iam_policy(request={"resource": key.name, "policy": policy})  # stale etag
    with pytest.raises(exceptions.InvalidArgument, match="roles/no.such.role"):
        kms.set_iam_policy(request={"resource": key.name, "policy": policy_pb2.Policy(
            bindings=[policy_pb2.Binding(role="roles/no.such.role", members=[member(rotator)])])})
    assert kms_server.get_policy(key.name) == {role: [member(rotator)]}

    as_rotator = make_client(kms_server, rotator)
    version = as_rotator.create_crypto_key_version(parent=key.name, crypto_key_version={})
    assert as_rotator.update_crypto_key_primary_version(name=key.name, crypto_key_version_id="2").primary.name == (
        version.name)
    with pytest.raises(exceptions.PermissionDenied, match="useToEncrypt"):
        as_rotator.encrypt(name=key.name, plaintext=b"x")
    with pytest.raises(exceptions.PermissionDenied, match="cloudkms.cryptoKeyVersions.destroy"):
        as_rotator.destroy_crypto_key_version(name=version.name)
    granted = as_rotator.test_iam_permissions(request={"resource": key.name, "permissions": [
        "cloudkms.cryptoKeys.update", "cloudkms.cryptoKeyVersions.useToDecrypt"]})
    assert list(granted.permissions) == ["cloudkms.cryptoKeys.update"]


# ------------------------------------------------------------------------------------------------ transports


def test_concurrent_clients(kms_server, kms, ring):
    key = create_key(kms, ring)
    before = kms_server.calls["Encrypt"]

    def round_trip(i: int) -> bool:
        data = f"value {i}".encode()
        return kms.decrypt(name=key.name, ciphertext=kms.encrypt(name=key.name, plaintext=data).ciphertext
                           ).plaintext == data

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, range(64)))
    assert kms_server.calls["Encrypt"] == before + 64


def test_async_client(kms_server, ring):
    async def scenario() -> tuple[bytes, bool]:
        client = kms_v1.KeyManagementServiceAsyncClient(credentials=credentials(kms_server.owner_keyfile),
                                                        client_options=ClientOptions(api_endpoint=kms_server.endpoint))
        key = await client.create_crypto_key(parent=ring, crypto_key_id="async", crypto_key={
            "purpose": kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT})
        encrypted = await client.encrypt(name=key.name, plaintext=b"async payload")
        decrypted = await client.decrypt(name=key.name, ciphertext=encrypted.ciphertext)
        return decrypted.plaintext, decrypted.used_primary

    assert asyncio.run(scenario()) == (b"async payload", True)


def test_a_second_server_reuses_the_trusted_certificate(kms_server):
    tls_dir = Path(kms_server.ca_path).parent
    certificate = Path(kms_server.ca_path).read_bytes()
    with CloudKmsTestServer(tls_dir=tls_dir, project="second-project") as second:
        assert Path(second.ca_path).read_bytes() == certificate and second.port != kms_server.port
        client = make_client(second, second.owner_keyfile)
        ring = client.create_key_ring(parent="projects/second-project/locations/us-east1", key_ring_id="r",
                                      key_ring={})
        assert client.get_key_ring(name=ring.name).name == ring.name
        with pytest.raises(exceptions.Unauthenticated):  # accounts are per server
            make_client(second, kms_server.owner_keyfile).get_key_ring(name=ring.name)
        nobody = second.add_service_account("nobody@second-project.iam.gserviceaccount.com")
        with pytest.raises(exceptions.PermissionDenied, match="cloudkms.keyRings.get"):
            make_client(second, nobody).get_key_ring(name=ring.name)
