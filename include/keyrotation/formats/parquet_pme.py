"""Parquet Modular Encryption with external key material, wrapped by a :class:`KmsBackend`.

Each data file ``X.parquet`` has a sidecar ``_KEY_MATERIAL_FOR_X.parquet.json`` holding its data
keys, double-wrapped: DEK -> KEK (local) -> master key version (KMS). A KEK rotation rewrites only
the sidecar (the wrapped KEKs re-wrapped by the backend); a full re-encryption writes new files with
fresh data keys. The wrapped KEK names its master key version (``vault:vN:...`` for Transit), so
which version protects a file is known from the sidecar alone, without reading data.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotation.backends.base import KmsBackend
from keyrotation.errors import BackendError
from keyrotation.formats import hadoop_crc
from keyrotation.formats.parquet_footer import (
    FooterError,
    FooterFacts,
    check_tail,
    decoded_footer_facts,
    footer_facts,
    streamed_only,
)
from keyrotation.formats.pme_modules import (
    ModuleKeys,
    ModuleReencryptionError,
    ModuleReencryptionUnavailable,
    ModuleSource,
    ReencryptionResult,
)

KEY_MATERIAL_PREFIX = "_KEY_MATERIAL_FOR_"
#: Rows per row group of the files written here: what a streaming reader holds of a file at once.
ROW_GROUP_ROWS = 65_536
# Prefix of re-wrapped key material before it is renamed over the old (pyarrow's own key rotation
# uses it too), so a crash leaves only names that PartitionStore.clean recognises.
TEMP_MATERIAL_PREFIX = "_TMP"


PKMT1 = "PKMT1"


def unwrap_data_key(material: Mapping[str, Any], unwrap: Callable[[str], bytes]) -> bytes:
    """The data key of one PKMT1 key material entry: with double wrapping, its KEK unwrapped by ``unwrap`` (the
    KMS) and the DEK by AES-GCM under the KEK (associated data: the raw KEK id); else the DEK by ``unwrap``.
    Raises cryptography's InvalidTag when the wrapped DEK is not this KEK's."""
    if material.get("doubleWrapping"):
        blob = base64.b64decode(material["wrappedDEK"])
        kek = unwrap(material["wrappedKEK"])
        return AESGCM(kek).decrypt(blob[:12], blob[12:], base64.b64decode(material["keyEncryptionKeyID"]))
    return unwrap(material["wrappedDEK"])


def double_wrapped_material(dek: bytes, kek: bytes, kek_id: bytes, wrapped_kek: str, master_key_id: str,
                            footer: bool, internal: bool = False) -> dict[str, Any]:
    """A PKMT1 key material entry for ``dek`` wrapped by the KEK ``kek`` (``wrapped_kek``: as the KMS wrapped it
    under ``master_key_id``), fields named and ordered as pyarrow writes them; ``internal``: to be stored in
    the file's key metadata itself."""
    nonce = os.urandom(12)
    entry: dict[str, Any] = {"keyMaterialType": PKMT1}
    if internal:
        entry["internalStorage"] = True
    entry["isFooterKey"] = footer
    if footer:
        entry.update(kmsInstanceID="DEFAULT", kmsInstanceURL="DEFAULT")
    entry.update(masterKeyID=master_key_id,
                 wrappedDEK=base64.b64encode(nonce + AESGCM(kek).encrypt(nonce, dek, kek_id)).decode(),
                 doubleWrapping=True, keyEncryptionKeyID=base64.b64encode(kek_id).decode(), wrappedKEK=wrapped_kek)
    return entry


@contextmanager
def _random_access(path: str, filesystem: pafs.FileSystem) -> Iterator[pa.NativeFile]:
    """``path`` open for random-access reads. Where files are read front to back only (GCS: see
    :func:`~keyrotation.formats.parquet_footer.streamed_only`), from a copy in a temporary local file, streamed in
    1 MiB pieces: memory stays bounded, the disk holds the (encrypted) file until the caller is done."""
    if not streamed_only(filesystem):
        with filesystem.open_input_file(path) as src:
            yield src
        return
    with tempfile.TemporaryDirectory(prefix="keyrotation-modules-") as folder:
        local = os.path.join(folder, posixpath.basename(path))
        with filesystem.open_input_stream(path) as stream, open(local, "wb") as out:
            while chunk := stream.read(1 << 20):
                out.write(chunk)
        with pafs.LocalFileSystem().open_input_file(local) as src:
            yield src


