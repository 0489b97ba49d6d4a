"""HashiCorp Vault / OpenBao Transit secrets engine, through an ``hvac.Client``."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import hvac
import requests
from hvac.exceptions import (
    BadGateway,
    Forbidden,
    InternalServerError,
    InvalidPath,
    RateLimitExceeded,
    VaultDown,
    VaultError,
)

from keyrotation.backends.base import ClientOptions, KeyState, KeyVersion, KmsBackend, versions_text
from keyrotation.backends.retry import RetryPolicy, TransientFailure, call_with_retries
from keyrotation.errors import BackendError, ConfigError, KeyNotFoundError, KmsUnreachable, PermissionDenied

if TYPE_CHECKING:
    from keyrotation.config import KeyClass

T = TypeVar("T")
# Worth retrying: the server is unreachable, sealed, electing a leader or overloaded.
RETRYABLE = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, VaultDown, BadGateway,
             InternalServerError, RateLimitExceeded)

_CIPHERTEXT = re.compile(r"^vault:v(\d+):")
# OpenBao's default JSON limits refuse a rewrap batch of 500 strings; 250 passes.
REWRAP_BATCH = 250
#: The only key type create_key asks for; the rotate role's policy allows no other (keyrotation.policies).
KEY_TYPE = "aes256-gcm96"


def _created(value: object) -> datetime | None:
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, dict) and "creation_time" in value:
        return datetime.fromisoformat(str(value["creation_time"]).replace("Z", "+00:00"))
    return None


class VaultTransitBackend(KmsBackend):
    kind = "vault_transit"
    server_side_rewrap = True
    #: OpenBao's default JSON limits refuse a rewrap ``batch_input`` of 500 ciphertexts; 250 pass.
    max_batch = REWRAP_BATCH

    def __init__(self, client: hvac.Client, key_ref: str, mount_point: str = "transit",
                 retry: RetryPolicy | None = None) -> None:
        self.client = client
        self.key_ref = key_ref
        self.mount_point = mount_point
        self.retry = retry or RetryPolicy()
        self._transit = client.secrets.transit

    @classmethod
    def from_key_class(cls, kc: KeyClass, client: hvac.Client, retry: RetryPolicy | None = None) -> VaultTransitBackend:
        return cls(client, kc.key_ref, kc.mount_point, retry=retry)

    @classmethod
    def client_from_environment(cls, kc: KeyClass, options: ClientOptions) -> hvac.Client:
        """``VAULT_ADDR`` (or ``options.vault_url``), ``VAULT_TOKEN`` or ``VAULT_TOKEN_FILE``, ``VAULT_CACERT``."""
        url = options.vault_url or os.environ.get("VAULT_ADDR")
        token = os.environ.get("VAULT_TOKEN")
        if not token and os.environ.get("VAULT_TOKEN_FILE"):
            try:
                token = Path(os.environ["VAULT_TOKEN_FILE"]).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"VAULT_TOKEN_FILE {os.environ['VAULT_TOKEN_FILE']}: cannot read it "
                                  f"({exc.strerror})") from None
        if not url:
            raise ConfigError("--vault-url (or VAULT_ADDR) is required for a vault_transit key class")
        if not token:
            raise ConfigError("VAULT_TOKEN (or VAULT_TOKEN_FILE) is not set: the sidecar reads its Vault/OpenBao "
                              "token from the environment")
        verify: Any = os.environ.get("VAULT_CACERT") or True
        return hvac.Client(url=url, token=token, verify=verify, timeout=options.timeout)

    def _fail(self, action: str, exc: Exception) -> BackendError:
        # hvac errors carry the server's message, which never contains plaintext.
        return BackendError(f"Transit key {self.key_ref!r} at mount {self.mount_point!r}: {action} failed: {exc}")

    def _call(self, action: str, fn: Callable[[], T], done: Callable[[], T | None] | None = None) -> T:
        """Run one Transit request with retries on transient errors; any failure becomes a BackendError."""
        try:
            return call_with_retries(fn, policy=self.retry, retryable=RETRYABLE, done=done,
                                     describe=f"Transit key {self.key_ref!r} at {self.client.url}: {action}")
        except TransientFailure as exc:
            raise KmsUnreachable(f"KMS unreachable: {exc}") from None
        except Forbidden as exc:
            raise PermissionDenied(f"Transit key {self.key_ref!r} at mount {self.mount_point!r}: {action} "
                                   f"refused: {exc} (the token's policy does not allow it)") from None
        except VaultError as exc:
            raise self._fail(action, exc) from None

    def key_state(self) -> KeyState:
        def read() -> dict | None:
            try:
                return self._transit.read_key(self.key_ref, mount_point=self.mount_point)["data"]
            except InvalidPath:
                return None

        data = self._call("read key", read)
        if data is None:
            return KeyState(key_ref=self.key_ref, exists=False)
        versions = {int(n): KeyVersion(int(n), _created(v)) for n, v in (data.get("keys") or {}).items()}
        return KeyState(
            key_ref=self.key_ref,
            exists=True,
            latest_version=int(data["latest_version"]),
            min_decryption_version=int(data.get("min_decryption_version") or 1),
            min_encryption_version=int(data.get("min_encryption_version") or 0),
            min_available_version=int(data.get("min_available_version") or 0),
            versions=versions,
            algorithm=str(data.get("type") or ""),
        )

    def create_key(self) -> KeyState:
        # Only "type" is sent (no derived, convergent, exportable, plaintext-backup or auto-rotate option):
        # exactly what the rotate role's policy lets through.
        self._call("create key", lambda: self._transit.create_key(self.key_ref, key_type=KEY_TYPE,
                                                                  mount_point=self.mount_point))
        return self.key_state()

    def _require_key(self) -> KeyState:
        state = self.key_state()
        if not state.exists:
            raise KeyNotFoundError(f"Transit key {self.key_ref!r} does not exist at mount {self.mount_point!r}")
        return state

    def rotate(self) -> int:
        before = self._require_key().latest_version

        def rotated_already() -> int | None:  # a retry after a lost response must not add a second version
            latest = self.key_state().latest_version
            return latest if latest > before else None

        self._call("rotate", lambda: self._transit.rotate_key(self.key_ref, mount_point=self.mount_point),
                   done=rotated_already)
        after = self.key_state().latest_version
        if after <= before:
            raise BackendError(f"Transit key {self.key_ref!r}: rotate did not add a version (still v{after})")
        return after

    def wrap(self, plaintext: bytes, version: int | None = None) -> str:
        encoded = base64.b64encode(plaintext).decode("ascii")
        resp = self._call(f"encrypt with version {version or 'latest'}", lambda: self._transit.encrypt_data(
            self.key_ref, encoded, key_version=version, mount_point=self.mount_point))
        return resp["data"]["ciphertext"]

    def unwrap(self, wrapped: str) -> bytes:
        resp = self._call(f"decrypt (ciphertext version v{self.version_of(wrapped)})",
                          lambda: self._transit.decrypt_data(self.key_ref, wrapped, mount_point=self.mount_point))
        return base64.b64decode(resp["data"]["plaintext"])

    def rewrap(self, wrapped: list[str], version: int | None = None) -> list[str]:
        unique = list(dict.fromkeys(wrapped))
        done: dict[str, str] = {}
        for start in range(0, len(unique), self.max_batch):
            chunk = unique[start : start + self.max_batch]
            batch = [{"ciphertext": c} for c in chunk]
            resp = self._call("rewrap", lambda batch=batch: self._transit.rewrap_data(
                self.key_ref, ciphertext="", batch_input=batch, key_version=version, mount_point=self.mount_point))
            results = resp["data"]["batch_results"]
            if len(results) != len(chunk):
                raise BackendError(f"Transit key {self.key_ref!r}: rewrap of {len(chunk)} items answered "
                                   f"{len(results)}")
            for i, (item, old) in enumerate(zip(results, chunk, strict=True)):
                if item.get("error"):
                    raise BackendError(
                        f"Transit key {self.key_ref!r}: rewrap of item {start + i} failed: {item['error']}"
                    )
                done[old] = item["ciphertext"]
        return [done[w] for w in wrapped]

    def is_version_usable(self, version: int) -> bool:
        """Transit versions are usable as soon as they exist; reading the key needs no encrypt permission."""
        state = self.key_state()
        return state.exists and version in state.versions and version >= state.min_encryption_version

    def version_of(self, wrapped: str) -> int:
        match = _CIPHERTEXT.match(wrapped or "")
        if not match:
            raise BackendError(f"Transit key {self.key_ref!r}: not a Transit ciphertext (no vault:vN: prefix)")
        return int(match.group(1))

    def retirement_effect(self, versions: list[int], *, trim: bool = False) -> str:
        effect = (f"raises the minimum decryption and encryption version of Transit key `{self.key_ref}` to "
                  f"v{versions[-1] + 1}: {versions_text(versions)} can no longer decrypt or encrypt")
        if trim:
            return effect + "; trim deletes that key material at once, permanently"
        return effect + "; the key material stays in the key (no trim): lowering the minimum again re-enables it"

    def retire_below(self, min_version: int, *, trim: bool = False) -> KeyState:
        state = self._require_key()
        if min_version > state.latest_version:
            raise BackendError(
                f"Transit key {self.key_ref!r}: cannot retire below v{min_version}, latest is v{state.latest_version}"
            )
        # The retire role's policy can limit which config parameters are sent, not their values: it cannot
        # say "only raise". So the minimums are checked here, before and after.
        before = {"min_encryption_version": state.min_encryption_version,
                  "min_decryption_version": state.min_decryption_version}
        lowered = [f"{name} is already v{current}" for name, current in before.items() if min_version < current]
        if lowered:
            raise BackendError(f"Transit key {self.key_ref!r}: refusing to retire below v{min_version}: "
                               f"{', '.join(lowered)}; a minimum version is never lowered")
        # min_encryption_version first, in its own request (Transit checks each against the stored other):
        # a retired version must never encrypt again, and 0 does not mean "latest only" (OpenBao#3508).
        action = f"retire versions below v{min_version}"
        self._call(action, lambda: self._transit.update_key_configuration(
            self.key_ref, min_encryption_version=min_version, mount_point=self.mount_point))
        self._call(action, lambda: self._transit.update_key_configuration(
            self.key_ref, min_decryption_version=min_version, mount_point=self.mount_point))
        if trim:
            self._call(f"trim versions below v{min_version}", lambda: self._transit.trim_key(
                self.key_ref, min_version=min_version, mount_point=self.mount_point))
        after = self._require_key()
        read_back = {"min_encryption_version": after.min_encryption_version,
                     "min_decryption_version": after.min_decryption_version}
        if trim:
            read_back["min_available_version"] = after.min_available_version
        wrong = [f"{name} is v{got}" for name, got in read_back.items() if got != min_version]
        if wrong:
            raise BackendError(f"Transit key {self.key_ref!r}: retiring below v{min_version} is not in effect after "
                               f"the update: {', '.join(wrong)}, not v{min_version} (changed meanwhile by another "
                               "token?)")
        return after
