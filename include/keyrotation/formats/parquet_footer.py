"""What a Parquet file's footer says about its encryption, read from the file's bytes.

pyarrow does not expose which columns of a PME file are encrypted, and touching the metadata of a
column whose key it lacks aborts the process (pyarrow 26), so the footer is read here: the tail
(magic, footer length), ``FileCryptoMetaData`` and, with the footer key, the encrypted footer
(AES-GCM, associated data = file AAD + module type 0), then each column chunk's ``crypto_metadata``
(parquet.thrift field 8), decoded by :mod:`keyrotation.formats.thrift_compact` (schema-less: newer
writers' footers parse too).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotation.formats.thrift_compact import Struct, ThriftError, decode_struct

PLAIN_MAGIC = b"PAR1"
ENCRYPTED_FOOTER_MAGIC = b"PARE"
_FOOTER_MODULE = 0
#: parquet.thrift EncryptionAlgorithm union members.
ALGORITHMS = {1: "AES_GCM_V1", 2: "AES_GCM_CTR_V1"}
_MAX_FOOTER = 64 << 20


class FooterError(ValueError):
    """The file's tail or footer is not what a Parquet file holds."""


@dataclass(frozen=True)
class FooterFacts:
    """The encryption of one Parquet file, as its footer states it.

    ``encrypted_columns`` is None when the footer is encrypted and was not decrypted (no key given).
    """

    magic: bytes
    algorithm: str | None
    encrypted_columns: frozenset[str] | None
    columns: frozenset[str] | None

    @property
    def encrypted(self) -> bool:
        return self.algorithm is not None


def _decode(data: bytes, pos: int = 0) -> tuple[dict[int, Any], int]:
    """The Thrift struct at ``data[pos:]`` as ``{field id: value}``, and the position after it."""
    try:
        decoded, end = decode_struct(data, pos)
    except ThriftError as exc:
        raise FooterError(f"footer is not valid Thrift: {exc}") from None
    return decoded.to_dict(), end


def streamed_only(filesystem: pafs.FileSystem) -> bool:
    """Whether files on ``filesystem`` are read front to back only: pyarrow 26's random-access reads on a
    GcsFileSystem block a process that also serves the storage API (the tests' GCS server runs in the test
    process)."""
    return isinstance(filesystem, pafs.GcsFileSystem)


def head_magic(path: str, filesystem: pafs.FileSystem) -> bytes:
    """The first four bytes: ``PARE`` for a file with an encrypted footer (spec: it starts and ends so)."""
    with filesystem.open_input_stream(path) as stream:
        return stream.read(4)


def _checked(path: str, size: int, trailer: bytes) -> tuple[bytes, int]:
    length, magic = struct.unpack("<I", trailer[:4])[0], trailer[4:]
    if magic not in (PLAIN_MAGIC, ENCRYPTED_FOOTER_MAGIC):
        raise FooterError(f"{path}: Parquet magic bytes not found at the end of the file")
    if length > min(size - 12, _MAX_FOOTER):
        raise FooterError(f"{path}: footer length {length} does not fit the file")
    return magic, length


def read_tail(path: str, filesystem: pafs.FileSystem) -> tuple[bytes, bytes]:
    """The file's closing magic and its footer region (the bytes its length field counts)."""
    size = filesystem.get_file_info(path).size
    if size is None:
        raise FileNotFoundError(path)
    if size < 12:
        raise FooterError(f"{path}: {size} bytes, too short for a Parquet file")
    if not streamed_only(filesystem):
        with filesystem.open_input_file(path) as f:
            magic, length = _checked(path, size, f.read_at(8, size - 8))
            return magic, f.read_at(length, size - 8 - length)
    kept = bytearray()  # the last bytes a footer can span
    with filesystem.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 20):
            kept += chunk
            del kept[: max(0, len(kept) - _MAX_FOOTER - 8)]
    magic, length = _checked(path, size, bytes(kept[-8:]))
    return magic, bytes(kept[-8 - length : -8])


def _column_facts(file_metadata: Mapping[int, Any] | Struct) -> tuple[frozenset[str], frozenset[str]]:
    """All column paths, and those a column or the footer key encrypts, over every row group."""
    columns: set[str] = set()
    encrypted: set[str] = set()
    for row_group in file_metadata.get(4) or []:
        for chunk in row_group.get(1) or []:
            crypto = chunk.get(8)
            path_parts = (chunk.get(3) or {}).get(3)
            if crypto and 2 in crypto:  # ENCRYPTION_WITH_COLUMN_KEY names its column
                path_parts = crypto[2].get(1) or path_parts
            if not path_parts:
                raise FooterError("a column chunk names no column")
            name = ".".join(p.decode() for p in path_parts)
            columns.add(name)
            if crypto:
                encrypted.add(name)
    return frozenset(columns), frozenset(encrypted)


