"""The interface every KMS backend implements, named after Tink's plain key-management terms."""

from __future__ import annotations

import abc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from keyrotation.errors import BackendError

if TYPE_CHECKING:
    from keyrotation.backends.retry import RetryPolicy
    from keyrotation.config import KeyClass


@dataclass(frozen=True)
class KeyVersion:
    number: int
    created_at: datetime | None


@dataclass(frozen=True)
class KeyState:
    """What the KMS says about a master key. Holds no key material."""

    key_ref: str
    exists: bool
    latest_version: int = 0
    min_decryption_version: int = 1
    min_encryption_version: int = 0
    min_available_version: int = 0
    versions: dict[int, KeyVersion] = field(default_factory=dict)
    #: The KMS's name for the key type (``aes256-gcm96`` on Transit, ``SYMMETRIC_DEFAULT`` on AWS).
    algorithm: str = ""

    def created_at(self, version: int) -> datetime | None:
        v = self.versions.get(version)
        return v.created_at if v else None

    def summary(self) -> dict:
        """A JSON-safe summary for logs and XCom."""
        return {
            "key_ref": self.key_ref,
            "exists": self.exists,
            "latest_version": self.latest_version,
            "min_decryption_version": self.min_decryption_version,
            "min_encryption_version": self.min_encryption_version,
            "versions": {
                str(n): v.created_at.isoformat() if v.created_at else None for n, v in sorted(self.versions.items())
            },
        }


def versions_text(versions: list[int]) -> str:
    """``v3``, ``v1..v4`` (consecutive), or ``v1, v3``: versions as the approval page and the logs name them."""
    if len(versions) == 1:
        return f"v{versions[0]}"
    if versions == list(range(versions[0], versions[-1] + 1)):
        return f"versions v{versions[0]}..v{versions[-1]}"
    return "versions " + ", ".join(f"v{v}" for v in versions)


def each_distinct(wrapped: list[str], one: Callable[[str], str], threads: int) -> list[str]:
    """``one(w)`` for each ``w`` of ``wrapped``, called once per distinct ``w`` (``threads`` at a time): the
    :meth:`KmsBackend.rewrap` of a KMS that re-wraps one secret a request."""
    unique = list(dict.fromkeys(wrapped))
    if len(unique) <= 1:
        done = {w: one(w) for w in unique}
    else:
        with ThreadPoolExecutor(min(threads, len(unique))) as pool:
            done = dict(zip(unique, pool.map(one, unique), strict=True))
    return [done[w] for w in wrapped]


@dataclass(frozen=True)
class ClientOptions:
    """How a process outside Airflow (the sidecar) reaches its KMS; credentials come from the environment only
    (``VAULT_TOKEN``/``VAULT_TOKEN_FILE``, the AWS chain, Google's application default credentials)."""

    vault_url: str | None = None
    aws_endpoint_url: str | None = None
    aws_region: str | None = None
    gcp_kms_endpoint: str | None = None
    timeout: float = 5.0


