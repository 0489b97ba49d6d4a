"""The data-key table next to encrypted SQL data, and the field cipher applications use.

``keyrotation_data_keys`` holds one row per data key: its id, the key class, table and partition it
serves, the key wrapped by the key class's KMS key (``wrapped``, e.g. ``vault:v3:...``), the KEK
version that wraps it now (``version``) and the one it was created under (``created_under``). A
KEK rotation re-wraps these rows only; a full re-encryption creates new data keys.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import sqlalchemy as sa

from keyrotation.backends.base import KmsBackend
from keyrotation.formats.envelope import CachedKey, DataKeyCache, EnvelopeError, open_sealed, parse_header, seal

DATA_KEYS = "keyrotation_data_keys"
metadata = sa.MetaData()
data_keys = sa.Table(
    DATA_KEYS, metadata,
    sa.Column("key_id", sa.LargeBinary(16), primary_key=True),
    sa.Column("key_class", sa.String(200), nullable=False),
    sa.Column("table_name", sa.String(200), nullable=False),
    sa.Column("partition", sa.String(100), nullable=False),
    sa.Column("wrapped", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_under", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_keyrotation_data_keys_partition", "key_class", "table_name", "partition"),
)


class DataKeyStore:
    """Data keys of one key class in one database: create, unwrap (cached), re-wrap."""

    def __init__(self, engine: sa.Engine, backend: KmsBackend, key_class: str,
                 cache: DataKeyCache | None = None) -> None:
        self.engine = engine
        self.backend = backend
        self.key_class = key_class
        self.cache = cache if cache is not None else DataKeyCache()
        metadata.create_all(engine, tables=[data_keys], checkfirst=True)

    def create(self, table: str, partition: str, version: int) -> tuple[bytes, CachedKey]:
        """A new data key for ``partition`` wrapped under KEK ``version``: (key id, the key as cached)."""
        key, key_id = os.urandom(32), uuid.uuid4().bytes
        wrapped = self.backend.wrap(key, version)
        wrapped_under = self.backend.version_of(wrapped)
        with self.engine.begin() as conn:
            conn.execute(data_keys.insert().values(
                key_id=key_id, key_class=self.key_class, table_name=table, partition=partition, wrapped=wrapped,
                version=wrapped_under, created_under=version, created_at=datetime.now(UTC)))
        return key_id, self.cache.put(key_id, key, wrapped_under)

    def current(self, table: str, partition: str, version: int) -> tuple[bytes, CachedKey]:
        """The partition's data key created under ``version`` (made if there is none yet)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(data_keys.c.key_id).where(
                data_keys.c.key_class == self.key_class, data_keys.c.table_name == table,
                data_keys.c.partition == partition, data_keys.c.created_under == version,
                data_keys.c.version >= version).order_by(data_keys.c.created_at.desc()).limit(1)).first()
        if row is None:
            return self.create(table, partition, version)
        return row.key_id, self.key(row.key_id, f"data key of {table} partition {partition}")

    def row(self, key_id: bytes) -> sa.Row | None:
        """The data key's row (wrapped key, version, created_under, key class, table, partition), or None."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(data_keys.c.wrapped, data_keys.c.version, data_keys.c.created_under,
                                          data_keys.c.key_class, data_keys.c.table_name, data_keys.c.partition)
                                .where(data_keys.c.key_id == key_id)).first()

    def key(self, key_id: bytes, where: str) -> CachedKey:
        cached = self.cache.get(key_id)
        if cached is not None:
            return cached
        row = self.row(key_id)
        if row is None or row.key_class != self.key_class:
            raise EnvelopeError(f"{where}: data key {uuid.UUID(bytes=key_id)} is not in {DATA_KEYS} for key class "
                                f"{self.key_class} (unknown key version)")
        return self.cache.put(key_id, self.backend.unwrap(row.wrapped), int(row.version))

    def keys_of(self, table: str, partition: str) -> list[sa.Row]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(data_keys).where(
                data_keys.c.key_class == self.key_class, data_keys.c.table_name == table,
                data_keys.c.partition == partition).order_by(data_keys.c.created_at)))

    def rewrap(self, rows: list[sa.Row], version: int) -> int:
        """Re-wrap these data keys under ``version`` (server-side where the KMS can); compare-and-set on
        the old wrapped value, so a concurrent re-wrap is not undone. Returns the rows changed."""
        if not rows:
            return 0
        new = self.backend.rewrap([r.wrapped for r in rows], version)
        changed = 0
        with self.engine.begin() as conn:
            for row, wrapped in zip(rows, new, strict=True):
                changed += conn.execute(data_keys.update().where(
                    data_keys.c.key_id == row.key_id, data_keys.c.wrapped == row.wrapped,
                ).values(wrapped=wrapped, version=self.backend.version_of(wrapped))).rowcount
        return changed


class FieldCipher:
    """What an application calls to read and write encrypted columns through a rotation: decrypt a
    value under any live version, encrypt with the data key of the current version (noticed within
    ``refresh_s`` seconds of a rotation, without a restart).

    :param current_version: The KEK version new data is written under, e.g. the ledger's reference
        (``Ledger.current_version``) or the KMS's latest; asked at most every ``refresh_s`` seconds.
    """

    def __init__(self, store: DataKeyStore, current_version: Callable[[], int], refresh_s: float = 30) -> None:
        self.store = store
        self._current_version = current_version
        self.refresh_s = refresh_s
        self._version: tuple[float, int] | None = None

    def version(self) -> int:
        now = time.monotonic()
        if self._version is None or now - self._version[0] > self.refresh_s:
            self._version = (now, self._current_version())
        return self._version[1]

    def encrypt(self, value: str | bytes, *, table: str, column: str, pk: object, partition: str) -> bytes:
        key_id, key = self.store.current(table, partition, self.version())
        data = value.encode() if isinstance(value, str) else value
        return seal(data, key.aead, key_id, self.store.key_class, table, column, pk)

    def decrypt(self, value: bytes, *, table: str, column: str, pk: object) -> bytes:
        where = f"{table}.{column} row {pk}"
        header = parse_header(bytes(value), where)
        if header.key_class != self.store.key_class:
            raise EnvelopeError(f"{where}: value belongs to key class {header.key_class!r}, not "
                                f"{self.store.key_class!r}")
        return open_sealed(value, self.store.key(header.key_id, where).aead, header, table, column, pk, where)