def key_material_path(data_path: str) -> str:
    directory, name = posixpath.split(data_path)
    return posixpath.join(directory, f"{KEY_MATERIAL_PREFIX}{name}.json")


@dataclass(frozen=True)
class KeyMaterial:
    """The key material of one data file as read: its path, its entries by key id, and the field of each
    entry that holds the wrapped key the KMS re-wraps (``wrappedKEK`` with double wrapping)."""

    path: str
    entries: dict[str, dict]
    field: dict[str, str]
    #: The sha256 of the key material file as read.
    digest: str = ""

    @property
    def wrapped(self) -> list[str]:
        """The distinct wrapped keys the KMS re-wraps, in order (with double wrapping, usually one: the KEK)."""
        return list(dict.fromkeys(e[self.field[name]] for name, e in self.entries.items()))


@dataclass(frozen=True)
class FileProtection:
    """What protects one PME file, proven by the KMS and the file itself: the master key versions that
    unwrapped its keys (the KMS decrypts a wrapped key only with the version it was made with, so a
    relabelled key fails), and the columns its footer, decrypted with its footer key, says are encrypted."""

    versions: frozenset[int]
    algorithm: str
    encrypted_columns: frozenset[str]
    columns: frozenset[str]


class _BackendKmsClient(pe.KmsClient):
    """Bridges pyarrow's KmsClient to a backend; wraps with one fixed master key version."""

    def __init__(self, backend: KmsBackend, version: int | None) -> None:
        super().__init__()
        self._backend = backend
        self._version = version

    def _check(self, master_key_identifier: str) -> None:
        if master_key_identifier != self._backend.key_ref:
            raise BackendError(
                f"file is protected by master key {master_key_identifier!r}, "
                f"but its key class uses {self._backend.key_ref!r}"
            )

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        self._check(master_key_identifier)
        return self._backend.wrap(key_bytes, self._version)

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        self._check(master_key_identifier)
        return self._backend.unwrap(wrapped_key)


