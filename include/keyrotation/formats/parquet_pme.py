"""Parquet Modular Encryption with external key material, wrapped by a :class:`KmsBackend`.

Each data file ``X.parquet`` has a sidecar ``_KEY_MATERIAL_FOR_X.parquet.json`` holding its data
keys, double-wrapped: DEK -> KEK (local) -> master key version (KMS). A KEK rotation rewrites only
the sidecar (``CryptoFactory.rotate_master_keys``); a full re-encryption writes new files with
fresh data keys. The wrapped KEK names its master key version (``vault:vN:...`` for Transit), so
which version protects a file is known from the sidecar alone, without reading data.
"""

from __future__ import annotations

import json
import posixpath
from datetime import timedelta

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe

from keyrotation.backends.base import KmsBackend
from keyrotation.errors import BackendError

KEY_MATERIAL_PREFIX = "_KEY_MATERIAL_FOR_"


def key_material_path(data_path: str) -> str:
    directory, name = posixpath.split(data_path)
    return posixpath.join(directory, f"{KEY_MATERIAL_PREFIX}{name}.json")


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


class ParquetEncryption:
    """Write, read and re-wrap PME files for one key class's master key."""

    def __init__(self, backend: KmsBackend, encrypted_columns: list[str]) -> None:
        self.backend = backend
        self.encrypted_columns = list(encrypted_columns)

    def _factory(self, version: int | None) -> pe.CryptoFactory:
        # A fresh factory per operation: pyarrow caches KMS clients and KEKs per factory, and a
        # cached KEK would hide a rotation or a raised min_decryption_version.
        return pe.CryptoFactory(lambda _config: _BackendKmsClient(self.backend, version))

    def write(self, table: pa.Table, path: str, filesystem: pafs.FileSystem, version: int | None) -> None:
        missing = [c for c in self.encrypted_columns if c not in table.column_names]
        if missing:
            raise BackendError(f"{path}: encrypted columns not in the data: {', '.join(missing)}")
        config = pe.EncryptionConfiguration(
            footer_key=self.backend.key_ref,
            column_keys={self.backend.key_ref: self.encrypted_columns},
            double_wrapping=True,
            internal_key_material=False,
            cache_lifetime=timedelta(seconds=60),
        )
        props = self._factory(version).file_encryption_properties(pe.KmsConnectionConfig(), config, path, filesystem)
        pq.write_table(table, path, encryption_properties=props, filesystem=filesystem)

    def read(self, path: str, filesystem: pafs.FileSystem) -> pa.Table:
        props = self._factory(None).file_decryption_properties(
            pe.KmsConnectionConfig(), pe.DecryptionConfiguration(cache_lifetime=timedelta(seconds=60)), path, filesystem
        )
        return pq.read_table(path, decryption_properties=props, filesystem=filesystem)

    def rotate(self, path: str, filesystem: pafs.FileSystem, version: int) -> None:
        """Re-wrap the file's key material under ``version``; the data file is not touched."""
        self._factory(version).rotate_master_keys(
            pe.KmsConnectionConfig(), path, filesystem, double_wrapping=True, cache_lifetime_seconds=60
        )

    def wrapping_versions(self, path: str, filesystem: pafs.FileSystem) -> set[int]:
        """Master key versions that wrap the file's keys, read from its key material sidecar."""
        material_path = key_material_path(path)
        with filesystem.open_input_stream(material_path) as stream:
            raw = stream.read()
        try:
            entries = json.loads(raw)
            versions: set[int] = set()
            for entry in entries.values():
                material = json.loads(entry) if isinstance(entry, str) else entry
                if material.get("masterKeyID") != self.backend.key_ref:
                    raise BackendError(
                        f"{material_path}: protected by master key {material.get('masterKeyID')!r}, "
                        f"but its key class uses {self.backend.key_ref!r}"
                    )
                wrapped = material.get("wrappedKEK") if material.get("doubleWrapping") else material.get("wrappedDEK")
                versions.add(self.backend.version_of(wrapped))
        except (ValueError, AttributeError, TypeError) as exc:
            raise BackendError(f"{material_path}: key material is not valid ({type(exc).__name__})") from None
        if not versions:
            raise BackendError(f"{material_path}: key material holds no keys")
        return versions
