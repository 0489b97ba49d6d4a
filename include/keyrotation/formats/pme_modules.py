"""Re-encryption of a Parquet Modular Encryption (PME) file module by module, without decoding its data.

Every encrypted module (footer, column metadata, page headers, pages, dictionary pages, column and
offset indexes) is decrypted with the old data key and encrypted with the new one under a fresh
nonce and its exact associated data (AAD). Encoded and compressed bytes stay as they were, and since
AES-GCM keeps sizes, so does every offset: the file streams from source to destination in file order,
one module at a time, through buffers that are reused. Each new module is decrypted again under its
new key in the same pass and compared with the old module's plaintext.

Keys are explicit (:class:`ModuleKeys`): this module knows nothing of KMSs or key material files.
Where the module path cannot apply it raises :class:`ModuleReencryptionUnavailable` with a reason, so
a caller can fall back to decoding and encoding the data. Neither keys nor plaintext reach an
exception, a log line or a repr.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import numpy as np
import pyarrow.fs as pafs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotation.formats.parquet_footer import ALGORITHMS, ENCRYPTED_FOOTER_MAGIC, PLAIN_MAGIC
from keyrotation.formats.thrift_compact import (
    BINARY,
    PageHeaderFacts,
    Struct,
    ThriftError,
    decode_struct,
    padded_varint,
    page_header,
    zigzag,
)

# Module types (parquet-format Encryption.md).
FOOTER, COLUMN_META, DATA_PAGE, DICT_PAGE, DATA_HEADER, DICT_HEADER, COLUMN_INDEX, OFFSET_INDEX = range(8)
_NONCE, _TAG, _LEN = 12, 16, 4
_GCM, _CTR = 1, 2
_DICTIONARY_PAGE, _INDEX_PAGE = 2, 1
#: The bytes a page may be encrypted again, nonce after nonce, until its new CRC fits the varint its header
#: has for it (a page of n bytes gets max(1, CRC_BUDGET // n) nonces). A random CRC fits 5 bytes always, 4 bytes
#: once in 16 nonces, 3 bytes once in 2,048; 1 GiB gives a 1 MiB page 1,024 nonces: a 4-byte CRC always fits,
#: a 3-byte one 2 times in 5, else the file is not re-encrypted module by module.
CRC_BUDGET = 1 << 30
_CTR_ROOM = 15
#: A footer's row groups and column chunks are decoded with it, their column metadata (statistics and all: most of
#: its bytes, and read only for the columns the footer key encrypts) when asked for.
_FOOTER_EAGER = 2


try:
    from keyrotation.formats import _pme_pages
except ImportError:  # not built (scripts/build_native.py): every page is walked in Python
    _pme_pages = None  # type: ignore[assignment]
#: Whether GCM files' pages are walked by the C walk (``_pme_pages.c``, built by ``make install``), the Python walk
#: taking only what it hands over; else by the Python walk alone. The same modules, checks and errors either way.
NATIVE = _pme_pages is not None

_SPARE = threading.local()
#: Work buffers a thread keeps between files (at most): a new buffer of a megabyte costs its page faults, about a
#: millisecond, and a file takes five or six.
_SPARE_BUFFERS = 8


def _take(size: int) -> bytearray:
    """A work buffer of at least ``size`` bytes: one this thread gave back, else a new one."""
    spare: list[bytearray] | None = getattr(_SPARE, "buffers", None)
    for i, buf in enumerate(spare or ()):
        if len(buf) >= size:
            return spare.pop(i)  # type: ignore[union-attr]
    return bytearray(size)


def _give_back(*buffers: bytearray | None, wipe: bool) -> None:
    """``buffers`` done with, kept for this thread's next file (``wipe``: zeroed first, as those that held
    plaintext are)."""
    spare: list[bytearray] = _SPARE.__dict__.setdefault("buffers", [])
    for buf in buffers:
        if buf and len(spare) < _SPARE_BUFFERS:
            if wipe:
                np.frombuffer(buf, np.uint8).fill(0)
            spare.append(buf)


class ModuleReencryptionUnavailable(Exception):
    """The file cannot be re-encrypted module by module; ``reason`` says why (decode and encode it instead)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ModuleReencryptionError(ValueError):
    """The file or the keys given are not what they must be (a module does not authenticate, a key is missing)."""


@dataclass(frozen=True, repr=False)
class ModuleKeys:
    """The data keys of one file: its footer key, and column keys by dotted column path.

    As new keys, ``footer_key_metadata`` and ``column_key_metadata`` replace the key metadata the file
    stores (None or absent: kept, as with external key material, whose references do not change).
    """

    footer: bytes
    columns: Mapping[str, bytes] = field(default_factory=dict)
    footer_key_metadata: bytes | None = None
    column_key_metadata: Mapping[str, bytes] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"ModuleKeys(footer=<redacted>, columns={sorted(self.columns)})"


@dataclass
class ReencryptionResult:
    """What a module re-encryption did."""

    bytes: int = 0
    #: Encrypted modules re-encrypted (and verified), and their bytes (the footer's counting the column metadata
    #: modules it holds).
    modules: int = 0
    module_bytes: int = 0
    #: Pages whose CRC was recomputed, and the extra nonces used so that their new CRCs fit their headers.
    crc_pages: int = 0
    crc_retries: int = 0
    algorithm: str = ""
    plaintext_footer: bool = False
    encrypted_columns: list[str] = field(default_factory=list)
    row_groups: int = 0
    #: The rows the file's footer counts.
    rows: int | None = None


class _Source(Protocol):
    size: int

    def view(self, offset: int, n: int) -> memoryview: ...

    def read_into(self, offset: int, out: memoryview) -> None: ...


class _MemorySource:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data).cast("B")
        self.size = len(self._data)

    def view(self, offset: int, n: int) -> memoryview:
        if offset < 0 or offset + n > self.size:
            raise ModuleReencryptionError("a module reaches past the end of the file")
        return self._data[offset : offset + n]

    def read_into(self, offset: int, out: memoryview) -> None:
        out[:] = self.view(offset, len(out))