class EncryptedParquetFile:
    """One PME file read record batch by record batch, through ``pyarrow.dataset``.

    Not ``pq.ParquetFile``: on a ``GcsFileSystem`` its constructor deadlocks when the footer key
    has to be unwrapped by a Python ``KmsClient`` (pyarrow 26), where the dataset reader releases
    the GIL. ``pre_buffer=False`` and no read-ahead: one row group at a time, not the whole file.
    """

    def __init__(self, path: str, filesystem: pafs.FileSystem, properties: pe.FileDecryptionProperties) -> None:
        options = pads.ParquetFragmentScanOptions(decryption_properties=properties, pre_buffer=False)
        fragment = pads.ParquetFileFormat(default_fragment_scan_options=options).make_fragment(
            path, filesystem=filesystem)
        self._fragment = fragment
        self.schema_arrow: pa.Schema = fragment.physical_schema
        self.metadata: pq.FileMetaData = fragment.metadata
        self.num_rows: int = self.metadata.num_rows

    def read_row_group(self, index: int, columns: list[str] | None = None) -> pa.Table:
        return self._fragment.subset(row_group_ids=[index]).to_table(columns=columns, use_threads=False)

    def iter_batches(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        return iter(self._fragment.to_batches(batch_size=batch_size, use_threads=False, batch_readahead=0,
                                              fragment_readahead=0))

    def close(self) -> None:
        self._fragment = None


class ParquetEncryption:
    """Write, read and re-wrap PME files for one key class's master key."""

    def __init__(self, backend: KmsBackend, encrypted_columns: list[str]) -> None:
        self.backend = backend
        self.encrypted_columns = list(encrypted_columns)

    def _factory(self, version: int | None) -> pe.CryptoFactory:
        # A fresh factory per operation: pyarrow caches KMS clients and KEKs per factory, and a
        # cached KEK would hide a rotation or a raised min_decryption_version.
        return pe.CryptoFactory(lambda _config: _BackendKmsClient(self.backend, version))

    def _encryption_properties(self, schema: pa.Schema, path: str, filesystem: pafs.FileSystem,
                               version: int | None) -> pe.FileEncryptionProperties:
        missing = [c for c in self.encrypted_columns if c not in schema.names]
        if missing:
            raise BackendError(f"{path}: encrypted columns not in the data: {', '.join(missing)}")
        config = pe.EncryptionConfiguration(
            footer_key=self.backend.key_ref,
            column_keys={self.backend.key_ref: self.encrypted_columns},
            double_wrapping=True,
            internal_key_material=False,
            cache_lifetime=timedelta(seconds=60),
        )
        return self._factory(version).file_encryption_properties(pe.KmsConnectionConfig(), config, path, filesystem)

    def write(self, table: pa.Table, path: str, filesystem: pafs.FileSystem, version: int | None) -> None:
        props = self._encryption_properties(table.schema, path, filesystem, version)
        pq.write_table(table, path, encryption_properties=props, filesystem=filesystem, row_group_size=ROW_GROUP_ROWS)

    def writer(self, path: str, filesystem: pafs.FileSystem, schema: pa.Schema, version: int | None
               ) -> pq.ParquetWriter:
        """A writer of one PME file under ``version``, to be given record batches in turn (and closed)."""
        props = self._encryption_properties(schema, path, filesystem, version)
        return pq.ParquetWriter(path, schema, filesystem=filesystem, encryption_properties=props)

    def _decryption_properties(self, path: str, filesystem: pafs.FileSystem) -> pe.FileDecryptionProperties:
        return self._factory(None).file_decryption_properties(
            pe.KmsConnectionConfig(), pe.DecryptionConfiguration(cache_lifetime=timedelta(seconds=60)), path, filesystem
        )

    def read(self, path: str, filesystem: pafs.FileSystem) -> pa.Table:
        return pq.read_table(path, decryption_properties=self._decryption_properties(path, filesystem),
                             filesystem=filesystem)

    def open(self, path: str, filesystem: pafs.FileSystem) -> EncryptedParquetFile:
        """The file for reading batch by batch; its footer is decrypted already."""
        return EncryptedParquetFile(path, filesystem, self._decryption_properties(path, filesystem))

    def rewrap(self, path: str, filesystem: pafs.FileSystem, version: int,
               checkpoint: Callable[[str], None] | None = None) -> None:
        """Re-wrap the file's key material under ``version``; the data file is not touched.

        The backend's :meth:`~keyrotation.backends.base.KmsBackend.rewrap` re-wraps the KEKs: in the
        KMS where it can (Transit's batch rewrap, AWS's ReEncrypt; the KEKs never leave it in
        plaintext, one call serves the whole file), else by decrypting and encrypting each one in
        this process's memory (Cloud KMS). pyarrow's own ``CryptoFactory.rotate_master_keys`` is not
        used: it hangs on a ``GcsFileSystem`` (pyarrow 26), and it would unwrap KEKs locally even
        where the KMS need not. The new material is written under a temporary name and renamed over
        the old, so a crash leaves one or the other, both decryptable. Many files at once: read each
        one's :meth:`key_material`, re-wrap their distinct :attr:`KeyMaterial.wrapped` together, and
        :meth:`write_rewrapped` each.
        """
        material = self.key_material(path, filesystem)
        distinct = material.wrapped
        self.write_rewrapped(material, dict(zip(distinct, self.backend.rewrap(distinct, version), strict=True)),
                             filesystem, checkpoint)

    def key_material(self, path: str, filesystem: pafs.FileSystem) -> KeyMaterial:
        """The key material of data file ``path``, checked to belong to this key class's master key."""
        material_path = key_material_path(path)
        entries, digest = self._material_and_digest(material_path, filesystem)
        field = {name: "wrappedKEK" if m.get("doubleWrapping") else "wrappedDEK" for name, m in entries.items()}
        return KeyMaterial(material_path, entries, field, digest)

    def write_rewrapped(self, material: KeyMaterial, rewrapped: Mapping[str, str], filesystem: pafs.FileSystem,
                        checkpoint: Callable[[str], None] | None = None) -> None:
        """Write ``material`` with each wrapped key replaced by its ``rewrapped`` form (old -> new, as
        :meth:`~keyrotation.backends.base.KmsBackend.rewrap` made them): under a temporary name, renamed over
        the old key material."""
        out = {}
        for name, entry in material.entries.items():
            out[name] = json.dumps({**entry, material.field[name]: rewrapped[entry[material.field[name]]]},
                                   separators=(",", ":"))
        directory, base = posixpath.split(material.path)
        tmp = posixpath.join(directory, f"{TEMP_MATERIAL_PREFIX}{base}")
        data = json.dumps(out, separators=(",", ":")).encode()
        with filesystem.open_output_stream(tmp) as stream:
            stream.write(data)
        if checkpoint is not None:  # the fault tests' kill point between the new material and its rename
            checkpoint("material_staged")
        # Key material Spark wrote on a local filesystem has a Hadoop checksum side file: rewritten, never stale.
        hadoop_crc.replace_file(filesystem, tmp, material.path, data, f"{tmp}{hadoop_crc.SUFFIX}", checkpoint)

    def _material(self, material_path: str, filesystem: pafs.FileSystem) -> dict[str, dict]:
        """The key material entries of a sidecar, checked to belong to this key class's master key."""
        return self._material_and_digest(material_path, filesystem)[0]

    def _material_and_digest(self, material_path: str, filesystem: pafs.FileSystem) -> tuple[dict[str, dict], str]:
        with filesystem.open_input_stream(material_path) as stream:
            raw = stream.read()
        try:
            entries = {name: json.loads(e) if isinstance(e, str) else e for name, e in json.loads(raw).items()}
            for material in entries.values():
                if material.get("masterKeyID") != self.backend.key_ref:
                    raise BackendError(
                        f"{material_path}: protected by master key {material.get('masterKeyID')!r}, "
                        f"but its key class uses {self.backend.key_ref!r}"
                    )
        except (ValueError, AttributeError, TypeError) as exc:
            raise BackendError(f"{material_path}: key material is not valid ({type(exc).__name__})") from None
        if not entries:
            raise BackendError(f"{material_path}: key material holds no keys")
        return entries, hashlib.sha256(raw).hexdigest()

    def inspect(self, path: str, filesystem: pafs.FileSystem) -> FileProtection:
        """Prove what protects ``path``: each distinct wrapped key of its key material unwrapped by the
        KMS (one request per file with double wrapping), its footer decrypted with the footer data key
        and read for the columns it encrypts. Raises BackendError when any step fails."""
        material_path = key_material_path(path)
        entries = self._material(material_path, filesystem)
        footer = next((m for m in entries.values() if m.get("isFooterKey")), None)
        if footer is None:
            raise BackendError(f"{material_path}: key material holds no footer key")
        unwrapped: dict[str, bytes] = {}
        try:
            for material in entries.values():
                wrapped = material["wrappedKEK" if material.get("doubleWrapping") else "wrappedDEK"]
                if wrapped not in unwrapped:
                    unwrapped[wrapped] = self.backend.unwrap(wrapped)
            versions = frozenset(self.backend.version_of(w) for w in unwrapped)
            footer_key = unwrap_data_key(footer, unwrapped.__getitem__)
            facts: FooterFacts = footer_facts(path, filesystem, footer_key)
        except (KeyError, ValueError, TypeError) as exc:
            if isinstance(exc, FooterError):
                raise BackendError(str(exc)) from None
            raise BackendError(f"{material_path}: key material does not open the file ({type(exc).__name__})") \
                from None
        except Exception as exc:  # cryptography's InvalidTag: a wrapped data key altered or not this KEK's
            if isinstance(exc, BackendError):
                raise
            raise BackendError(f"{material_path}: a data key does not authenticate under its KEK") from None
        finally:
            unwrapped.clear()
        return FileProtection(versions, facts.algorithm or "", facts.encrypted_columns or frozenset(),
                              facts.columns or frozenset())

    def reencrypt_modules(self, src_path: str, dst_path: str, filesystem: pafs.FileSystem, version: int,
                          sample_row_groups: int = 2,
                          check_columns: Callable[[frozenset[str]], None] | None = None) -> ReencryptionResult:
        """Write ``src_path`` as ``dst_path`` with new data keys (footer and each column key), module by module
        (:mod:`keyrotation.formats.pme_modules`): the data stays encoded and compressed as it was. The old keys
        come from the source's key material (the KMS unwraps its KEK, one request); the new ones are wrapped by a
        new KEK that the KMS wraps under ``version``, written as ``dst_path``'s key material in pyarrow's PKMT1
        format with the same key references, so stock pyarrow, the census and :meth:`rewrap` read it.

        Verified besides each module's equality: the old footer key does not open the new footer, and pyarrow
        opens the new file through the KMS and reads ``sample_row_groups`` of its row groups (the first and the
        last). Raises :class:`~keyrotation.formats.pme_modules.ModuleReencryptionUnavailable` where the module
        path does not apply (before anything is written, where that is known before), BackendError where the
        keys do not open the file; on any failure neither the new file nor its key material is left behind.
        ``check_columns`` is given the columns the source's footer encrypts (read as :meth:`inspect` reads them,
        refusing what it refuses) before anything is written or a new key made (it raises to refuse the file).
        """
        material = self.key_material(src_path, filesystem)
        if next((m for m in material.entries.values() if m.get("isFooterKey")), None) is None:
            raise BackendError(f"{material.path}: key material holds no footer key")
        with _random_access(src_path, filesystem) as src:
            source, old, refs = self._open_source(src_path, src, material)
            if check_columns is not None:
                try:  # as inspect() reads the footer, and refuses it
                    facts = decoded_footer_facts(src_path, *source.decoded_footer())
                except (KeyError, ValueError, TypeError) as exc:
                    if isinstance(exc, FooterError):
                        raise BackendError(str(exc)) from None
                    raise BackendError(f"{material.path}: key material does not open the file "
                                       f"({type(exc).__name__})") from None
                except Exception:
                    raise BackendError(f"{material.path}: a data key does not authenticate under its KEK") \
                        from None
                check_columns(facts.encrypted_columns or frozenset())
            return self._reencrypt_source(source, old, refs, dst_path, filesystem, version, sample_row_groups,
                                          check_columns)

    def _reencrypt_source(self, source: ModuleSource, old: ModuleKeys, refs: dict[str, str | None], dst_path: str,
                          filesystem: pafs.FileSystem, version: int, sample_row_groups: int,
                          check_columns: Callable[[frozenset[str]], None] | None) -> ReencryptionResult:
        master = self.backend.key_ref  # every entry's, as key_material checked
        keks: dict[str, tuple[bytes, bytes, str]] = {}
        entries: dict[str, str] = {}
        new_columns: dict[str, bytes] = {}
        new_footer = b""
        for ref, column in refs.items():
            old_key = old.footer if column is None else old.columns[column]
            dek = os.urandom(len(old_key))
            if master not in keks:
                kek = os.urandom(16)
                keks[master] = (kek, os.urandom(16), self.backend.wrap(kek, version))
            new_entry = double_wrapped_material(dek, *keks[master], master, column is None)
            entries[ref] = json.dumps(new_entry, separators=(",", ":"))
            if column is None:
                new_footer = dek
            else:
                new_columns[column] = dek
        new = ModuleKeys(new_footer, new_columns)
        new_material = key_material_path(dst_path)

        def write_material() -> None:
            with filesystem.open_output_stream(new_material) as stream:
                stream.write(json.dumps(entries, separators=(",", ":")).encode())

        try:
            result = source.reencrypt_file(dst_path, filesystem, old, new, before_write=write_material)
            self._check_reencrypted(dst_path, filesystem, old, sample_row_groups)
        except BaseException:
            for path in (dst_path, new_material):
                try:
                    filesystem.delete_file(path)
                except OSError:
                    pass  # not written
            raise
        finally:
            keks.clear()
        return result

    def _old_data_keys(self, path: str, filesystem: pafs.FileSystem, material: KeyMaterial
                       ) -> tuple[ModuleKeys, dict[str, str | None]]:
        """The file's data keys (its key material's KEKs unwrapped by the KMS, once each), the key reference of
        each (None: the footer key's; else its column's)."""
        with filesystem.open_input_file(path) as src:
            return self._open_source(path, src, material)[1:]

    def _open_source(self, path: str, src: Any, material: KeyMaterial
                     ) -> tuple[ModuleSource, ModuleKeys, dict[str, str | None]]:
        """Data file ``path`` (open as ``src``) with its footer read once, its data keys and their references (as
        :meth:`_old_data_keys` gives them)."""
        unwrapped: dict[str, bytes] = {}

        def unwrap(wrapped: str) -> bytes:
            if wrapped not in unwrapped:
                unwrapped[wrapped] = self.backend.unwrap(wrapped)
            return unwrapped[wrapped]

        try:
            size = src.size()
            check_tail(path, size, src.read_at(8, size - 8) if size >= 12 else b"")
            source = ModuleSource(src, size)
            footer_ref = self._reference(material, source.footer_key_metadata())
            footer_key = unwrap_data_key(material.entries[footer_ref], unwrap)
            columns = source.column_key_metadata(footer_key)
            refs: dict[str, str | None] = {footer_ref: None}
            keys: dict[str, bytes] = {}
            for column, metadata in columns.items():
                ref = self._reference(material, metadata)
                refs[ref] = column
                keys[column] = unwrap_data_key(material.entries[ref], unwrap)
            # every wrapped key of the key material, as inspect() proves them (with double wrapping, the one KEK
            # unwrapped already)
            for entry in material.entries.values():
                unwrap(entry["wrappedKEK" if entry.get("doubleWrapping") else "wrappedDEK"])
            for wrapped in unwrapped:
                self.backend.version_of(wrapped)
        except (KeyError, TypeError) as exc:
            raise BackendError(f"{material.path}: key material does not open the file ({type(exc).__name__})") \
                from None
        except FooterError as exc:
            raise BackendError(str(exc)) from None
        except ModuleReencryptionError as exc:
            raise BackendError(f"{path}: {exc}") from None
        except InvalidTag:
            raise BackendError(f"{material.path}: a data key does not authenticate under its KEK") from None
        except ValueError as exc:
            raise BackendError(f"{material.path}: key material does not open the file ({type(exc).__name__})") \
                from None
        finally:
            unwrapped.clear()
        return source, ModuleKeys(footer_key, keys), refs

    @staticmethod
    def _reference(material: KeyMaterial, key_metadata: bytes | None) -> str:
        """The key material entry a file's key metadata names (only external key material is written here)."""
        try:
            metadata = json.loads(key_metadata or b"")
        except ValueError:
            raise BackendError(f"{material.path}: the file's key metadata is not PKMT1") from None
        if metadata.get("internalStorage") is not False:
            raise ModuleReencryptionUnavailable("the file keeps its key material inside it, not in a key material "
                                                "file")
        ref = metadata.get("keyReference")
        if ref not in material.entries:
            raise BackendError(f"{material.path}: holds no key {ref!r}, which the file names")
        return ref

    def _check_reencrypted(self, path: str, filesystem: pafs.FileSystem, old: ModuleKeys, samples: int) -> None:
        """The old footer key does not open the new file; pyarrow (through the KMS) opens it and reads the encrypted
        columns of a sample of its row groups (what the new keys open: the plaintext columns' bytes are copied as
        they were)."""
        try:
            footer_facts(path, filesystem, old.footer)
        except FooterError:
            pass
        else:
            raise ModuleReencryptionError("the old footer key opens the new file")
        source = self.open(path, filesystem)
        try:
            count = source.metadata.num_row_groups
            columns = [c for c in source.schema_arrow.names if c in self.encrypted_columns] or None
            for index in sorted({0, count - 1})[:samples] if count else []:
                rows = source.read_row_group(index, columns).num_rows
                if rows != source.metadata.row_group(index).num_rows:
                    raise ModuleReencryptionError(f"row group {index} of the new file reads {rows} rows, its footer "
                                                  f"says {source.metadata.row_group(index).num_rows}")
        finally:
            source.close()

    def wrapping_versions(self, path: str, filesystem: pafs.FileSystem) -> set[int]:
        """Master key versions that wrap the file's keys, read from its key material sidecar."""
        return self.key_material_facts(path, filesystem)[0]

    def key_material_facts(self, path: str, filesystem: pafs.FileSystem) -> tuple[set[int], str]:
        """The versions that wrap the file's keys, as its key material labels them, and the sha256 of the key
        material file (a validation records it, so a later change to the labels is seen without the KMS)."""
        material = self.key_material(path, filesystem)
        return self.labels(material), material.digest

    def labels(self, material: KeyMaterial) -> set[int]:
        """The versions ``material``'s wrapped keys name."""
        try:
            return {self.backend.version_of(e.get(material.field[name])) for name, e in material.entries.items()}
        except (ValueError, AttributeError, TypeError) as exc:
            raise BackendError(f"{material.path}: key material is not valid ({type(exc).__name__})") from None