class KmsBackend(abc.ABC):
    """A master key in a KMS, with versions.

    ``wrap``/``unwrap`` protect small secrets (data keys, KEKs); the plaintext they take or give
    must stay in memory and never reach a log, an exception or XCom.
    """

    kind: str
    key_ref: str
    #: True when :meth:`rewrap` runs in the KMS, so wrapped keys never appear in plaintext outside it.
    server_side_rewrap: bool = False
    #: The most wrapped secrets one :meth:`rewrap` request to the KMS carries (its batch call's limit);
    #: 1 where the KMS re-wraps one secret a call. :meth:`rewrap` takes lists of any length and splits them.
    max_batch: ClassVar[int] = 1
    #: False where the KMS keeps old versions usable for good (AWS KMS key material); then
    #: :attr:`cannot_retire_reason` says why, and the retirement gate reports it instead of retiring.
    can_retire: bool = True
    cannot_retire_reason: str = ""
    #: The section of a key class that holds this backend's options (``aws:``, ``gcp:``), if it has one.
    options_section: ClassVar[str | None] = None
    #: The object store of this KMS's cloud (``s3``, ``gs``), which its connection's credentials also reach.
    storage_scheme: ClassVar[str | None] = None
    #: True where a new version may stay pending, not usable yet, for a while after :meth:`rotate` (Cloud KMS HSM
    #: and external versions generate for minutes): worth waiting for asynchronously (in Airflow's triggerer).
    versions_may_be_pending: bool = False
    #: True where :meth:`promote` is a KMS call of its own: :meth:`rotate` adds a version that is not the
    #: primary yet.
    promotes_separately: bool = False

    @classmethod
    @abc.abstractmethod
    def from_key_class(cls, kc: KeyClass, client: Any, retry: RetryPolicy | None = None) -> KmsBackend:
        """This backend for the key class ``kc``, over ``client``, the KMS's own client; every setting it needs
        comes from the key class (see :func:`keyrotation.backends.registry.open_backend`)."""

    @classmethod
    def key_class_problem(cls, kc: KeyClass) -> str | None:
        """What in key class ``kc`` this KMS cannot work with (its ``key_ref``'s form, its options), or None."""
        return None

    @classmethod
    def retires_versions(cls, kc: KeyClass) -> bool:
        """False where the KMS keeps key class ``kc``'s old versions usable for good: no retirement, no approval
        (the instance says why in :attr:`cannot_retire_reason`)."""
        return True

    @classmethod
    def object_formats(cls, kc: KeyClass) -> frozenset[str]:
        """The server-side encrypted object formats whose objects name the version of key class ``kc`` that
        protects them (so their census needs no data of ours)."""
        return frozenset()

    @classmethod
    @abc.abstractmethod
    def client_from_environment(cls, kc: KeyClass, options: ClientOptions) -> Any:
        """The KMS's client for a process outside Airflow, credentials from the environment.

        :raises ConfigError: what is missing, in one line.
        """

    @abc.abstractmethod
    def key_state(self) -> KeyState: ...

    @abc.abstractmethod
    def create_key(self) -> KeyState: ...

    @abc.abstractmethod
    def rotate(self) -> int:
        """Add a new primary version; return its number."""

    def promote(self, version: int) -> bool:
        """Make ``version`` the primary, the one new data is encrypted with (Tink's promote-key).

        True if the primary changed. Where :meth:`rotate` makes the new version primary already
        (Transit, AWS), there is nothing to do and this returns False.
        """
        return False

    @abc.abstractmethod
    def wrap(self, plaintext: bytes, version: int | None = None) -> str:
        """Encrypt a small secret with ``version`` (default: the primary); the result names its version."""

    @abc.abstractmethod
    def unwrap(self, wrapped: str) -> bytes: ...

    @abc.abstractmethod
    def rewrap(self, wrapped: list[str], version: int | None = None) -> list[str]:
        """Re-encrypt wrapped secrets under ``version`` without exposing them (server-side where possible), in
        order; each distinct secret is re-wrapped once (a repeated one gets the same result), in requests of at
        most :attr:`max_batch`."""

    @abc.abstractmethod
    def version_of(self, wrapped: str) -> int:
        """The key version a wrapped secret was made with, read from the wrapped form alone."""

    @abc.abstractmethod
    def retire_below(self, min_version: int, *, trim: bool = False) -> KeyState:
        """Make versions below ``min_version`` unusable for encryption and decryption (and delete them if trim)."""

    @abc.abstractmethod
    def retirement_effect(self, versions: list[int], *, trim: bool = False) -> str:
        """What :meth:`retire_below` does to ``versions`` in this KMS, in words, for the person who approves it."""

    def deletion_dates(self) -> dict[int, datetime]:
        """Versions the KMS has scheduled for deletion (or destruction), with when; none where it deletes none."""
        return {}

    def version_of_key_id(self, key_id: str) -> int | None:
        """The version that the key id on a cloud-encrypted object names (formats of :meth:`object_formats`);
        None if it is not a version of this key."""
        raise BackendError(f"{self.kind} key {self.key_ref!r}: no object format names its versions")

    def key_id_of(self, version: int) -> str:
        """The key id a cloud-encrypted object gets to be under ``version`` (formats of :meth:`object_formats`)."""
        raise BackendError(f"{self.kind} key {self.key_ref!r}: no object format names its versions")

    def is_version_usable(self, version: int) -> bool:
        """Round-trip a random probe through ``version``: true when it encrypts and decrypts."""
        import secrets

        probe = secrets.token_bytes(32)
        try:
            wrapped = self.wrap(probe, version)
            return self.version_of(wrapped) == version and self.unwrap(wrapped) == probe
        except Exception:  # noqa: BLE001 - any failure means "not usable yet"
            return False