class _FileSource:
    """Reads through one reused buffer (a view stays valid until the next read)."""

    #: What a small read (a module's length, a page header) reads at least, so that the module after it comes
    #: without another read.
    AHEAD = 4096

    def __init__(self, f: Any, size: int) -> None:
        self._f, self.size = f, size
        self._buf = bytearray()  # taken at the first read, given back by release()
        self._start = self._end = 0  # the file's bytes the buffer holds

    def view(self, offset: int, n: int) -> memoryview:
        if offset < 0 or offset + n > self.size:
            raise ModuleReencryptionError("a module reaches past the end of the file")
        if self._start <= offset and offset + n <= self._end:
            return memoryview(self._buf)[offset - self._start : offset - self._start + n]
        # a page is read with the header of the next one
        want = min(n + self.AHEAD, self.size - offset) if n >= self.AHEAD else min(self.AHEAD, self.size - offset)
        if want > len(self._buf):
            _give_back(self._buf, wipe=False)
            self._buf = _take(max(want, 2 * len(self._buf), 1 << 20))
        view = memoryview(self._buf)[:want]
        self._start = self._end = 0
        self.read_into(offset, view)
        self._start, self._end = offset, offset + want
        return view[:n]

    def read_into(self, offset: int, out: memoryview) -> None:
        n = len(out)
        if offset < 0 or offset + n > self.size:
            raise ModuleReencryptionError("a module reaches past the end of the file")
        self._f.seek(offset)
        got = 0
        while got < n:
            r = self._f.readinto(out[got:])
            if not r:
                raise ModuleReencryptionError("the file ends early")
            got += r

    def release(self) -> None:
        """The buffer given back (taken again at the next read)."""
        _give_back(self._buf, wipe=False)
        self._buf = bytearray()
        self._start = self._end = 0


class _Buffers:
    """Work buffers grown as needed and reused: plaintext, the new module, the check decryption."""

    def __init__(self) -> None:
        # taken at the first fit(), given back by release()
        self.plain = self.check = bytearray()
        # taken when first needed: most modules are sealed straight into the sink
        self._out: bytearray | None = None
        self._page: bytearray | None = None
        self._nonces = b""
        self._at = 0

    @property
    def out(self) -> bytearray:
        if self._out is None:
            self._out = _take(len(self.plain))
        return self._out

    @property
    def page(self) -> bytearray:
        if self._page is None:
            self._page = _take(len(self.plain))
        return self._page

    def fit(self, n: int) -> None:
        # both: buffers a thread gave back differ in size, so the two taken together may too
        if n + 64 > min(len(self.plain), len(self.check)):
            size = max(n + 64, 2 * len(self.plain), 1 << 20)
            self.release()
            self.plain, self.check = _take(size), _take(size)

    def release(self) -> None:
        """Every buffer given back, zeroed (taken again at the next fit())."""
        _give_back(self.plain, self.check, self._out, self._page, wipe=True)
        self.plain = self.check = bytearray()
        self._out = self._page = None

    def nonce(self) -> bytes:
        if self._at + _NONCE > len(self._nonces):
            self._nonces, self._at = os.urandom(_NONCE * 4096), 0
        self._at += _NONCE
        return self._nonces[self._at - _NONCE : self._at]


def _equal(a: memoryview, b: memoryview) -> bool:
    n = len(a)
    if n != len(b):
        return False
    if n <= 4096:  # a header: numpy's call costs more than the comparison
        return a == b
    k = n >> 3
    return bool(np.equal(np.frombuffer(a, np.uint64, k), np.frombuffer(b, np.uint64, k)).all()) \
        and a[k << 3 :] == b[k << 3 :]


def _ordinal(n: int, what: str) -> bytes:
    if not 0 <= n <= 0x7FFF:
        raise ModuleReencryptionUnavailable(f"{what} ordinal {n} does not fit the 16 bits of a module's AAD")
    return struct.pack("<h", n)


@dataclass(repr=False)
class _Cipher:
    """One column's (or the footer's) old and new keys."""

    old: AESGCM
    new: AESGCM
    old_key: bytes
    new_key: bytes
    name: str


