"""The data-key table next to encrypted SQL data: one row per data key, and the one lookup of unwrapped keys.

``keyrotation_data_keys`` holds one row per data key: its id, the key class, table and partition it
serves, the key wrapped by the key class's KMS key (``wrapped``, e.g. ``vault:v3:...``), the KEK
version that wraps it now (``version``) and the one it was created under (``created_under``). A
KEK rotation re-wraps these rows only; a full re-encryption creates new data keys.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import cachetools
import sqlalchemy as sa

from keyrotation.backends.base import KmsBackend
from keyrotation.errors import BackendError, KeyRotationError, KmsUnreachable, PermissionDenied
from keyrotation.formats.envelope import CachedKey, DataKeyCache, EnvelopeError

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


class RetiredDataKey(KeyRotationError):
    """A data key wrapped under a version below the floor asked for: it must not be used."""

    def __init__(self, where: str, key_id: bytes, row: sa.Row, floor: int, why: str) -> None:
        super().__init__(f"{where}: data key {uuid.UUID(bytes=key_id)} is under retired v{row.version}")
        self.where, self.key_id, self.row, self.floor, self.why = where, key_id, row, floor, why


class SingleFlight:
    """One loader per key at a time: concurrent misses on the same data key make one KMS call, not N."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[Any, list] = {}

    @contextmanager
    def __call__(self, key: Any) -> Iterator[None]:
        with self._lock:
            slot = self._locks.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1
        try:
            with slot[0]:
                yield
        finally:
            with self._lock:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._locks[key]


def _no_count(_outcome: str) -> None:
    return None


