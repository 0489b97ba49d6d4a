"""Field-level envelope encryption of single values (e.g. a column of a SQL table).

A value is ``header || AES-256-GCM(ciphertext || tag)`` where the header is self-describing::

    b"KRE" | format version (1 byte) | len(key class) (1 byte) | key class (UTF-8)
          | data key id (16 bytes) | nonce (12 bytes)

The associated data binds the header to where the value lives (table, column, primary key), so a
value copied to another row or column, or a header edited, fails to decrypt with an error naming
the row. Data keys (AES-256) are wrapped by the key class's KMS key and live in a data-key table
next to the data (:mod:`keyrotation.stores.data_keys`); a KEK rotation re-wraps those rows only.
Plaintext data keys stay in memory, in a bounded cache, and never reach a log or an exception.
"""

from __future__ import annotations

import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

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


@lru_cache(maxsize=256)
def _aead(key: bytes) -> AESGCM:
    # Building the cipher costs more than sealing a short value; keys live in memory only, as in KeyCache.
    return AESGCM(key)


def seal(plaintext: bytes, key: bytes, key_id: bytes, key_class: str, table: str, column: str, pk: object) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    header = header_prefix(key_class) + key_id + nonce
    return header + _aead(key).encrypt(nonce, plaintext, associated_data(header, table, column, pk))


def open_sealed(value: bytes, key: bytes, header: Header, table: str, column: str, pk: object, where: str) -> bytes:
    raw = bytes(value)
    try:
        return _aead(key).decrypt(header.nonce, raw[header.length:],
                                   associated_data(raw[:header.length], table, column, pk))
    except InvalidTag:
        raise EnvelopeError(f"{where}: does not decrypt: the value was altered, or copied from another row or "
                            "column") from None


class KeyCache:
    """A bounded LRU of unwrapped data keys (plaintext in memory only)."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._keys: OrderedDict[bytes, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key_id: bytes) -> bytes | None:
        key = self._keys.get(key_id)
        if key is not None:
            self._keys.move_to_end(key_id)
            self.hits += 1
        else:
            self.misses += 1
        return key

    def put(self, key_id: bytes, key: bytes) -> None:
        self._keys[key_id] = key
        self._keys.move_to_end(key_id)
        while len(self._keys) > self.size:
            self._keys.popitem(last=False)

    def clear(self) -> None:
        self._keys.clear()

    def __repr__(self) -> str:  # never show keys
        return f"KeyCache({len(self._keys)} keys)"
