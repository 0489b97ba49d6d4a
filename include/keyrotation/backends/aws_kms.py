"""AWS KMS, through a boto3 KMS client (from the amazon provider's ``AwsBaseHook`` in Airflow).

AWS KMS has no key versions a caller can address, so a key class chooses how versions map onto it:

* ``alias``: each version is its own KMS key. ``alias/<name>`` points at the current one and
  ``alias/<name>/v<N>`` names version N for good. Rotating creates a key and moves the alias;
  retiring disables the old keys and schedules their deletion (7 to 30 days, cancellable until
  then). This is the strategy that makes retirement real on AWS.
* ``on_demand``: one KMS key whose backing key material AWS rotates (``RotateKeyOnDemand``, or
  yearly-ish with ``EnableKeyRotation``). Version 1 is the material the key was created with and
  version N+1 the material of the N-th rotation in ``ListKeyRotations``. AWS keeps every material
  in perpetuity and decrypts with whichever one a ciphertext names, so old versions can never be
  retired: :attr:`can_retire` is false and the retirement gate says so.

Wrapped secrets are ``aws:v<N>:<base64 ciphertext blob>``: the version is readable without a call.
Re-wrapping is the server-side ``ReEncrypt``; plaintext never leaves KMS.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, EndpointConnectionError

from keyrotation.backends.base import ClientOptions, KeyState, KeyVersion, KmsBackend, each_distinct, versions_text
from keyrotation.backends.retry import RetryPolicy, TransientFailure, call_with_retries
from keyrotation.errors import BackendError, KeyNotFoundError, KmsUnreachable, PermissionDenied

if TYPE_CHECKING:
    from keyrotation.config import KeyClass

log = logging.getLogger(__name__)
T = TypeVar("T")

Strategy = Literal["alias", "on_demand"]
_CIPHERTEXT = re.compile(r"^aws:v(\d+):")
TAG_KEY_CLASS = "keyrotation:key-class"
TAG_VERSION = "keyrotation:version"
# Worth retrying: the shared request quota (ThrottlingException) and server-side failures.
_RETRYABLE_CODES = {"ThrottlingException", "Throttling", "RequestLimitExceeded", "TooManyRequestsException",
                    "KMSInternalException", "DependencyTimeoutException", "InternalFailure", "ServiceUnavailable"}
_DENIED_CODES = {"AccessDeniedException", "AccessDenied", "UnrecognizedClientException", "403",
                 "InvalidClientTokenId", "IncompleteSignature", "ExpiredTokenException"}
REWRAP_THREADS = 8


class _Retryable(Exception):
    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class RateLimiter:
    """At most ``per_second`` calls per second from this process (a token bucket), shared by threads."""

    def __init__(self, per_second: float | None) -> None:
        self.interval = 1.0 / per_second if per_second else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + self.interval
        if wait > 0:
            time.sleep(wait)


class AwsKmsBackend(KmsBackend):
    kind = "aws_kms"
    server_side_rewrap = True
    options_section = "aws"
    storage_scheme = "s3"

    def __init__(self, client: Any, key_ref: str, *, strategy: Strategy = "alias", key_class: str = "",
                 rotation_period_days: int | None = None, deletion_window_days: int = 30,
                 retry: RetryPolicy | None = None, max_requests_per_second: float | None = None) -> None:
        if strategy not in ("alias", "on_demand"):
            raise BackendError(f"AWS KMS key {key_ref!r}: unknown strategy {strategy!r} (use alias or on_demand)")
        if strategy == "alias" and not key_ref.startswith("alias/"):
            raise BackendError(f"AWS KMS key {key_ref!r}: the alias strategy needs an alias (alias/<name>)")
        self.client = client
        self.key_ref = key_ref
        self.strategy = strategy
        self.key_class = key_class
        self.rotation_period_days = rotation_period_days
        self.deletion_window_days = deletion_window_days
        self.retry = retry or RetryPolicy(jitter=True)
        self.limiter = RateLimiter(max_requests_per_second)
        self.can_retire = strategy == "alias"  # as retires_versions says of a key class
        self.cannot_retire_reason = (
            "" if self.can_retire else
            f"AWS KMS keeps every key material of {key_ref} in perpetuity (on_demand strategy): old versions "
            "cannot be disabled or deleted. Use the alias strategy where retirement is required."
        )
        #: KMS calls made, by API name (for progress logs, plans and benchmarks).
        self.calls: dict[str, int] = {}

    @classmethod
    def from_key_class(cls, kc: KeyClass, client: Any, retry: RetryPolicy | None = None) -> AwsKmsBackend:
        options = kc.aws_options
        return cls(client, kc.key_ref, strategy=options.strategy, key_class=kc.name,
                   rotation_period_days=options.rotation_period_days, deletion_window_days=options.deletion_window_days,
                   retry=retry, max_requests_per_second=options.max_requests_per_second)

    @classmethod
    def key_class_problem(cls, kc: KeyClass) -> str | None:
        if kc.aws_options.strategy == "alias" and not kc.key_ref.startswith("alias/"):
            return "key_ref must be an alias (alias/<name>) for the aws_kms alias strategy"
        return None

    @classmethod
    def retires_versions(cls, kc: KeyClass) -> bool:
        return kc.aws_options.strategy == "alias"

    @classmethod
    def object_formats(cls, kc: KeyClass) -> frozenset[str]:
        """SSE-KMS objects name their key, so an alias's versions (one key each) tell them apart."""
        return frozenset({"sse_kms_objects"}) if kc.aws_options.strategy == "alias" else frozenset()

    @classmethod
    def client_from_environment(cls, kc: KeyClass, options: ClientOptions) -> Any:
        """A boto3 KMS client: credentials from the standard AWS chain (env, profile, instance role)."""
        import boto3
        from botocore.config import Config

        return boto3.client("kms", endpoint_url=options.aws_endpoint_url,
                            region_name=options.aws_region or kc.aws_options.region_name,
                            config=Config(connect_timeout=options.timeout, read_timeout=options.timeout))

    # -- calls --------------------------------------------------------------------------------
    def _call(self, api: str, action: str, done: Callable[[], T | None] | None = None, **kwargs: Any) -> Any:
        """One KMS request, rate-limited, retried with backoff and jitter on throttling and 5xx."""
        method = getattr(self.client, api)

        def attempt() -> Any:
            self.limiter.acquire()
            self.calls[api] = self.calls.get(api, 0) + 1
            try:
                return method(**kwargs)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
                if code in _RETRYABLE_CODES or status >= 500:
                    raise _Retryable(exc) from None
                raise
            except (EndpointConnectionError, ConnectionError) as exc:
                raise _Retryable(exc) from None

        describe = f"AWS KMS key {self.key_ref!r}: {action}"
        try:
            return call_with_retries(attempt, policy=self.retry, retryable=(_Retryable,), describe=describe,
                                     done=done)
        except TransientFailure as exc:
            raise KmsUnreachable(f"KMS unreachable or throttled: {exc}") from None
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code, message = error.get("Code", ""), error.get("Message", "")
            if code in _DENIED_CODES:
                raise PermissionDenied(f"{describe} refused: {code}: {message} (the role's IAM policy does not "
                                       "allow it)") from None
            if code == "NotFoundException":
                raise KeyNotFoundError(f"{describe} failed: {code}: {message}") from None
            raise BackendError(f"{describe} failed: {code}: {message}") from None
        except BotoCoreError as exc:
            raise BackendError(f"{describe} failed: {exc}") from None

    def _paginate(self, api: str, result_key: str, action: str, **kwargs: Any) -> list[dict]:
        items: list[dict] = []
        marker: str | None = None
        while True:
            page = self._call(api, action, **kwargs, **({"Marker": marker} if marker else {}))
            items.extend(page.get(result_key) or [])
            if not page.get("Truncated"):
                return items
            marker = page["NextMarker"]

    # -- state --------------------------------------------------------------------------------
    def _version_aliases(self) -> dict[int, str]:
        """Version number -> key id, from the ``alias/<name>/v<N>`` aliases (alias strategy)."""
        pattern = re.compile(rf"^{re.escape(self.key_ref)}/v(\d+)$")
        out = {}
        for alias in self._paginate("list_aliases", "Aliases", "list aliases"):
            match = pattern.match(alias.get("AliasName", ""))
            if match and alias.get("TargetKeyId"):
                out[int(match.group(1))] = alias["TargetKeyId"]
        return out

    def _describe(self, key_id: str) -> dict | None:
        try:
            return self._call("describe_key", f"describe {key_id}", KeyId=key_id)["KeyMetadata"]
        except KeyNotFoundError:
            return None

    def key_state(self) -> KeyState:
        return self._alias_state() if self.strategy == "alias" else self._on_demand_state()

    def _alias_state(self) -> KeyState:
        aliases = self._version_aliases()
        if not aliases:
            return KeyState(key_ref=self.key_ref, exists=False)
        versions, usable, spec = {}, [], ""
        for number, key_id in sorted(aliases.items()):
            meta = self._describe(key_id)
            if meta is None:  # deleted after its pending window
                continue
            spec = meta.get("KeySpec") or meta.get("CustomerMasterKeySpec") or spec
            if meta.get("KeyState") == "Enabled":
                usable.append(number)
                versions[number] = KeyVersion(number, _aware(meta.get("CreationDate")))
        latest = max(aliases)
        return KeyState(key_ref=self.key_ref, exists=True, latest_version=latest,
                        min_decryption_version=min(usable) if usable else latest + 1,
                        min_encryption_version=latest, min_available_version=min(aliases), versions=versions,
                        algorithm=spec)

    def _on_demand_state(self) -> KeyState:
        meta = self._describe(self.key_ref)
        if meta is None:
            return KeyState(key_ref=self.key_ref, exists=False)
        rotations = sorted(self._paginate("list_key_rotations", "Rotations", "list rotations",
                                          KeyId=meta["KeyId"]), key=lambda r: r["RotationDate"])
        versions = {1: KeyVersion(1, _aware(meta.get("CreationDate")))}
        for i, rotation in enumerate(rotations, 2):
            versions[i] = KeyVersion(i, _aware(rotation.get("RotationDate")))
        latest = len(versions)
        return KeyState(key_ref=self.key_ref, exists=True, latest_version=latest, min_decryption_version=1,
                        min_encryption_version=latest, min_available_version=1, versions=versions,
                        algorithm=meta.get("KeySpec") or "")

    def _require_key(self) -> KeyState:
        state = self.key_state()
        if not state.exists:
            raise KeyNotFoundError(f"AWS KMS key {self.key_ref!r} does not exist ({self.strategy} strategy)")
        return state

    def _key_id(self, version: int | None) -> str:
        """The KeyId to encrypt with for ``version`` (None: the current one)."""
        if self.strategy == "alias":
            return self.key_ref if version is None else f"{self.key_ref}/v{version}"
        if version is not None and version != self._require_key().latest_version:
            raise BackendError(f"AWS KMS key {self.key_ref!r}: only the current key material encrypts "
                               f"(asked for v{version}; on_demand strategy)")
        return self.key_ref

    def _current_version(self) -> int:
        if self.strategy == "on_demand":
            return self._require_key().latest_version
        target = self._describe(self.key_ref)
        aliases = self._version_aliases()
        for number, key_id in aliases.items():
            if target and key_id == target["KeyId"]:
                return number
        raise BackendError(f"AWS KMS alias {self.key_ref!r} points at no version alias {self.key_ref}/vN")

    # -- operations ---------------------------------------------------------------------------
    def _new_key(self, version: int) -> str:
        tags = [{"TagKey": TAG_KEY_CLASS, "TagValue": self.key_class or self.key_ref},
                {"TagKey": TAG_VERSION, "TagValue": str(version)}]
        meta = self._call("create_key", f"create the key of v{version}", Description=(
            f"keyrotation key class {self.key_class or self.key_ref}, version {version}"), Tags=tags,
            KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]
        return meta["KeyId"]

    def create_key(self) -> KeyState:
        if self.strategy == "alias":
            key_id = self._new_key(1)
            self._call("create_alias", "create version alias v1", AliasName=f"{self.key_ref}/v1", TargetKeyId=key_id)
            self._call("create_alias", "create alias", AliasName=self.key_ref, TargetKeyId=key_id)
        else:
            key_id = self._new_key(1)
            if self.key_ref.startswith("alias/"):
                self._call("create_alias", "create alias", AliasName=self.key_ref, TargetKeyId=key_id)
            self.sync_rotation_schedule()
        return self.key_state()

    def sync_rotation_schedule(self) -> None:
        """Turn on AWS's own periodic rotation when the key class sets ``rotation_period_days`` (on_demand)."""
        if self.strategy == "on_demand" and self.rotation_period_days:
            self._call("enable_key_rotation", "enable automatic rotation", KeyId=self._describe_id(),
                       RotationPeriodInDays=self.rotation_period_days)

    def _describe_id(self) -> str:
        meta = self._describe(self.key_ref)
        if meta is None:
            raise KeyNotFoundError(f"AWS KMS key {self.key_ref!r} does not exist")
        return meta["KeyId"]

    def rotate(self) -> int:
        before = self._require_key().latest_version
        if self.strategy == "alias":
            new = before + 1
            existing = self._version_aliases().get(new)  # a crash after the alias: finish, do not add a key
            key_id = existing or self._new_key(new)
            if not existing:
                self._call("create_alias", f"create version alias v{new}", AliasName=f"{self.key_ref}/v{new}",
                           TargetKeyId=key_id)
            self._call("update_alias", f"move the alias to v{new}", AliasName=self.key_ref, TargetKeyId=key_id)
            return new
        key_id = self._describe_id()

        def rotated_already() -> int | None:
            latest = self.key_state().latest_version
            return latest if latest > before else None

        self._call("rotate_key_on_demand", "rotate on demand", done=rotated_already, KeyId=key_id)
        # Real AWS rotates asynchronously: wait until ListKeyRotations shows the new material.
        deadline = time.monotonic() + 300
        while (after := self.key_state().latest_version) <= before:
            if time.monotonic() > deadline:
                raise BackendError(f"AWS KMS key {self.key_ref!r}: on-demand rotation not listed after 300 s")
            time.sleep(2)
        return after

    def wrap(self, plaintext: bytes, version: int | None = None) -> str:
        number = version if version is not None else self._current_version()
        resp = self._call("encrypt", f"encrypt with v{number}", KeyId=self._key_id(number), Plaintext=plaintext)
        return f"aws:v{number}:" + base64.b64encode(resp["CiphertextBlob"]).decode("ascii")

    def _blob(self, wrapped: str) -> bytes:
        return base64.b64decode(wrapped[_CIPHERTEXT.match(wrapped).end():])  # type: ignore[union-attr]

    def unwrap(self, wrapped: str) -> bytes:
        number = self.version_of(wrapped)
        resp = self._call("decrypt", f"decrypt (ciphertext version v{number})", CiphertextBlob=self._blob(wrapped),
                          KeyId=self._key_id(number) if self.strategy == "alias" else self.key_ref)
        return resp["Plaintext"]

    def rewrap(self, wrapped: list[str], version: int | None = None) -> list[str]:
        number = version if version is not None else self._current_version()
        destination = self._key_id(number)

        def one(item: str) -> str:
            source = self.version_of(item)
            resp = self._call("re_encrypt", f"re-encrypt from v{source} to v{number}",
                              CiphertextBlob=self._blob(item), DestinationKeyId=destination)
            return f"aws:v{number}:" + base64.b64encode(resp["CiphertextBlob"]).decode("ascii")

        # ReEncrypt takes one ciphertext a call: each distinct one once, REWRAP_THREADS at a time, within the
        # rate limiter every call goes through (max_requests_per_second).
        return each_distinct(wrapped, one, REWRAP_THREADS)

    def version_of(self, wrapped: str) -> int:
        match = _CIPHERTEXT.match(wrapped or "")
        if not match:
            raise BackendError(f"AWS KMS key {self.key_ref!r}: not a keyrotation AWS ciphertext (no aws:vN: prefix)")
        return int(match.group(1))

    def version_of_key_id(self, key_id: str) -> int | None:
        """The version whose KMS key is ``key_id`` (a key id or ARN), alias strategy; None if not ours."""
        bare = key_id.rsplit("/", 1)[-1]
        for number, target in self._version_aliases().items():
            if target == bare:
                return number
        return None

    def key_id_of(self, version: int) -> str:
        """The ARN of the KMS key of ``version`` (alias strategy) or of the key (on_demand)."""
        meta = self._describe(self._key_id(version) if self.strategy == "alias" else self.key_ref)
        if meta is None:
            raise KeyNotFoundError(f"AWS KMS key {self.key_ref!r}: v{version} has no key")
        return meta["Arn"]

    def is_version_usable(self, version: int) -> bool:
        state = self.key_state()
        return state.exists and version in state.versions and version >= state.min_decryption_version

    def retirement_effect(self, versions: list[int], *, trim: bool = False) -> str:
        if not self.can_retire:
            return self.cannot_retire_reason
        keys = "the KMS key" if len(versions) == 1 else "the KMS keys"
        return (f"disables {keys} of {versions_text(versions)} of `{self.key_ref}` and schedules the deletion "
                f"{self.deletion_window_days} days after the approval (CancelKeyDeletion restores a key until then)")

    def retire_below(self, min_version: int, *, trim: bool = False) -> KeyState:
        """Disable the keys of versions below ``min_version`` and schedule their deletion (alias strategy).

        ``trim`` is implied: on AWS the deletion waits ``deletion_window_days`` and can be cancelled
        (``CancelKeyDeletion``) until then.
        """
        if not self.can_retire:
            raise BackendError(self.cannot_retire_reason)
        state = self._require_key()
        if min_version > state.latest_version:
            raise BackendError(f"AWS KMS key {self.key_ref!r}: cannot retire below v{min_version}, latest is "
                               f"v{state.latest_version}")
        for number, key_id in sorted(self._version_aliases().items()):
            if number >= min_version:
                continue
            meta = self._describe(key_id)
            if meta is None or meta.get("KeyState") == "PendingDeletion":
                continue
            if meta.get("KeyState") == "Enabled":
                self._call("disable_key", f"disable v{number}", KeyId=key_id)
            scheduled = self._call("schedule_key_deletion", f"schedule the deletion of v{number}", KeyId=key_id,
                                   PendingWindowInDays=self.deletion_window_days)
            log.info("AWS KMS key %s: v%d (%s) disabled, deletion scheduled for %s", self.key_ref, number, key_id,
                     scheduled.get("DeletionDate"))
        after = self.key_state()  # read back: no key below min_version may still be enabled
        if after.min_decryption_version < min_version:
            raise BackendError(f"AWS KMS key {self.key_ref!r}: after retiring below v{min_version}, "
                               f"v{after.min_decryption_version} is still enabled (enabled meanwhile by another "
                               "principal?)")
        return after

    def deletion_dates(self) -> dict[int, datetime]:
        """Versions whose keys are pending deletion, with the date AWS will delete them."""
        out = {}
        for number, key_id in self._version_aliases().items():
            meta = self._describe(key_id)
            if meta and meta.get("DeletionDate"):
                out[number] = _aware(meta["DeletionDate"])
        return out


def _aware(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.astimezone()
    return datetime.fromisoformat(str(value))
