"""Google Cloud KMS, through a ``KeyManagementServiceClient`` (from the google provider's ``CloudKMSHook``).

A key class's master key is one CryptoKey (``projects/P/locations/L/keyRings/R/cryptoKeys/K``)
and its versions are the CryptoKeyVersions, numbered by Cloud KMS from 1. The lifecycle follows
Tink's plain terms:

* **add** (:meth:`rotate`): ``CreateCryptoKeyVersion``. The new version is not the primary yet, and
  HSM and external keys pass through ``PENDING_GENERATION`` before they are ``ENABLED``;
* **promote** (:meth:`promote`): ``UpdateCryptoKeyPrimaryVersion``, once the version is enabled;
* **disable** and **destroy** (:meth:`retire_below`): ``UpdateCryptoKeyVersion(state=DISABLED)``;
  with ``trim``, ``DestroyCryptoKeyVersion`` as well. Cloud KMS schedules the destruction for
  ``destroy_scheduled_duration`` later (:meth:`deletion_dates`), and ``RestoreCryptoKeyVersion``
  can undo it until then.

Cloud KMS has no server-side re-encrypt: :meth:`rewrap` decrypts each wrapped secret and encrypts
it again with the target version, keeping the plaintext in memory only. Wrapped secrets are
``gcp:v<N>:<base64 ciphertext>``, where N is the version Cloud KMS names in ``EncryptResponse.name``,
so the census reads versions without a call; ``DecryptResponse.used_primary`` cross-checks that
label against the key's primary. Every request and response carries CRC32C checksums, verified here.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import google_crc32c
from google.api_core import exceptions as gexc
from google.cloud import kms_v1
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from keyrotation.backends.base import ClientOptions, KeyState, KeyVersion, KmsBackend, each_distinct, versions_text
from keyrotation.backends.retry import RetryPolicy, TransientFailure, call_with_retries
from keyrotation.errors import BackendError, ConfigError, KeyNotFoundError, KmsUnreachable, PermissionDenied

if TYPE_CHECKING:
    from keyrotation.config import KeyClass

log = logging.getLogger(__name__)
T = TypeVar("T")

ProtectionLevel = Literal["SOFTWARE", "HSM"]
KEY_NAME = re.compile(r"^projects/([^/]+)/locations/([^/]+)/keyRings/([^/]+)/cryptoKeys/([^/]+)$")
_CIPHERTEXT = re.compile(r"^gcp:v(\d+):")
_VERSION_NAME = re.compile(r"/cryptoKeyVersions/(\d+)$")
_RETRYABLE = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError, gexc.TooManyRequests,
              gexc.ResourceExhausted, gexc.Aborted, gexc.BadGateway, gexc.GatewayTimeout)
_DENIED = (gexc.PermissionDenied, gexc.Unauthenticated, gexc.Unauthorized, gexc.Forbidden)
State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState
#: Versions that may still encrypt or decrypt (or soon will).
LIVE_STATES = (State.ENABLED, State.PENDING_GENERATION, State.PENDING_IMPORT)
REWRAP_THREADS = 8
REQUEST_TIMEOUT = 30.0


def crc32c(data: bytes) -> int:
    return google_crc32c.value(data)


def version_resource_name(key_ref: str, version: int) -> str:
    """``projects/.../cryptoKeys/K/cryptoKeyVersions/N``: the resource name of version N of a CryptoKey."""
    return f"{key_ref}/cryptoKeyVersions/{int(version)}"


def version_number(version_name: str) -> int:
    match = _VERSION_NAME.search(version_name or "")
    if not match:
        raise BackendError(f"not a Cloud KMS CryptoKeyVersion name: {version_name!r}")
    return int(match.group(1))


def _aware(ts: Any) -> datetime | None:
    """A protobuf timestamp (as the client returns it: a datetime, or unset) as an aware datetime."""
    if ts is None:
        return None
    if isinstance(ts, datetime):
        if ts.year <= 1970 and ts.timestamp() <= 0:
            return None
        return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    return None


class GcpKmsBackend(KmsBackend):
    kind = "gcp_kms"
    server_side_rewrap = False
    options_section = "gcp"
    storage_scheme = "gs"
    versions_may_be_pending = True
    promotes_separately = True

    def __init__(self, client: kms_v1.KeyManagementServiceClient, key_ref: str, *, key_class: str = "",
                 protection_level: ProtectionLevel = "SOFTWARE", rotation_period: timedelta | None = None,
                 destroy_scheduled_duration: timedelta | None = None, retry: RetryPolicy | None = None) -> None:
        match = KEY_NAME.match(key_ref)
        if not match:
            raise BackendError(f"Cloud KMS key {key_ref!r} is not a CryptoKey resource name "
                               "(projects/P/locations/L/keyRings/R/cryptoKeys/K)")
        self.client = client
        self.key_ref = key_ref
        self.key_ring = key_ref.rsplit("/cryptoKeys/", 1)[0]
        self.key_class = key_class
        self.protection_level = protection_level
        self.rotation_period = rotation_period
        self.destroy_scheduled_duration = destroy_scheduled_duration
        self.retry = retry or RetryPolicy(jitter=True)
        #: Cloud KMS calls made, by API name (for progress logs, plans and benchmarks).
        self.calls: dict[str, int] = {}
        self._calls_lock = threading.Lock()
        self._primary: int | None = None

    @classmethod
    def from_key_class(cls, kc: KeyClass, client: kms_v1.KeyManagementServiceClient,
                       retry: RetryPolicy | None = None) -> GcpKmsBackend:
        options, rotation = kc.gcp_options, kc.rotation
        return cls(client, kc.key_ref, key_class=kc.name, protection_level=options.protection_level,
                   rotation_period=rotation.due_after if options.sync_rotation_schedule else None,
                   destroy_scheduled_duration=options.destroy_scheduled_duration, retry=retry)

    @classmethod
    def key_class_problem(cls, kc: KeyClass) -> str | None:
        if not KEY_NAME.match(kc.key_ref):
            return ("key_ref must be a CryptoKey resource name "
                    "(projects/P/locations/L/keyRings/R/cryptoKeys/K) for backend gcp_kms")
        return None

    @classmethod
    def object_formats(cls, kc: KeyClass) -> frozenset[str]:
        """A CMEK object's kmsKeyName names the CryptoKeyVersion that protects it."""
        return frozenset({"gcs_cmek_objects"})

    @classmethod
    def client_from_environment(cls, kc: KeyClass, options: ClientOptions) -> kms_v1.KeyManagementServiceClient:
        """A Cloud KMS client with Google's application default credentials (``GOOGLE_APPLICATION_CREDENTIALS``,
        the metadata server), at ``options.gcp_kms_endpoint`` if given."""
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloudkms"])
        except DefaultCredentialsError as exc:
            raise ConfigError(f"no Google credentials for the gcp_kms key class {kc.name!r}: set "
                              f"GOOGLE_APPLICATION_CREDENTIALS to a service account key file ({exc})") from None
        client_options = {"api_endpoint": options.gcp_kms_endpoint} if options.gcp_kms_endpoint else None
        return kms_v1.KeyManagementServiceClient(credentials=credentials, client_options=client_options)

    def version_name(self, version: int) -> str:
        return version_resource_name(self.key_ref, version)

    # -- calls --------------------------------------------------------------------------------
    def _call(self, api: str, action: str, done: Callable[[], T | None] | None = None, **request: Any) -> Any:
        """One Cloud KMS request, retried with backoff on unavailability and quota errors."""
        method = getattr(self.client, api)

        def attempt() -> Any:
            with self._calls_lock:
                self.calls[api] = self.calls.get(api, 0) + 1
            # The client's own retry is off: one policy (ours) decides, and says when it gives up.
            return method(request=request, retry=None, timeout=REQUEST_TIMEOUT)

        describe = f"Cloud KMS key {self.key_ref!r}: {action}"
        try:
            return call_with_retries(attempt, policy=self.retry, retryable=_RETRYABLE, describe=describe, done=done)
        except TransientFailure as exc:
            raise KmsUnreachable(f"KMS unreachable or over quota: {exc}") from None
        except _DENIED as exc:
            raise PermissionDenied(f"{describe} refused: {exc.message} (the role's IAM bindings do not allow "
                                   "it)") from None
        except gexc.NotFound as exc:
            raise KeyNotFoundError(f"{describe} failed: {exc.message}") from None
        except gexc.GoogleAPICallError as exc:
            raise BackendError(f"{describe} failed: {type(exc).__name__}: {exc.message}") from None

    def _crypto_key(self) -> kms_v1.CryptoKey | None:
        try:
            return self._call("get_crypto_key", "read the key", name=self.key_ref)
        except KeyNotFoundError:
            return None

    def _versions(self) -> list[kms_v1.CryptoKeyVersion]:
        pager = self._call("list_crypto_key_versions", "list versions", parent=self.key_ref, page_size=1000)
        return list(pager)

    def version(self, version: int) -> kms_v1.CryptoKeyVersion:
        """One CryptoKeyVersion as Cloud KMS describes it (state, times, protection level)."""
        return self._call("get_crypto_key_version", f"read v{version}", name=self.version_name(version))

    # -- state --------------------------------------------------------------------------------
    def key_state(self) -> KeyState:
        key = self._crypto_key()
        if key is None:
            return KeyState(key_ref=self.key_ref, exists=False)
        all_versions = self._versions()
        if not all_versions:
            return KeyState(key_ref=self.key_ref, exists=True, algorithm=key.version_template.algorithm.name)
        primary = version_number(key.primary.name) if key.primary.name else 0
        self._primary = primary or None
        live = {version_number(v.name): v for v in all_versions if v.state in LIVE_STATES}
        numbers = sorted(version_number(v.name) for v in all_versions)
        latest = numbers[-1]
        return KeyState(
            key_ref=self.key_ref, exists=True, latest_version=latest,
            min_decryption_version=min(live) if live else latest + 1,
            min_encryption_version=primary, min_available_version=numbers[0],
            versions={n: KeyVersion(n, _aware(v.create_time)) for n, v in sorted(live.items())},
            algorithm=key.version_template.algorithm.name,
        )

    def _require_key(self) -> KeyState:
        state = self.key_state()
        if not state.exists:
            raise KeyNotFoundError(f"Cloud KMS key {self.key_ref!r} does not exist")
        return state

    def primary_version(self) -> int:
        key = self._crypto_key()
        if key is None:
            raise KeyNotFoundError(f"Cloud KMS key {self.key_ref!r} does not exist")
        if not key.primary.name:
            raise BackendError(f"Cloud KMS key {self.key_ref!r} has no primary version")
        self._primary = version_number(key.primary.name)
        return self._primary

    # -- operations ---------------------------------------------------------------------------
    def _rotation_schedule(self) -> dict[str, Any]:
        if not self.rotation_period:
            return {}
        period = duration_pb2.Duration(seconds=int(self.rotation_period.total_seconds()))
        when = timestamp_pb2.Timestamp()
        when.FromDatetime(datetime.now(UTC) + self.rotation_period)
        return {"rotation_period": period, "next_rotation_time": when}

    def create_key(self) -> KeyState:
        """Create the key ring if missing, then the CryptoKey with its first version as primary."""
        try:
            self._call("get_key_ring", "read the key ring", name=self.key_ring)
        except KeyNotFoundError:
            parent, ring_id = self.key_ring.rsplit("/keyRings/", 1)
            try:
                self._call("create_key_ring", "create the key ring", parent=parent, key_ring_id=ring_id, key_ring={})
            except BackendError as exc:
                if "AlreadyExists" not in str(exc):  # created meanwhile by another run: fine
                    raise
        key: dict[str, Any] = {
            "purpose": kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT,
            "version_template": {"algorithm": kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm
                                 .GOOGLE_SYMMETRIC_ENCRYPTION,
                                 "protection_level": getattr(kms_v1.ProtectionLevel, self.protection_level)},
            "labels": {"managed-by": "keyrotation", **({"key-class": self.key_class} if self.key_class else {})},
            **self._rotation_schedule(),
        }
        if self.destroy_scheduled_duration:
            key["destroy_scheduled_duration"] = duration_pb2.Duration(
                seconds=int(self.destroy_scheduled_duration.total_seconds()))
        self._call("create_crypto_key", "create the key", parent=self.key_ring,
                   crypto_key_id=self.key_ref.rsplit("/", 1)[1], crypto_key=key)
        return self.key_state()

    def sync_rotation_schedule(self) -> None:
        """Set Cloud KMS's own ``rotation_period`` and ``next_rotation_time`` from the key class policy."""
        schedule = self._rotation_schedule()
        if schedule:
            self._call("update_crypto_key", "set the rotation schedule",
                       crypto_key={"name": self.key_ref, **schedule},
                       update_mask=field_mask_pb2.FieldMask(paths=["rotation_period", "next_rotation_time"]))

    def rotate(self) -> int:
        """Add a version (not yet primary: :meth:`promote` makes it so once it is enabled)."""
        before = self._require_key().latest_version

        def added_already() -> int | None:  # a retry after a lost response must not add a second version
            latest = self.key_state().latest_version
            return latest if latest > before else None

        created = self._call("create_crypto_key_version", "add a version", done=added_already,
                             parent=self.key_ref, crypto_key_version={})
        number = created if isinstance(created, int) else version_number(created.name)
        log.info("Cloud KMS key %s: added v%d (%s)", self.key_ref, number,
                 created.state.name if not isinstance(created, int) else "created earlier")
        self.sync_rotation_schedule()
        return number

    def promote(self, version: int) -> bool:
        """Make ``version`` the primary (``UpdateCryptoKeyPrimaryVersion``); False if it already was."""
        if self.primary_version() == version:
            return False
        self._call("update_crypto_key_primary_version", f"make v{version} the primary", name=self.key_ref,
                   crypto_key_version_id=str(version))
        self._primary = version
        return True

    def is_version_usable(self, version: int) -> bool:
        """Enabled (HSM versions are ``PENDING_GENERATION`` first); reading it needs no encrypt permission."""
        try:
            return self.version(version).state == State.ENABLED
        except KeyNotFoundError:
            return False

    def wrap(self, plaintext: bytes, version: int | None = None) -> str:
        name = self.key_ref if version is None else self.version_name(version)
        resp = self._call("encrypt", f"encrypt with {'the primary' if version is None else f'v{version}'}",
                          name=name, plaintext=plaintext, plaintext_crc32c=crc32c(plaintext))
        if not resp.verified_plaintext_crc32c:
            raise BackendError(f"Cloud KMS key {self.key_ref!r}: encrypt did not verify the plaintext checksum "
                               "(corrupted in transit)")
        if resp.ciphertext_crc32c != crc32c(resp.ciphertext):
            raise BackendError(f"Cloud KMS key {self.key_ref!r}: the ciphertext does not match its checksum "
                               "(corrupted in transit)")
        used = version_number(resp.name)
        if version is not None and used != version:
            raise BackendError(f"Cloud KMS key {self.key_ref!r}: asked to encrypt with v{version}, used v{used}")
        return f"gcp:v{used}:" + base64.b64encode(resp.ciphertext).decode("ascii")

    def _prefix(self, wrapped: str) -> re.Match[str]:
        match = _CIPHERTEXT.match(wrapped or "")
        if not match:
            raise BackendError(f"Cloud KMS key {self.key_ref!r}: not a keyrotation Cloud KMS ciphertext "
                               "(no gcp:vN: prefix)")
        return match

    def _split(self, wrapped: str) -> tuple[int, bytes]:
        """The version a wrapped secret names and its Cloud KMS ciphertext."""
        match = self._prefix(wrapped)
        return int(match.group(1)), base64.b64decode(wrapped[match.end():])

    def unwrap(self, wrapped: str) -> bytes:
        number, blob = self._split(wrapped)
        resp = self._call("decrypt", f"decrypt (ciphertext version v{number})", name=self.key_ref, ciphertext=blob,
                          ciphertext_crc32c=crc32c(blob))
        if resp.plaintext_crc32c != crc32c(resp.plaintext):
            raise BackendError(f"Cloud KMS key {self.key_ref!r}: the decrypted data does not match its checksum "
                               "(corrupted in transit)")
        self._check_label(number, resp.used_primary)
        return resp.plaintext

    def _check_label(self, number: int, used_primary: bool) -> None:
        """``used_primary`` must agree with the version the wrapped form names, or the census would lie."""
        if self._primary is None or (number == self._primary) != used_primary:
            self.primary_version()  # the primary may have moved since it was last read
        if (number == self._primary) != used_primary:
            raise BackendError(
                f"Cloud KMS key {self.key_ref!r}: a ciphertext labelled v{number} was decrypted "
                f"{'with' if used_primary else 'without'} the primary v{self._primary}: the label is wrong")

    def rewrap(self, wrapped: list[str], version: int | None = None) -> list[str]:
        """Decrypt and encrypt again under ``version`` (default: the primary). Cloud KMS has no
        server-side re-encrypt; each plaintext lives in this process's memory for one call."""
        target = version if version is not None else self.primary_version()

        def one(item: str) -> str:
            if self.version_of(item) == target:
                return item
            return self.wrap(self.unwrap(item), target)

        # A file's key material repeats its wrapped KEK (one per data key): each distinct one costs two calls.
        return each_distinct(wrapped, one, REWRAP_THREADS)

    def version_of(self, wrapped: str) -> int:
        return int(self._prefix(wrapped).group(1))

    def version_of_key_id(self, key_id: str) -> int | None:
        """The version named by a CryptoKeyVersion resource name (a GCS object's ``kmsKeyName``); None if
        it is not a version of this key."""
        if not key_id.startswith(f"{self.key_ref}/cryptoKeyVersions/"):
            return None
        return version_number(key_id)

    def key_id_of(self, version: int) -> str:
        """The KMS key name that encrypts new data under ``version``: the CryptoKey, whose primary it must be
        (GCS and other CMEK services always encrypt with the primary)."""
        primary = self.primary_version()
        if primary != version:
            raise BackendError(f"Cloud KMS key {self.key_ref!r}: v{version} is not the primary (v{primary}); CMEK "
                               "services encrypt with the primary only: promote it first (update_reference)")
        return self.key_ref

    def retirement_effect(self, versions: list[int], *, trim: bool = False) -> str:
        named = versions_text(versions)
        effect = f"disables {named} of `{self.key_ref}`: no decryption under {named}"
        if not trim:
            return effect + " (no trim: a disabled version can be enabled again)"
        after = (f"{self.destroy_scheduled_duration.days} days" if self.destroy_scheduled_duration
                 else "the key's scheduled-destruction duration (Cloud KMS's default: 30 days)")
        return effect + f"; trim schedules the destruction of that key material {after} after the approval " \
            "(restorable until then)"

    def retire_below(self, min_version: int, *, trim: bool = False) -> KeyState:
        """Disable every version below ``min_version``; with ``trim``, schedule their destruction too."""
        state = self._require_key()
        if min_version > state.latest_version:
            raise BackendError(f"Cloud KMS key {self.key_ref!r}: cannot retire below v{min_version}, latest is "
                               f"v{state.latest_version}")
        if state.min_encryption_version and state.min_encryption_version < min_version:
            raise BackendError(f"Cloud KMS key {self.key_ref!r}: the primary is v{state.min_encryption_version}, "
                               f"below v{min_version}: promote a newer version before retiring")
        for v in self._versions():
            number = version_number(v.name)
            if number >= min_version:
                continue
            if v.state == State.ENABLED:
                self._call("update_crypto_key_version", f"disable v{number}",
                           crypto_key_version={"name": v.name, "state": State.DISABLED},
                           update_mask=field_mask_pb2.FieldMask(paths=["state"]))
                log.info("Cloud KMS key %s: v%d disabled", self.key_ref, number)
            if trim and v.state in (State.ENABLED, State.DISABLED):
                destroyed = self._call("destroy_crypto_key_version", f"destroy v{number}", name=v.name)
                log.info("Cloud KMS key %s: v%d destruction scheduled for %s (restorable until then)",
                         self.key_ref, number, _aware(destroyed.destroy_time))
        # Read back: cryptoKeyVersions.update, which disables, re-enables as well (IAM cannot tell them apart).
        after = self.key_state()
        if after.min_decryption_version < min_version:
            raise BackendError(f"Cloud KMS key {self.key_ref!r}: after retiring below v{min_version}, "
                               f"v{after.min_decryption_version} is still enabled (or pending generation)")
        return after

    def deletion_dates(self) -> dict[int, datetime]:
        """Versions scheduled for destruction (or destroyed), with the time Cloud KMS destroys them."""
        out = {}
        for v in self._versions():
            when = _aware(v.destroy_time) or _aware(v.destroy_event_time)
            if v.state in (State.DESTROY_SCHEDULED, State.DESTROYED) and when:
                out[version_number(v.name)] = when
        return out