class _Job:
    """One file's re-encryption: the parsed footer and the module walk."""

    def __init__(self, source: _Source, old: ModuleKeys | None, new: ModuleKeys | None, aad_prefix: bytes | None,
                 crc_budget: int, signed: bool = True) -> None:
        """``old`` None: only the tail is read (the footer key's metadata known); :meth:`use_keys` and
        :meth:`open_footer` then give the footer."""
        self.src, self.old, self.new = source, old, new
        self.supplied_prefix = aad_prefix
        self.crc_budget = crc_budget
        self.signed = signed
        self.buf = _Buffers()
        self._ciphers: dict[str, _Cipher] = {}
        self.result = ReencryptionResult(bytes=source.size)
        self.opened_with: bytes | None = None
        if old is not None and new is not None:
            _distinct(old, new)
        self._read_tail()
        if old is not None:
            self.use_keys(old, new)
            self.open_footer()

    # -- modules ------------------------------------------------------------------------------
    def gcm(self, cipher: _Cipher, module: memoryview, aad: bytes, what: str, counted: bool = True) -> memoryview:
        """``module`` (length, nonce, ciphertext, tag) decrypted with the old key and encrypted with the
        new, checked by decrypting it again; the new module (a view of a reused buffer)."""
        return self._seal(cipher, self._open(cipher, module, aad, what), aad, what, counted=counted)

    def _open(self, cipher: _Cipher, module: memoryview, aad: bytes, what: str) -> memoryview:
        """The plaintext of GCM ``module`` under the old key, in the reused plaintext buffer."""
        n = len(module)
        if n < _LEN + _NONCE + _TAG or struct.unpack_from("<I", module)[0] != n - _LEN:
            raise ModuleReencryptionError(f"{what}: module length does not match its size")
        self.buf.fit(n)
        plain = memoryview(self.buf.plain)[: n - _LEN - _NONCE - _TAG]
        try:
            cipher.old.decrypt_into(module[_LEN : _LEN + _NONCE], module[_LEN + _NONCE :], aad, plain)
        except InvalidTag:
            raise ModuleReencryptionError(f"{what}: does not authenticate under the old {cipher.name} key") \
                from None
        return plain

    def _seal(self, cipher: _Cipher, plain: memoryview, aad: bytes, what: str, page: bool = False,
              counted: bool = True, verify: bool = True, into: memoryview | None = None) -> memoryview:
        """``plain`` sealed as a module into ``into`` (its place in a file re-encrypted in place), else into the
        reused buffer for pages (``page``) or for other modules, and (``verify``) checked by decrypting it again."""
        size = len(plain)
        n = _LEN + _NONCE + size + _TAG
        out = into if into is not None else memoryview(self.buf.page if page else self.buf.out)[:n]
        struct.pack_into("<I", out, 0, n - _LEN)
        nonce = self.buf.nonce()
        out[_LEN : _LEN + _NONCE] = nonce
        cipher.new.encrypt_into(nonce, plain, aad, out[_LEN + _NONCE :])
        if verify:
            self._verify(cipher, out, plain, aad, what)
        self.result.modules += 1
        if counted:
            self.result.module_bytes += n
        return out

    def _verify(self, cipher: _Cipher, module: memoryview, plain: memoryview, aad: bytes, what: str) -> None:
        check = memoryview(self.buf.check)[: len(plain)]
        cipher.new.decrypt_into(module[_LEN : _LEN + _NONCE], module[_LEN + _NONCE :], aad, check)
        if not _equal(check, plain):
            raise ModuleReencryptionError(f"{what}: the new module does not decrypt to the old one's plaintext")

    def _open_ctr(self, cipher: _Cipher, module: memoryview, what: str) -> memoryview:
        """The plaintext of CTR page ``module`` (length, nonce, ciphertext; no tag, no AAD) under the old key."""
        n = len(module)
        if n < _LEN + _NONCE or struct.unpack_from("<I", module)[0] != n - _LEN:
            raise ModuleReencryptionError(f"{what}: module length does not match its size")
        self.buf.fit(n)
        size = n - _LEN - _NONCE
        _ctr(cipher.old_key, module[_LEN : _LEN + _NONCE], module[_LEN + _NONCE :],
             memoryview(self.buf.plain)[: size + _CTR_ROOM])
        return memoryview(self.buf.plain)[:size]

    def _seal_ctr(self, cipher: _Cipher, plain: memoryview, what: str, verify: bool = True) -> memoryview:
        """``plain`` as a CTR page under the new key and a fresh nonce, (``verify``) checked by decrypting it
        again."""
        size = len(plain)
        n = _LEN + _NONCE + size
        page = memoryview(self.buf.page)
        struct.pack_into("<I", page, 0, n - _LEN)
        nonce = self.buf.nonce()
        page[_LEN : _LEN + _NONCE] = nonce
        _ctr(cipher.new_key, nonce, plain, page[_LEN + _NONCE : n + _CTR_ROOM])
        if verify:
            self._verify_ctr(cipher, page[:n], plain, what)
        self.result.modules += 1
        self.result.module_bytes += n
        return page[:n]

    def _verify_ctr(self, cipher: _Cipher, module: memoryview, plain: memoryview, what: str) -> None:
        size = len(plain)
        check = memoryview(self.buf.check)
        _ctr(cipher.new_key, module[_LEN : _LEN + _NONCE], module[_LEN + _NONCE :], check[: size + _CTR_ROOM])
        if not _equal(check[:size], plain):
            raise ModuleReencryptionError(f"{what}: the new module does not decrypt to the old one's plaintext")

    # -- footer -------------------------------------------------------------------------------
    def _read_tail(self) -> None:
        """The trailer, and what the footer says without its key (its algorithm; a plaintext footer whole)."""
        size = self.src.size
        if size < 12:
            raise ModuleReencryptionError(f"{size} bytes, too short for a Parquet file")
        trailer = bytes(self.src.view(size - 8, 8))
        length, magic = struct.unpack("<I", trailer[:4])[0], trailer[4:]
        if magic not in (PLAIN_MAGIC, ENCRYPTED_FOOTER_MAGIC) or length > size - 12:
            raise ModuleReencryptionError("Parquet magic bytes or footer length not found at the end of the file")
        self.magic = magic
        self.footer_start = size - 8 - length
        region = bytes(self.src.view(self.footer_start, length))
        try:
            if magic == ENCRYPTED_FOOTER_MAGIC:
                self.crypto, end = decode_struct(region)
                self._algorithm(self.crypto.get(1))
            else:
                self.metadata, end = decode_struct(region, lazy=True, eager=_FOOTER_EAGER)
                if 8 not in self.metadata:
                    raise ModuleReencryptionUnavailable("the file is not encrypted (no Parquet modular encryption)")
                self._algorithm(self.metadata.get(8))
        except ThriftError as exc:
            raise ModuleReencryptionError(f"footer is not valid Thrift: {exc}") from None
        self._region, self._end = region, end

    def use_keys(self, old: ModuleKeys, new: ModuleKeys | None) -> None:
        """The old keys (those that open the file) and the new ones (None: reading only)."""
        self.old, self.new = old, new
        self.footer_cipher = self._cipher(None, old.footer, self._new_footer(), "footer")

    def open_footer(self) -> None:
        """The footer decrypted (or its signature checked) with the old footer key, and decoded."""
        region, end = self._region, self._end
        try:
            if self.magic == ENCRYPTED_FOOTER_MAGIC:
                plain = self._decrypt_footer(memoryview(region)[end:])
                self.metadata, used = decode_struct(plain, lazy=True, eager=_FOOTER_EAGER)
            else:
                if self.signed:
                    self._check_signature(region[:end], region[end:])
                self.result.plaintext_footer = True
        except ThriftError as exc:
            raise ModuleReencryptionError(f"footer is not valid Thrift: {exc}") from None
        self.opened_with = self.old.footer

    def _new_footer(self) -> bytes | None:
        return None if self.new is None else self.new.footer

    def footer_key_metadata(self) -> bytes | None:
        return self.crypto.get(2) if self.magic == ENCRYPTED_FOOTER_MAGIC else self.metadata.get(9)

    def column_key_metadata(self) -> dict[str, bytes]:
        """Each column-key column's key metadata, by dotted path (from the first row group naming it)."""
        found: dict[str, bytes] = {}
        row_groups = self.metadata.get(4)
        for rg in row_groups.items if row_groups is not None else []:
            for chunk in rg[1].items:
                crypto = chunk.get(8)
                if crypto is not None and 2 in crypto:
                    path = ".".join(p.decode() for p in crypto[2][1].items)
                    found.setdefault(path, crypto[2].get(2) or b"")
        return found

    def _algorithm(self, union: Struct | None) -> None:
        if not isinstance(union, Struct) or len(union.fields) != 1:
            raise ModuleReencryptionError("footer names no encryption algorithm")
        kind = next(iter(union.fields))
        if kind not in ALGORITHMS:
            raise ModuleReencryptionUnavailable(f"unknown encryption algorithm (EncryptionAlgorithm member {kind})")
        self.kind = kind
        self.result.algorithm = ALGORITHMS[kind]
        params: Struct = union[kind]
        if not isinstance(params, Struct):
            raise ModuleReencryptionError("footer names no encryption algorithm")
        stored = params.get(1)
        if stored is not None and self.supplied_prefix is not None and stored != self.supplied_prefix:
            raise ModuleReencryptionError("the AAD prefix supplied differs from the one the file stores")
        prefix = stored if stored is not None else self.supplied_prefix
        if params.get(3) and prefix is None:
            raise ModuleReencryptionError("the file's AAD prefix is not stored in it: supply it")
        self.file_aad = (prefix or b"") + (params.get(2) or b"")

    def _decrypt_footer(self, module: memoryview) -> bytes:
        n = len(module)
        if n < _LEN + _NONCE + _TAG or struct.unpack_from("<I", module)[0] != n - _LEN:
            raise ModuleReencryptionError("footer: module length does not match its size")
        try:
            return self.footer_cipher.old.decrypt(module[_LEN : _LEN + _NONCE], module[_LEN + _NONCE :],
                                                  self.file_aad + bytes([FOOTER]))
        except InvalidTag:
            raise ModuleReencryptionError("footer: does not authenticate under the old footer key") from None

    def _check_signature(self, metadata: bytes, signature: bytes) -> None:
        if len(signature) != _NONCE + _TAG:
            raise ModuleReencryptionError("plaintext footer: signature is not a nonce and a tag")
        tag = self.footer_cipher.old.encrypt(signature[:_NONCE], metadata, self.file_aad + bytes([FOOTER]))[-_TAG:]
        if tag != signature[_NONCE:]:
            raise ModuleReencryptionError("plaintext footer: signature does not verify under the old footer key")

    def _cipher(self, column: str | None, old: bytes | None, new: bytes | None, name: str) -> _Cipher:
        cached = self._ciphers.get(name)
        if cached is not None and cached.old_key == old and cached.new_key == (old if self.new is None else new):
            return cached
        self._ciphers[name] = cipher = self._new_cipher(column, old, new, name)
        return cipher

    def _new_cipher(self, column: str | None, old: bytes | None, new: bytes | None, name: str) -> _Cipher:
        if self.new is None:  # reading only
            new = old
        if old is None or new is None:
            raise ModuleReencryptionError(f"no {'old' if old is None else 'new'} key given for column {column}")
        try:
            return _Cipher(AESGCM(old), AESGCM(new), old, new, name)
        except ValueError:
            raise ModuleReencryptionError(f"the {name} key is not an AES key (16, 24 or 32 bytes)") from None

    # -- the walk -----------------------------------------------------------------------------
    def plan(self) -> list[tuple[int, int, Any]]:
        """Regions of encrypted modules in file order: (start, end, action), action a callable that returns
        the new bytes of the region given a writer."""
        regions: list[tuple[int, int, Any]] = []
        row_groups = self.metadata.get(4)
        items = row_groups.items if row_groups is not None else []
        self.result.row_groups = len(items)
        self.result.rows = self.metadata.get(3)
        columns: set[str] = set()
        for rg_index, rg in enumerate(items):
            rg_ordinal = rg.get(7, rg_index)
            chunks = rg.get(1)
            for col_index, chunk in enumerate(chunks.items if chunks is not None else []):
                if chunk.get(1) is not None:
                    raise ModuleReencryptionUnavailable("a column chunk lives in another file (ColumnChunk.file_path)")
                crypto = chunk.get(8)
                if crypto is None:
                    continue
                regions.extend(self._chunk(chunk, crypto, rg_ordinal, col_index, columns))
        self.result.encrypted_columns = sorted(columns)
        regions.sort(key=lambda r: r[0])
        last = 4
        for start, end, _ in regions:
            if start < last or end > self.footer_start:
                raise ModuleReencryptionError("encrypted modules overlap or reach into the footer")
            last = end
        return regions

    def _chunk(self, chunk: Struct, crypto: Struct, rg: int, col: int, columns: set[str]
               ) -> list[tuple[int, int, Any]]:
        if 2 in crypto:
            with_key: Struct = crypto[2]
            path = ".".join(p.decode() for p in with_key[1].items)
            cipher = self._cipher(path, self.old.columns.get(path), self.new.columns.get(path), f"column {path}")
            if path in self.new.column_key_metadata:
                with_key.set(2, self.new.column_key_metadata[path], BINARY)
        else:
            cipher, path = self.footer_cipher, None
        where = _ordinal(rg, "row group") + _ordinal(col, "column")
        if 9 in chunk:  # encrypted column metadata, re-encrypted in the footer
            meta_module = memoryview(chunk[9])
            aad = self.file_aad + bytes([COLUMN_META]) + where
            new = bytes(self.gcm(cipher, meta_module, aad, "column metadata", counted=False))
            plain = bytes(memoryview(self.buf.plain)[: len(meta_module) - _LEN - _NONCE - _TAG])
            chunk.set(9, new, BINARY)
            meta, _ = decode_struct(plain, lazy=True)  # its statistics only skipped
        elif 3 in chunk:
            meta = chunk[3]
        else:
            raise ModuleReencryptionError("an encrypted column chunk holds no column metadata")
        if path is None:
            path = ".".join(p.decode() for p in meta[3].items)
        columns.add(path)
        if meta.get(14) is not None:
            raise ModuleReencryptionUnavailable(f"column {path} has a bloom filter: encrypted bloom filters are not "
                                                "re-encrypted module by module")
        dictionary = meta.get(11)
        start = dictionary if dictionary is not None and dictionary > 0 else meta[9]
        end = start + meta[7]
        regions = [(start, end, ("pages", cipher, where, dictionary is not None and dictionary > 0, path))]
        for offset_field, length_field, kind in ((6, 7, COLUMN_INDEX), (4, 5, OFFSET_INDEX)):
            offset = chunk.get(offset_field)
            if offset is not None:
                regions.append((offset, offset + chunk[length_field], ("index", cipher, where, kind, path)))
        return regions

    def check_ctr(self, regions: list[tuple[int, int, Any]]) -> None:
        """Refuse a CTR file whose pages carry no CRC before anything is written (its first page header says)."""
        if self.kind != _CTR:
            return
        for start, _end, action in regions:
            if action[0] == "pages":
                _, cipher, where, dictionary, path = action
                facts = self._header(start, cipher, self._aad(DICT_HEADER if dictionary else DATA_HEADER, where,
                                                              None if dictionary else 0), path)[0]
                if facts[3] < 0:  # no crc
                    raise ModuleReencryptionUnavailable(
                        f"AES_GCM_CTR_V1 without page CRCs (column {path}): its pages are not authenticated, so "
                        "neither a damaged source page nor a wrong new one could be detected; refused")
                return

    def _aad(self, kind: int, where: bytes, ordinal: int | None) -> bytes:
        """A module's AAD: the file's, the module type, row group and column ordinals (``where``), and the page
        ordinal where the module type has one."""
        return self.file_aad + bytes([kind]) + where + (b"" if ordinal is None else _ordinal(ordinal, "page"))

    def _header(self, pos: int, cipher: _Cipher, aad: bytes, path: str) -> tuple[PageHeaderFacts, bytes, int]:
        """The page header module at ``pos`` opened with ``aad``: what it says (:func:`page_header`), its plaintext
        and the module's length. parquet-java encrypts its whole serialization buffer: the header, then
        zeros up to the buffer's capacity; they stay in the plaintext and are re-encrypted as they are."""
        length = struct.unpack("<I", self.src.view(pos, _LEN))[0]
        module = self.src.view(pos, _LEN + length)
        size = length - _NONCE - _TAG
        if size <= 0:
            raise ModuleReencryptionError(f"column {path}: page header module length does not match its size")
        self.buf.fit(_LEN + length)
        plain = memoryview(self.buf.plain)[:size]
        try:
            cipher.old.decrypt_into(module[_LEN : _LEN + _NONCE], module[_LEN + _NONCE :], aad, plain)
        except InvalidTag:
            raise ModuleReencryptionError(f"column {path}: a page header does not authenticate under the old "
                                          "key") from None
        header = bytes(plain)
        try:
            facts = page_header(header)
        except ThriftError as exc:
            raise ModuleReencryptionError(f"column {path}: a page header is not valid Thrift: {exc}") from None
        # parquet-java's zeros after the header (see above) are allowed; anything else after it is refused
        if facts[5] != size and any(header[facts[5]:]):
            raise ModuleReencryptionError(f"column {path}: a page header module holds more than its header")
        return facts, header, _LEN + length

    def pages(self, start: int, end: int, cipher: _Cipher, where: bytes, dictionary: bool, path: str,
              sink: _StreamSink | _InPlaceSink) -> None:
        pos, ordinal = start, 0
        first = True
        # the AADs but for the page ordinal, and what errors name, once per column chunk
        data_header_aad, data_page_aad = self._aad(DATA_HEADER, where, None), self._aad(DATA_PAGE, where, None)
        aads = (self._aad(DICT_HEADER, where, None), self._aad(DICT_PAGE, where, None), data_header_aad, data_page_aad)
        what, what_header = f"column {path}: page", f"column {path}: page header"
        native = NATIVE and self.kind == _GCM
        while pos < end:
            if native:
                pos, first, ordinal = self._native_pages(pos, end, first, ordinal, dictionary, cipher, aads, what,
                                                         what_header, path, sink)
                if pos >= end:
                    break
            # a pair the native walk hands over (an error to raise, or a header it does not read), or every pair
            is_dict = dictionary and first
            if is_dict:
                header_aad, page_aad = aads[0], aads[1]
            else:
                page_ordinal = _ordinal(ordinal, "page")
                header_aad, page_aad = data_header_aad + page_ordinal, data_page_aad + page_ordinal
            pos = self._pair(pos, end, is_dict, cipher, header_aad, page_aad, what, what_header, path, sink)
            if not is_dict:
                ordinal += 1
            first = False
        if pos != end:
            raise ModuleReencryptionError(f"column {path}: pages do not end where the column chunk does")

    def _native_pages(self, pos: int, end: int, first: bool, ordinal: int, dictionary: bool, cipher: _Cipher,
                      aads: tuple[bytes, bytes, bytes, bytes], what: str, what_header: str, path: str,
                      sink: _StreamSink | _InPlaceSink) -> tuple[int, bool, int]:
        """The pairs from ``pos`` on re-encrypted by the C walk (``_pme_pages.c``), a window of the source at a time
        (a file's: at most a write's worth, or one pair; one in memory: the rest of the chunk); where it stopped,
        and the walk's state there."""
        need = 0
        in_memory = isinstance(self.src, _MemorySource)
        result = self.result
        while pos < end:
            n = end - pos if in_memory else min(end - pos, max(_StreamSink.WRITE, need))
            window, region = self.src.view(pos, n), sink.take(n)
            status, used, first, ordinal, modules, module_bytes, crc_pages, crc_retries, detail = _pme_pages.pages(
                window, region, cipher.old, cipher.new, aads, first, ordinal, dictionary, self.buf.plain,
                self.buf.check, self.crc_budget, pos + n == end)
            sink.untake(n - used)
            pos += used
            result.modules += modules
            result.module_bytes += module_bytes
            result.crc_pages += crc_pages
            result.crc_retries += crc_retries
            if status == _pme_pages.MORE:
                if not used and detail <= n:
                    raise AssertionError(f"the native page walk asked for {detail} bytes with {n} given")
                need = detail
            elif status == _pme_pages.FIT:
                self.buf.fit(detail)
                need = 0
            elif status == _pme_pages.PYTHON:
                break
            elif status == _pme_pages.VERIFY_PAGE:
                raise ModuleReencryptionError(f"{what}: the new module does not decrypt to the old one's plaintext")
            elif status == _pme_pages.VERIFY_HEADER:
                raise ModuleReencryptionError(f"{what_header}: the new module does not decrypt to the old one's "
                                              "plaintext")
            elif status == _pme_pages.CRC:
                raise ModuleReencryptionUnavailable(_crc_does_not_fit(path, detail))
        return pos, bool(first), ordinal

    def _pair(self, pos: int, end: int, is_dict: bool, cipher: _Cipher, header_aad: bytes, page_aad: bytes,
              what: str, what_header: str, path: str, sink: _StreamSink | _InPlaceSink) -> int:
        """The page header at ``pos`` and its page re-encrypted into ``sink``; where the next header starts."""
        facts, header, header_len = self._header(pos, cipher, header_aad, path)
        page_type, page_len, old_crc, crc_at, crc_size, _ = facts
        if (page_type == _DICTIONARY_PAGE) != is_dict or page_type == _INDEX_PAGE:
            raise ModuleReencryptionError(f"column {path}: page type {page_type} where "
                                          f"{'a dictionary' if is_dict else 'a data'} page belongs")
        if page_len is None:
            raise ModuleReencryptionError(f"column {path}: a page header gives no page size")
        page_at = pos + header_len
        if page_at + page_len > end:
            raise ModuleReencryptionError(f"column {path}: a page reaches past its column chunk")
        page = self.src.view(page_at, page_len)
        has_crc = crc_at >= 0
        if self.kind == _CTR:
            if not has_crc:
                raise ModuleReencryptionUnavailable(
                    f"AES_GCM_CTR_V1 without page CRCs (column {path}): its pages are not authenticated, so "
                    "neither a damaged source page nor a wrong new one could be detected; refused")
            if zlib.crc32(page) != old_crc & 0xFFFFFFFF:
                raise ModuleReencryptionError(f"column {path}: a page does not match its CRC")
        if self.kind == _CTR:
            plain = self._open_ctr(cipher, page, what)
        else:
            plain = self._open(cipher, page, page_aad, what)
        # the new header and page go straight to their place in the sink (the page's plaintext is out already)
        region = sink.take(header_len + page_len)
        direct = region[header_len:] if self.kind == _GCM else None
        tries = max(1, self.crc_budget // max(1, page_len)) if has_crc else 1
        raw = b""
        for attempt in range(tries):
            # checked below once its CRC fits: a nonce whose CRC does not is not worth checking
            if self.kind == _CTR:
                new_page = self._seal_ctr(cipher, plain, what, verify=not has_crc)
            else:
                new_page = self._seal(cipher, plain, page_aad, what, page=True, verify=not has_crc, into=direct)
            if not has_crc:
                break
            crc = zlib.crc32(new_page)
            raw = padded_varint(zigzag(crc - (1 << 32) if crc >= 1 << 31 else crc, 32), crc_size)
            if raw is not None:
                if self.kind == _CTR:
                    self._verify_ctr(cipher, new_page, plain, what)
                else:
                    self._verify(cipher, new_page, plain, page_aad, what)
                self.result.crc_pages += 1
                self.result.crc_retries += attempt
                break
            self.result.modules -= 1
            self.result.module_bytes -= len(new_page)
        else:
            raise ModuleReencryptionUnavailable(_crc_does_not_fit(path, tries))
        # the header as it was (parquet-java's zeros after it included), but for the new CRC's varint over the old
        # one's (of the same size)
        plain = memoryview(self.buf.plain)[: len(header)]  # the page's plaintext is done with
        plain[:] = header
        if has_crc:
            plain[crc_at : crc_at + crc_size] = raw
        self._seal(cipher, plain, header_aad, what_header, into=region[:header_len])
        if direct is None:
            region[header_len:] = new_page
        return page_at + page_len

    def index(self, start: int, end: int, cipher: _Cipher, where: bytes, kind: int, path: str,
              sink: _StreamSink | _InPlaceSink) -> None:
        what = f"column {path}: {'column index' if kind == COLUMN_INDEX else 'offset index'}"
        aad = self.file_aad + bytes([kind]) + where
        plain = self._open(cipher, self.src.view(start, end - start), aad, what)
        self._seal(cipher, plain, aad, what, into=sink.take(end - start))

    def footer(self) -> bytes:
        """The new footer region, length and magic."""
        aad = self.file_aad + bytes([FOOTER])
        if self.magic == ENCRYPTED_FOOTER_MAGIC:
            if self.new.footer_key_metadata is not None:
                self.crypto.set(2, self.new.footer_key_metadata, BINARY)
            plain = self.metadata.encode()
            self.buf.fit(len(plain) + 64)
            memoryview(self.buf.plain)[: len(plain)] = plain
            module = self._seal(self.footer_cipher, memoryview(self.buf.plain)[: len(plain)], aad, "footer")
            region = self.crypto.encode() + bytes(module)
            self._refused_by_old(module, aad)
        else:
            if self.new.footer_key_metadata is not None:
                self.metadata.set(9, self.new.footer_key_metadata, BINARY)
            plain = self.metadata.encode()
            nonce = os.urandom(_NONCE)
            tag = self.footer_cipher.new.encrypt(nonce, plain, aad)[-_TAG:]
            old_tag = self.footer_cipher.old.encrypt(nonce, plain, aad)[-_TAG:]
            if old_tag == tag:
                raise ModuleReencryptionError("footer: the old footer key still signs the new footer")
            region = plain + nonce + tag
            self.result.modules += 1
        return region + struct.pack("<I", len(region)) + self.magic

    def _refused_by_old(self, module: memoryview, aad: bytes) -> None:
        try:
            self.footer_cipher.old.decrypt(module[_LEN : _LEN + _NONCE], module[_LEN + _NONCE :], aad)
        except InvalidTag:
            return
        raise ModuleReencryptionError("footer: the old footer key still opens the new footer")


def _crc_does_not_fit(path: str, tries: int) -> str:
    return f"column {path}: a page's new CRC does not fit the varint its header has for it after {tries} nonce(s)"


def _ctr(key: bytes, nonce: memoryview | bytes, data: memoryview, out: memoryview) -> None:
    """AES-CTR of ``data`` into ``out`` (``_CTR_ROOM`` bytes longer: cryptography's update_into wants them), counter
    block ``nonce || 00000001`` as the Parquet spec has it."""
    if len(data):
        Cipher(algorithms.AES(key), modes.CTR(bytes(nonce) + b"\x00\x00\x00\x01")).encryptor().update_into(data, out)


def _distinct(old: ModuleKeys, new: ModuleKeys) -> None:
    if old.footer == new.footer or any(new.columns.get(c) == k for c, k in old.columns.items()):
        raise ModuleReencryptionError("a new data key equals an old one: re-encryption needs new keys")


class _StreamSink:
    """Writes the new file front to back through one reused buffer: the bytes between modules read from the source
    straight into it, each new module sealed straight into it, written out in large pieces."""

    #: What one write hands the output stream at most: below S3's part size, so that the stream copies it rather
    #: than uploading the (reused) buffer itself in the background.
    WRITE = 2 << 20

    def __init__(self, source: _Source, write: Any) -> None:
        self._source, self._write, self.pos = source, write, 0
        self._buf = _take(self.WRITE)
        self._used = 0

    def take(self, n: int) -> memoryview:
        """The next ``n`` bytes of the new file, to be filled before anything else is taken."""
        if self._used + n > len(self._buf):
            self.flush()
            if n > len(self._buf):
                _give_back(self._buf, wipe=False)
                self._buf = _take(n)
        view = memoryview(self._buf)[self._used : self._used + n]
        self._used += n
        self.pos += n
        return view

    def untake(self, n: int) -> None:
        """The last ``n`` bytes taken given back, unwritten."""
        self._used -= n
        self.pos -= n

    def skip_to(self, end: int) -> None:
        while self.pos < end:
            n = min(self.WRITE, end - self.pos)
            at = self.pos
            self._source.read_into(at, self.take(n))

    def flush(self) -> None:
        view = memoryview(self._buf)
        for at in range(0, self._used, self.WRITE):
            self._write(view[at : min(self._used, at + self.WRITE)])
        self._used = 0

    def release(self) -> None:
        """The buffer given back (once written out: the output stream copies what it is handed, see WRITE)."""
        _give_back(self._buf, wipe=False)
        self._buf = bytearray()


class _InPlaceSink:
    """Writes each new module over the old one (every module keeps its size); the bytes between stay."""

    def __init__(self, buf: memoryview) -> None:
        self._buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        """Where the next ``n`` bytes of the new file go, to be written there directly."""
        view = self._buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def untake(self, n: int) -> None:
        """The last ``n`` bytes taken given back (left as they are)."""
        self.pos -= n

    def skip_to(self, end: int) -> None:
        self.pos = end

    def flush(self) -> None:
        return None


def _run(source: _Source, sink: _StreamSink | _InPlaceSink, old: ModuleKeys, new: ModuleKeys,
         aad_prefix: bytes | None, crc_budget: int, before_write: Any = None) -> tuple[ReencryptionResult, int, bytes]:
    """Every module up to the footer re-encrypted into ``sink``; the result, where the footer starts, and the new
    footer (with its length and magic), which the caller writes."""
    return _guarded(lambda: _walk(_Job(source, old, new, aad_prefix, crc_budget), sink, before_write))


def _guarded(walk: Callable[[], Any]) -> Any:
    try:
        return walk()
    except (KeyError, IndexError, TypeError, AttributeError, struct.error) as exc:
        # metadata that decodes but is not shaped as parquet.thrift has it (a field missing or of another type)
        raise ModuleReencryptionError(f"the file's metadata is not as Parquet has it ({type(exc).__name__})") \
            from None


def _walk(job: _Job, sink: _StreamSink | _InPlaceSink, before_write: Any) -> tuple[ReencryptionResult, int, bytes]:
    try:
        regions = job.plan()
        job.check_ctr(regions)
        if before_write is not None:
            before_write()
        for start, end, action in regions:
            sink.skip_to(start)
            if action[0] == "pages":
                job.pages(start, end, *action[1:], sink)
            else:
                job.index(start, end, *action[1:], sink)
        sink.skip_to(job.footer_start)
        sink.flush()
        return job.result, job.footer_start, job.footer()
    finally:
        job.buf.release()


def reencrypt_in_place(buf: bytearray, old: ModuleKeys, new: ModuleKeys, aad_prefix: bytes | None = None,
                       crc_budget: int = CRC_BUDGET) -> ReencryptionResult:
    """The PME file held in ``buf`` re-encrypted from the ``old`` data keys to the ``new`` ones, module by module,
    each new module written over the old one (``buf`` changes size only where new key metadata stored in the
    footer does).

    ``aad_prefix``: the file's AAD prefix where it is not stored in the file. ``crc_budget``: see
    :data:`CRC_BUDGET`.

    :raises ModuleReencryptionUnavailable: the file cannot be re-encrypted so (the reason says why); ``buf`` may
        have been changed then, up to the page that could not be.
    :raises ModuleReencryptionError: a module does not authenticate under its old key, or the file is malformed.
    """
    view = memoryview(buf)
    try:
        result, footer_start, footer = _run(_MemorySource(view), _InPlaceSink(view), old, new, aad_prefix,
                                            crc_budget)
    finally:
        view.release()
    buf[footer_start:] = footer
    result.bytes = len(buf)
    return result


def reencrypt_bytes(data: bytes | bytearray | memoryview, old: ModuleKeys, new: ModuleKeys,
                    aad_prefix: bytes | None = None, crc_budget: int = CRC_BUDGET
                    ) -> tuple[bytearray, ReencryptionResult]:
    """A copy of the PME file ``data`` re-encrypted as :func:`reencrypt_in_place` does; ``data`` is unchanged."""
    out = bytearray(data)
    return out, reencrypt_in_place(out, old, new, aad_prefix, crc_budget)


def reencrypt_stream(src: BinaryIO | Any, size: int, dst: BinaryIO | Any, old: ModuleKeys, new: ModuleKeys,
                     aad_prefix: bytes | None = None, crc_budget: int = CRC_BUDGET,
                     before_write: Any = None) -> ReencryptionResult:
    """As :func:`reencrypt_bytes`, from a seekable file ``src`` of ``size`` bytes (``seek``/``readinto``) to a
    writable ``dst``, module by module with reused buffers. ``before_write`` is called once the footer has been
    read and every refusal that can be known before writing has been made."""
    source = _FileSource(src, size)
    try:
        return _stream(lambda: _Job(source, old, new, aad_prefix, crc_budget), source, dst, before_write)
    finally:
        source.release()


def _stream(job: Callable[[], _Job], source: _FileSource, dst: Any, before_write: Any) -> ReencryptionResult:
    sink = _StreamSink(source, dst.write)
    try:
        result, footer_start, footer = _guarded(lambda: _walk(job(), sink, before_write))
    finally:
        sink.release()
    dst.write(footer)
    result.bytes = footer_start + len(footer)
    return result


def reencrypt_file(src_path: str, dst_path: str, filesystem: pafs.FileSystem, old: ModuleKeys, new: ModuleKeys,
                   aad_prefix: bytes | None = None, crc_budget: int = CRC_BUDGET,
                   before_write: Any = None) -> ReencryptionResult:
    """As :func:`reencrypt_bytes`, file to file on ``filesystem``; ``dst_path`` is created only once nothing known
    before writing refuses the file (then ``before_write`` is called first), and removed when the re-encryption
    fails."""
    with filesystem.open_input_file(src_path) as src:
        source = _FileSource(src, src.size())
        try:
            return _to_file(lambda: _Job(source, old, new, aad_prefix, crc_budget), source, dst_path, filesystem,
                            before_write)
        finally:
            source.release()


def _to_file(job: Callable[[], _Job], source: _FileSource, dst_path: str, filesystem: pafs.FileSystem,
             before_write: Any) -> ReencryptionResult:
    out = _LazyOutput(filesystem, dst_path, before_write)
    try:
        result = _stream(job, source, out, out.open)
        out.close()
    except BaseException:
        if out.stream is not None:
            out.stream.close()
            try:
                filesystem.delete_file(dst_path)
            except OSError:
                pass
        raise
    return result


class ModuleSource:
    """A PME file (seekable ``src`` of ``size`` bytes) to re-encrypt module by module, its footer read and decoded
    once: its tail first (:meth:`footer_key_metadata` needs no key), then its footer with the footer key
    (:meth:`column_key_metadata`), then the file re-encrypted (:meth:`reencrypt_file`), as the functions above
    do it but without reading the footer again."""

    def __init__(self, src: BinaryIO | Any, size: int, aad_prefix: bytes | None = None,
                 crc_budget: int = CRC_BUDGET) -> None:
        self._source = _FileSource(src, size)
        self._job = _Job(self._source, None, None, aad_prefix, crc_budget)

    def decoded_footer(self) -> tuple[bytes, Struct | None, Struct]:
        """The closing magic, the FileCryptoMetaData (None with a plaintext footer) and the footer, once
        :meth:`column_key_metadata` has opened it; read as ``{field id: value}`` dicts are (:class:`Struct`), values
        decoded as they are asked for. Not to be changed."""
        job = self._job
        return job.magic, job.crypto if job.magic == ENCRYPTED_FOOTER_MAGIC else None, job.metadata

    def footer_key_metadata(self) -> bytes | None:
        """The footer key's metadata (a plaintext footer's signature is not checked yet)."""
        return self._job.footer_key_metadata()

    def column_key_metadata(self, footer_key: bytes) -> dict[str, bytes]:
        """The footer opened with ``footer_key`` (decrypted, or its signature checked); each column-key column's
        key metadata, by dotted path."""
        self._job.use_keys(ModuleKeys(footer_key), None)
        self._job.open_footer()
        return self._job.column_key_metadata()

    def reencrypt_file(self, dst_path: str, filesystem: pafs.FileSystem, old: ModuleKeys, new: ModuleKeys,
                       before_write: Any = None) -> ReencryptionResult:
        """As :func:`reencrypt_file`, from this source."""

        def job() -> _Job:
            _distinct(old, new)
            self._job.use_keys(old, new)
            if self._job.opened_with != old.footer:
                self._job.open_footer()
            return self._job

        try:
            return _to_file(job, self._source, dst_path, filesystem, before_write)
        finally:
            self._source.release()


class _LazyOutput:
    def __init__(self, filesystem: pafs.FileSystem, path: str, before_open: Any) -> None:
        self._fs, self._path, self._before_open = filesystem, path, before_open
        self.stream: Any = None

    def open(self) -> None:
        if self._before_open is not None:
            self._before_open()
        self.stream = self._fs.open_output_stream(self._path)

    def write(self, view: memoryview | bytes) -> None:
        self.stream.write(view)

    def close(self) -> None:
        self.stream.close()


@dataclass(frozen=True)
class KeyMetadata:
    """The key metadata a PME file stores: its footer key's, and each column-key column's by dotted path."""

    algorithm: str
    plaintext_footer: bool
    footer: bytes | None
    columns: dict[str, bytes]


def file_key_metadata(data: bytes | memoryview | None = None, footer_key: bytes | None = None,
                      aad_prefix: bytes | None = None, *, src: Any = None, size: int | None = None) -> KeyMetadata:
    """The key metadata of a PME file (``data`` in memory, or seekable ``src`` of ``size`` bytes). With an
    encrypted footer, column key metadata sits inside it: without ``footer_key`` only the footer's is read."""
    source: _Source = _MemorySource(data) if data is not None else _FileSource(src, size or 0)
    if footer_key is None:
        size = source.size
        trailer = bytes(source.view(size - 8, 8))
        length = struct.unpack("<I", trailer[:4])[0]
        if trailer[4:] == ENCRYPTED_FOOTER_MAGIC and length <= size - 12:
            try:
                crypto, _ = decode_struct(bytes(source.view(size - 8 - length, length)))
            except ThriftError as exc:
                raise ModuleReencryptionError(f"footer is not valid Thrift: {exc}") from None
            union = crypto.get(1)
            kind = next(iter(union.fields)) if union is not None and union.fields else 0
            return KeyMetadata(ALGORITHMS.get(kind, "unknown"), False, crypto.get(2), {})
        # a plaintext footer is readable without its key (its signature is not checked then)
        job = _Job(source, ModuleKeys(b"\0" * 16), None, aad_prefix, 0, signed=False)
    else:
        job = _Job(source, ModuleKeys(footer_key), None, aad_prefix, 0)
    return KeyMetadata(job.result.algorithm, job.result.plaintext_footer, job.footer_key_metadata(),
                       job.column_key_metadata())