def is_encrypted(path: str, filesystem: pafs.FileSystem) -> bool:
    """Whether ``path`` is a Parquet file with any encryption, as cheaply as the file allows: a file that
    starts with ``PARE`` has an encrypted footer; one that starts with ``PAR1`` is plain unless its footer
    names an algorithm (plaintext-footer mode)."""
    head = head_magic(path, filesystem)
    if head == ENCRYPTED_FOOTER_MAGIC:
        return True
    if head != PLAIN_MAGIC:
        raise FooterError(f"{path}: Parquet magic bytes not found at the start of the file")
    return footer_facts(path, filesystem).encrypted


def check_tail(path: str, size: int, trailer: bytes) -> None:
    """Refuse the tail of a file of ``size`` bytes ending with ``trailer`` (its last 8) as :func:`footer_facts`
    does."""
    if size < 12:
        raise FooterError(f"{path}: {size} bytes, too short for a Parquet file")
    _checked(path, size, trailer)


def decoded_footer_facts(path: str, magic: bytes, crypto: Mapping[int, Any] | Struct | None,
                         metadata: Mapping[int, Any] | Struct) -> FooterFacts:
    """What :func:`footer_facts` says of a footer read, decrypted and decoded already (``crypto``: the
    FileCryptoMetaData of an encrypted footer; plain ``{field id: value}`` dicts or :class:`Struct`, read alike),
    refusing what it refuses but for the tail and the decryption."""
    if magic == PLAIN_MAGIC:
        algorithm = metadata.get(8)
        columns, encrypted = _column_facts(metadata)
        name = ALGORITHMS.get(next(iter(algorithm)), "unknown") if algorithm else None
        return FooterFacts(magic, name, encrypted, columns)
    algorithm = (crypto or {}).get(1) or {}
    if len(algorithm) != 1:
        raise FooterError(f"{path}: footer names no encryption algorithm")
    kind, params = next(iter(algorithm.items()))
    if params.get(3) and not params.get(1):
        raise FooterError(f"{path}: the file's AAD prefix is not stored in it (supplied by readers)")
    columns, encrypted = _column_facts(metadata)
    return FooterFacts(magic, ALGORITHMS.get(kind, "unknown"), encrypted, columns)


def footer_facts(path: str, filesystem: pafs.FileSystem, footer_key: bytes | None = None) -> FooterFacts:
    """What the footer of ``path`` says about its encryption; an encrypted footer is decrypted with
    ``footer_key`` (the file's footer data key) when given, else its columns stay unknown."""
    magic, region = read_tail(path, filesystem)
    if magic == PLAIN_MAGIC:
        metadata, _ = _decode(region)
        algorithm = metadata.get(8)
        columns, encrypted = _column_facts(metadata)
        name = ALGORITHMS.get(next(iter(algorithm)), "unknown") if algorithm else None
        return FooterFacts(magic, name, encrypted, columns)
    crypto, end = _decode(region)
    algorithm = crypto.get(1) or {}
    if len(algorithm) != 1:
        raise FooterError(f"{path}: footer names no encryption algorithm")
    kind, params = next(iter(algorithm.items()))
    name = ALGORITHMS.get(kind, "unknown")
    if footer_key is None:
        return FooterFacts(magic, name, None, None)
    if params.get(3) and not params.get(1):
        raise FooterError(f"{path}: the file's AAD prefix is not stored in it (supplied by readers)")
    aad = (params.get(1) or b"") + (params.get(2) or b"") + bytes([_FOOTER_MODULE])
    module = region[end:]
    if len(module) < 4 + 12 + 16:
        raise FooterError(f"{path}: encrypted footer too short")
    length = struct.unpack("<I", module[:4])[0]
    if length != len(module) - 4:
        raise FooterError(f"{path}: encrypted footer length {length} does not match its module")
    try:
        plain = AESGCM(footer_key).decrypt(module[4:16], module[16:], aad)
    except Exception:  # InvalidTag, or a key of the wrong size: the footer is not this key's
        raise FooterError(f"{path}: footer does not authenticate under its footer key") from None
    columns, encrypted = _column_facts(_decode(plain)[0])
    return FooterFacts(magic, name, encrypted, columns)