class DataKeyStore:
    """Data keys of one key class in one database: create, look up (cached, one unwrap per key however many
    threads ask), re-wrap. The one data-key lookup of the package (the engine, the client).

    :param cache: where unwrapped keys live (the client passes its own, sized and timed by the application).
    :param count: told ``cache_hits`` or ``cache_misses`` on each lookup (the client's metrics).
    """

    def __init__(self, db: sa.Engine, backend: KmsBackend, key_class: str,
                 cache: DataKeyCache | None = None, count: Callable[[str], None] = _no_count) -> None:
        self.db = db
        self.backend = backend
        self.key_class = key_class
        self.cache = cache if cache is not None else DataKeyCache()
        self._count = count
        # (table, partition, version) -> the id of the partition's data key created under that version; ids are
        # not secret, and are kept as long as the keys are.
        self._ids: cachetools.TTLCache = cachetools.TTLCache(max(self.cache.size, 1), self.cache.ttl_s,
                                                             timer=self.cache.clock)
        self._ids_lock = threading.Lock()
        self._flight = SingleFlight()
        metadata.create_all(db, tables=[data_keys], checkfirst=True)

    def create(self, table: str, partition: str, version: int) -> tuple[bytes, CachedKey]:
        """A new data key for ``partition`` wrapped under KEK ``version``: (key id, the key as cached)."""
        key, key_id = os.urandom(32), uuid.uuid4().bytes
        wrapped = self.backend.wrap(key, version)
        wrapped_under = self.backend.version_of(wrapped)
        with self.db.begin() as conn:
            conn.execute(data_keys.insert().values(
                key_id=key_id, key_class=self.key_class, table_name=table, partition=partition, wrapped=wrapped,
                version=wrapped_under, created_under=version, created_at=datetime.now(UTC)))
        return key_id, self.cache.put(key_id, key, wrapped_under)

    def current(self, table: str, partition: str, version: int,
                floor: int | None = None) -> tuple[bytes, CachedKey]:
        """The partition's data key created under ``version`` (made if there is none yet), from the cache if
        there; ``floor`` as in :meth:`key`."""
        slot = (table, partition, version)
        found = self._cached_for(slot, floor)
        if found is not None:
            return found
        with self._flight(slot):
            found = self._cached_for(slot, floor)  # another thread may have loaded it while this one waited
            if found is not None:
                return found
            with self.db.connect() as conn:
                row = conn.execute(sa.select(data_keys.c.key_id).where(
                    data_keys.c.key_class == self.key_class, data_keys.c.table_name == table,
                    data_keys.c.partition == partition, data_keys.c.created_under == version,
                    data_keys.c.version >= version).order_by(data_keys.c.created_at.desc()).limit(1)).first()
            if row is None:  # a new key: one wrap
                self._count("cache_misses")
                key_id, entry = self.create(table, partition, version)
            else:  # an existing one: the cache, else one unwrap (single-flight with decryptions of it)
                key_id = row.key_id
                entry = self.key(key_id, f"data key of {table} partition {partition}", floor)
            if self.cache.size:
                with self._ids_lock:
                    self._ids[slot] = key_id
            return key_id, entry

    def _cached_for(self, slot: tuple, floor: int | None) -> tuple[bytes, CachedKey] | None:
        with self._ids_lock:
            key_id = self._ids.get(slot)
        entry = self.cache.get(key_id) if key_id is not None else None
        if entry is None or entry.version < (floor or 0):
            return None
        self._count("cache_hits")
        return key_id, entry

    def forget_below(self, version: int) -> int:
        """Drop every key (zeroed) and id read under a version below ``version`` (after a retirement); return
        how many keys."""
        with self._ids_lock:
            for slot in [s for s in self._ids if s[2] < version]:
                del self._ids[slot]
        return self.cache.evict_below(version)

    def row(self, key_id: bytes) -> sa.Row | None:
        """The data key's row (wrapped key, version, created_under, key class, table, partition), or None."""
        with self.db.connect() as conn:
            return conn.execute(sa.select(data_keys.c.wrapped, data_keys.c.version, data_keys.c.created_under,
                                          data_keys.c.key_class, data_keys.c.table_name, data_keys.c.partition)
                                .where(data_keys.c.key_id == key_id)).first()

    def key(self, key_id: bytes, where: str, floor: int | None = None) -> CachedKey:
        """The data key ``key_id``: from the cache, else its row and one KMS unwrap.

        :param floor: if given, refuse (:class:`RetiredDataKey`) a key whose row is wrapped under a version below
            it, or that the KMS no longer unwraps because it retired that version first.
        :raises EnvelopeError: the key is not in the table for this key class.
        """
        entry = self._hit(key_id, floor)
        if entry is not None:
            return entry
        with self._flight(key_id):
            entry = self._hit(key_id, floor)
            if entry is not None:
                return entry
            if self.cache.get(key_id) is not None:  # read under a version now retired: it may be re-wrapped since
                self.cache.evict(key_id)
            self._count("cache_misses")
            row = self.row(key_id)
            if row is None or row.key_class != self.key_class:
                raise EnvelopeError(f"{where}: data key {uuid.UUID(bytes=key_id)} is not in {DATA_KEYS} for key "
                                    f"class {self.key_class} (unknown key version)")
            if floor is not None and row.version < floor:
                raise RetiredDataKey(where, key_id, row, floor, "the ledger marks it retired")
            try:
                key = self.backend.unwrap(row.wrapped)
            except (KmsUnreachable, PermissionDenied):
                raise
            except BackendError:
                if floor is not None:  # the KMS may have retired the version before the ledger said so
                    kms_floor = self.backend.key_state().min_decryption_version
                    if row.version < kms_floor:
                        raise RetiredDataKey(where, key_id, row, kms_floor,
                                             "the KMS has retired it (min_decryption_version)") from None
                raise
            entry = self.cache.put(key_id, key, int(row.version))
            del key
            return entry

    def _hit(self, key_id: bytes, floor: int | None) -> CachedKey | None:
        entry = self.cache.get(key_id)
        if entry is None or entry.version < (floor or 0):
            return None
        self._count("cache_hits")
        return entry

    def rows_of(self, key_ids: set[bytes] | list[bytes]) -> dict[bytes, sa.Row]:
        """The rows of those of ``key_ids`` that are data keys of this key class, by key id (one indexed
        lookup of the primary key each)."""
        if not key_ids:
            return {}
        with self.db.connect() as conn:
            return {bytes(r.key_id): r for r in conn.execute(sa.select(data_keys).where(
                data_keys.c.key_id.in_(list(key_ids)), data_keys.c.key_class == self.key_class))}

    def keys_of(self, table: str, partition: str) -> list[sa.Row]:
        with self.db.connect() as conn:
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
        with self.db.begin() as conn:
            for row, wrapped in zip(rows, new, strict=True):
                changed += conn.execute(data_keys.update().where(
                    data_keys.c.key_id == row.key_id, data_keys.c.wrapped == row.wrapped,
                ).values(wrapped=wrapped, version=self.backend.version_of(wrapped))).rowcount
        return changed
