"""Field-level envelope encryption of single values (e.g. a column of a SQL table).

A value is ``header || AES-256-GCM(ciphertext || tag)`` where the header is self-describing::

    b"KRE" | format version (1 byte) | len(key class) (1 byte) | key class (UTF-8)
          | data key id (16 bytes) | nonce (12 bytes)

The associated data binds the header to where the value lives (table, column, primary key), so a
value copied to another row or column, or a header edited, fails to decrypt with an error naming
the row. Data keys (AES-256) are wrapped by the key class's KMS key and live in a data-key table
next to the data (:mod:`keyrotation.stores.data_keys`); a KEK rotation re-wraps those rows only.
Plaintext data keys stay in memory, in one bounded, expiring, zeroing cache (:class:`DataKeyCache`), and
never reach a log or an exception.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import Cache, TTLCache
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotation.errors import KeyRotationError

MAGIC = b"KRE"
FORMAT_VERSION = 1
KEY_ID_BYTES = 16
NONCE_BYTES = 12


class EnvelopeError(KeyRotationError):
    """A value cannot be decrypted: tampered, moved to another row or column, or under an unknown key."""


@dataclass(frozen=True)
class Header:
    key_class: str
    key_id: bytes
    nonce: bytes
    length: int  # bytes of the header in the value

    @property
    def key_id_text(self) -> str:
        return str(uuid.UUID(bytes=self.key_id))


def header_prefix(key_class: str) -> bytes:
    name = key_class.encode()
    if len(name) > 255:
        raise EnvelopeError(f"key class name {key_class[:40]!r}... is longer than 255 bytes")
    return MAGIC + bytes([FORMAT_VERSION, len(name)]) + name


def key_id_offset(key_class: str) -> int:
    """Where the data key id starts in a value of ``key_class`` (1-based, for SQL ``substring``)."""
    return len(header_prefix(key_class)) + 1


def parse_header(value: bytes, where: str) -> Header:
    if len(value) < 5 or value[:3] != MAGIC:
        raise EnvelopeError(f"{where}: not a keyrotation envelope (no KRE header)")
    if value[3] != FORMAT_VERSION:
        raise EnvelopeError(f"{where}: envelope format version {value[3]} is not supported (expected "
                            f"{FORMAT_VERSION})")
    name_end = 5 + value[4]
    end = name_end + KEY_ID_BYTES + NONCE_BYTES
    if len(value) < end + 16:
        raise EnvelopeError(f"{where}: envelope is truncated")
    try:
        key_class = value[5:name_end].decode()
    except UnicodeDecodeError:
        raise EnvelopeError(f"{where}: envelope header is corrupt") from None
    return Header(key_class, bytes(value[name_end:name_end + KEY_ID_BYTES]),
                  bytes(value[name_end + KEY_ID_BYTES:end]), end)


def associated_data(header: bytes, table: str, column: str, pk: object) -> bytes:
    return header + b"\x00" + f"{table}\x00{column}\x00{pk}".encode()


def seal(plaintext: bytes, aead: AESGCM, key_id: bytes, key_class: str, table: str, column: str,
         pk: object) -> bytes:
    """``plaintext`` sealed with the data key ``key_id`` (its AES-GCM object, from :class:`DataKeyCache`)."""
    nonce = os.urandom(NONCE_BYTES)
    header = header_prefix(key_class) + key_id + nonce
    return header + aead.encrypt(nonce, plaintext, associated_data(header, table, column, pk))


def open_sealed(value: bytes, aead: AESGCM, header: Header, table: str, column: str, pk: object, where: str) -> bytes:
    raw = bytes(value)
    try:
        return aead.decrypt(header.nonce, raw[header.length:], associated_data(raw[:header.length], table, column, pk))
    except InvalidTag:
        raise EnvelopeError(f"{where}: does not decrypt: the value was altered, or copied from another row or "
                            "column") from None


class CachedKey:
    """An unwrapped data key: the key as a ``bytearray`` (zeroed on eviction), its AES-GCM object, the
    KEK version its row was wrapped under when read (the cache that holds it tracks when it expires)."""

    __slots__ = ("key", "aead", "version")

    def __init__(self, key: bytearray, version: int) -> None:
        self.key = key
        self.aead = AESGCM(key)  # cryptography copies the key inside; that copy cannot be zeroed
        self.version = version

    def zero(self) -> None:
        self.key[:] = bytes(len(self.key))
        self.aead = None

    def __repr__(self) -> str:
        return f"<data key under v{self.version}, hidden>"


class _ZeroingTTLCache(TTLCache):
    """A ``cachetools.TTLCache`` that zeroes every :class:`CachedKey` leaving it: evicted for room
    (``popitem``, which deletes), deleted, or expired (``expire`` removes without deleting)."""

    def __init__(self, maxsize: int, ttl: float, timer: Callable[[], float],
                 on_evict: Callable[[], None] | None) -> None:
        super().__init__(maxsize, ttl, timer)
        self._on_evict = on_evict

    def _gone(self, entry: CachedKey) -> None:
        entry.zero()
        if self._on_evict:
            self._on_evict()

    def __delitem__(self, key: bytes) -> None:
        entry = Cache.__getitem__(self, key)  # the entry itself, expired or not
        try:
            super().__delitem__(key)  # raises KeyError after deleting an expired entry
        finally:
            self._gone(entry)

    def expire(self, time: float | None = None) -> list[tuple[bytes, CachedKey]]:
        expired = super().expire(time)
        for _, entry in expired:
            self._gone(entry)
        return expired


class DataKeyCache:
    """The one cache of unwrapped data keys (the client and the SQL engine, through the data-key store): a bounded LRU
    with a time to live (``cachetools.TTLCache``), behind a lock.

    Keys are copied into ``bytearray`` and overwritten with zeros when they leave the cache (evicted for
    room, expired, purged after a retirement, or cleared). The caller's ``bytes`` and the copy held by
    ``cryptography``'s AES-GCM object cannot be zeroed from Python. ``size`` 0 keeps nothing: :meth:`put`
    gives the entry back without holding it (a store whose keys another cache holds).
    """

    def __init__(self, size: int = 1024, ttl_s: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 on_evict: Callable[[], None] | None = None) -> None:
        if size < 0:
            raise ValueError("cache size must not be negative")
        if ttl_s <= 0:
            raise ValueError("cache TTL must be positive")
        self.size = size
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries = _ZeroingTTLCache(size, ttl_s, clock, on_evict)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)  # expires (and zeroes) what is due first

    def get(self, key_id: bytes) -> CachedKey | None:
        with self._lock:
            self._entries.expire()
            return self._entries.get(key_id)  # a hit becomes the most recently used

    def put(self, key_id: bytes, key: bytes | bytearray, version: int) -> CachedKey:
        entry = CachedKey(bytearray(key), version)
        if not self.size:
            return entry
        with self._lock:
            self._entries.pop(key_id, None)  # TTLCache would replace the old entry without zeroing it
            self._entries[key_id] = entry
        return entry

    def evict(self, key_id: bytes) -> None:
        with self._lock:
            self._entries.expire()
            self._entries.pop(key_id, None)

    def evict_below(self, version: int) -> int:
        """Drop every key read under a version below ``version`` (after a retirement); return how many."""
        with self._lock:
            self._entries.expire()
            stale = [k for k, e in self._entries.items() if e.version < version]
            for key_id in stale:
                self._entries.pop(key_id, None)
        return len(stale)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __repr__(self) -> str:  # never show keys
        return f"DataKeyCache({len(self)}/{self.size} keys, ttl {self.ttl_s:g}s)"
