"""Re-encryption of encrypted columns in a PostgreSQL table, partition by partition.

Values are field-level envelopes (:mod:`keyrotation.formats.envelope`) under per-partition data keys
kept in ``keyrotation_data_keys`` (:mod:`keyrotation.stores.data_keys`). Partitions are the dates of
the dataset's partition column; the table is read and written through
:class:`keyrotation.stores.sql_table.SqlTableStore`.

* ``rewrap``: re-wrap the partition's data keys under the new KEK version. It reads the data-key table
  only (the partition's data keys and their versions, before and after), and the table is not touched:
  O(data keys), not O(rows).
* ``reencrypt``: a new data key under the new version; values rewritten batch by batch (keyset
  pagination over the primary key, pandas for the transform, one transaction per batch). Each row is
  updated only if it still holds the ciphertext that was read (compare-and-set), so a concurrent
  application write is never overwritten: the row is read again and re-encrypted, or left for the
  next pass. Values already under the new data key are skipped, so a re-run after a crash continues
  where it stopped and loses nothing.

A value that does not decrypt (altered, copied from another row or column, under an unknown data key)
is named with its row and left as it is; the other rows and partitions go on, and the partition is
reported as failed.

What proves that no value hides under a data key the engine does not know:

* the census (:meth:`SqlTableEngine.partition_census`, which the planner and the retirement gate read)
  takes the distinct data key ids of the partition's values from the key-id indexes
  (:meth:`SqlTableStore.key_ids`: one index probe per data key, not a scan of the rows) and joins them
  with the data-key table: a value under an id not in it for this key class makes the partition
  blocking, so the gate refuses to retire. Without the index (not creatable here) the census scans every
  value, as before: slower, the same proof;
* validation decrypts every value anyway and checks each value's data key against the partition's own
  (same key class, table and partition) and the census's versions; it records the versions the values
  themselves name, which the gate requires after the partition's last change (:mod:`keyrotation.proof`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import pandas as pd
import sqlalchemy as sa

from keyrotation import ledger as lg
from keyrotation.backends.base import KmsBackend
from keyrotation.census import PartitionCensus
from keyrotation.errors import KeyRotationError, PartitionError
from keyrotation.formats.envelope import EnvelopeError, open_sealed, parse_header, seal
from keyrotation.ledger import Ledger, RunContext
from keyrotation.partition_engine import PartitionEngine, PartitionResult
from keyrotation.stores.data_keys import DATA_KEYS, DataKeyStore
from keyrotation.stores.sql_table import SqlTableStore

log = logging.getLogger(__name__)
CAS_RETRIES = 3
BAD_ROWS_SHOWN = 5


class SqlTableEngine(PartitionEngine):
    """Census, re-encryption and validation of one ``sql_table`` dataset of one key class."""

    census_errors = (KeyRotationError, sa.exc.SQLAlchemyError)
    holders = "data keys"

    def __init__(self, key_class: str, dataset: str, store: SqlTableStore, backend: KmsBackend, ledger: Ledger,
                 ctx: RunContext | None = None) -> None:
        self.key_class = key_class
        self.dataset = dataset
        self.store = store
        self.backend = backend
        self.ledger = ledger
        self.ctx = ctx or RunContext()
        self.keys = DataKeyStore(store.db, backend, key_class)
        self._index_tried = False
        self._kms_floor: int | None = None

    # -- census -------------------------------------------------------------------------------
    def list_partitions(self) -> list[str]:
        return self.store.list_partitions()

    def partition_census(self, partition: str, strict: bool = True) -> PartitionCensus:
        """Versions of the data keys the partition's values name; values under an unknown data key make
        it an error (``strict``), or are left out for the engine to name row by row.

        The data key ids come from the key-id indexes (O(data keys)) where they are valid, else from a scan
        of every value; either way every value is accounted for. The row count is a ``count(*)``."""
        if self._index_problem() is not None:
            return self._scanned_census(partition, strict)
        rows = self.store.row_count(partition)
        if not rows:
            raise PartitionError(partition, f"table {self.store.table} has no rows in this partition")
        named = self.store.key_ids(partition, self.key_class)
        known = self.keys.rows_of(named)
        unknown = named - known.keys()
        if unknown and strict:
            n = self.store.values_under(partition, self.key_class, unknown)
            raise PartitionError(partition, self._unknown_message(n))
        if not known:
            raise PartitionError(partition, f"no encrypted values in {self.store.table}")
        return PartitionCensus(partition, frozenset(int(r.version) for r in known.values()),
                               min(int(r.created_under) for r in known.values()), rows=rows, bytes=None,
                               units=len(known))

    def _index_problem(self) -> str | None:
        """Why the census cannot read data key ids from the key-id indexes (None: it can); they are created
        once per engine if missing, and checked again at every census (an index dropped meanwhile)."""
        problem = self.store.ensure_key_id_indexes(
            self.key_class, create=self.store.create_indexes and not self._index_tried)
        self._index_tried = True
        return problem

    def _unknown_message(self, n: int) -> str:
        return (f"{n} values in {self.store.table} are under data keys not in {DATA_KEYS} for key class "
                f"{self.key_class} (unknown key version, or not encrypted by keyrotation)")

    def _scanned_census(self, partition: str, strict: bool) -> PartitionCensus:
        """The census from a scan of every value's data key id (no key-id index)."""
        groups, rows = self.store.key_versions(partition, self.key_class)
        if not rows:
            raise PartitionError(partition, f"table {self.store.table} has no rows in this partition")
        unknown = sum(g.n for g in groups if g.version is None)
        if unknown and strict:
            raise PartitionError(partition, self._unknown_message(unknown))
        known = [g for g in groups if g.version is not None]
        if not known:
            raise PartitionError(partition, f"no encrypted values in {self.store.table}")
        return PartitionCensus(partition, frozenset(int(g.version) for g in known),
                               min(int(g.created_under) for g in known), rows=rows, bytes=None,
                               units=sum(int(g.keys) for g in known))

    def data_key_census(self, partition: str, floor: int = 0) -> tuple[PartitionCensus, list[sa.Row], list[sa.Row]]:
        """The partition's own data keys (every one in the data-key table, used by a value or not) and the
        census they make: what a rewrap reads, O(data keys). It says nothing of the values (rows None): which
        keys they name is the census's and validation's to prove. Keys wrapped under a version below ``floor``
        (retired: the KMS no longer unwraps them) are returned apart and left out of the census."""
        keys = self.keys.keys_of(self.store.table, partition)
        live = [r for r in keys if r.version >= floor]
        retired = [r for r in keys if r.version < floor]
        if not live:
            raise PartitionError(partition, f"no data keys in {DATA_KEYS} for table {self.store.table} and key class "
                                            f"{self.key_class} under a live version: nothing to re-wrap (its values "
                                            "are under no data key of this partition)")
        return PartitionCensus(partition, frozenset(int(r.version) for r in live),
                               min(int(r.created_under) for r in live), rows=None, bytes=None,
                               units=len(live)), live, retired

    def _retired_floor(self) -> int:
        """The KMS's lowest decryptable version, read once per engine (a task)."""
        if self._kms_floor is None:
            self._kms_floor = self.backend.key_state().min_decryption_version
        return self._kms_floor

    # -- reading and writing ------------------------------------------------------------------
    def _decrypt(self, value: Any, column: str, pk: Any) -> bytes:
        where = f"{self.store.table}.{column} row {self.store.pk}={pk}"
        raw = bytes(value)
        header = parse_header(raw, where)
        if header.key_class != self.key_class:
            raise EnvelopeError(f"{where}: value belongs to key class {header.key_class!r}, not {self.key_class!r}")
        return open_sealed(raw, self.keys.key(header.key_id, where).aead, header, self.store.table, column, pk, where)

    def write_partition(self, partition: str, frame: pd.DataFrame, version: int) -> PartitionResult:
        """Insert ``frame`` (plaintext in the encrypted columns) into the table, encrypted under ``version``:
        how an application (or a migration) writes; used by the demo and the tests."""
        start = time.monotonic()
        key_id, key = self.keys.current(self.store.table, partition, version)
        out = frame.copy()
        for column in self.store.columns:
            out[column] = [None if v is None else seal(str(v).encode(), key.aead, key_id, self.key_class,
                                                       self.store.table, column, pk)
                           for v, pk in zip(frame[column], frame[self.store.pk], strict=True)]
        self.store.insert(list(out.columns), out.itertuples(index=False, name=None))
        result = PartitionResult(partition, "written", None, version, len(out), None, None, time.monotonic() - start)
        self._record(lg.PARTITION_WRITTEN, result, detail={"table": self.store.table})
        return result

    # -- operations ---------------------------------------------------------------------------
    def _process(self, partition: str, target_version: int, mode: str) -> PartitionResult:
        start = time.monotonic()
        if mode == "rewrap":
            return self._rewrap(partition, target_version, start)
        return self._reencrypt(partition, target_version, self.partition_census(partition, strict=False), start)

    def _rewrap(self, partition: str, target: int, start: float) -> PartitionResult:
        """Re-wrap the partition's data keys older than ``target``: the data-key table only, before and after.
        Whether a value hides under a key outside it is the census's and validation's to prove (the retirement
        gate asks both), not this step's: re-wrapping the keys it has is right either way.

        Data keys under a retired version (a reencrypt replaced them, then the retirement raised the KMS's
        floor) cannot be re-wrapped, and need not be when no value names them: they are left in place, said in
        the log and the ledger. If a value does name one, the partition is refused: its data no longer decrypts.
        """
        floor = self._retired_floor()
        before, keys, retired = self.data_key_census(partition, floor)
        if retired:
            named = self.store.values_under(partition, self.key_class, {bytes(r.key_id) for r in retired})
            if named:
                raise PartitionError(partition, f"{named} values are under data keys wrapped under retired "
                                                f"versions (below v{floor}, which the KMS no longer unwraps); "
                                                "nothing re-wrapped")
            log.info("%s partition %s: %d data keys under retired versions (below v%s) are named by no value: "
                     "left in place, not re-wrapped", self.dataset, partition, len(retired), floor)
        stale = [r for r in keys if r.version < target]
        if not stale:
            return self._up_to_date(before, start)
        changed = self.keys.rewrap(stale, target)
        after, _, _ = self.data_key_census(partition, floor)
        if min(after.versions) < target:
            raise PartitionError(partition, f"after the rewrap data keys are under {sorted(after.versions)}, "
                                            f"expected v{target} or newer")
        result = PartitionResult(partition, "rewrapped", before.oldest, target, None, None, None,
                                 time.monotonic() - start)
        detail = {"mode": "rewrap", "data_keys": changed, "table": self.store.table}
        if retired:
            detail["retired_data_keys_left"] = len(retired)
        self._record(lg.PARTITION_REWRAPPED, result, detail=detail)
        return result

    def _reencrypt(self, partition: str, target: int, before: PartitionCensus, start: float) -> PartitionResult:
        if before.oldest >= target and (before.written_under or 0) >= target:
            return self._up_to_date(before, start)
        key_id, key = self.keys.current(self.store.table, partition, target)
        done = skipped = conflicts = 0
        bad: dict[Any, str] = {}
        total = before.rows or 0
        for frame in self.store.batches(partition):
            pending = frame
            for attempt in range(CAS_RETRIES + 1):
                updates = self._transform(pending, key_id, key, bad)
                skipped += len(pending) - len(updates) - sum(1 for pk in pending[self.store.pk] if pk in bad)
                if not updates:
                    break
                lost = self.store.compare_and_set(updates)
                done += len(updates) - len(lost)
                if not lost or attempt == CAS_RETRIES:
                    conflicts += len(lost)
                    break
                pending = self.store.reread(lost)  # a concurrent writer won: read its value and try again
            elapsed = time.monotonic() - start
            seen = done + skipped + len(bad)
            rate = seen / elapsed if elapsed else 0.0
            log.info("%s partition %s: %d/%d rows (%d re-encrypted), %.0f rows/s, eta %.1fs", self.dataset,
                     partition, seen, total, done, rate, (total - seen) / rate if rate else 0.0)
        if bad:
            shown = "; ".join(list(bad.values())[:BAD_ROWS_SHOWN])
            raise PartitionError(partition, f"{len(bad)} values do not decrypt and were left as they are "
                                            f"({done} other rows re-encrypted): {shown}")
        after = self.partition_census(partition)
        if conflicts or min(after.versions) < target:
            why = []
            if conflicts:
                why.append(f"{conflicts} rows kept changing under concurrent writes")
            if min(after.versions) < target:
                why.append(f"rows under v{', v'.join(str(v) for v in sorted(after.versions) if v < target)} were "
                           f"written after this pass read them (an application still encrypting with an older "
                           f"version)")
            raise PartitionError(partition, f"{'; '.join(why)}; left for the next pass (every row still decrypts)")
        result = PartitionResult(partition, "reencrypted", before.oldest, target, after.rows, None, None,
                                 time.monotonic() - start)
        self._record(lg.PARTITION_REENCRYPTED, result, detail={"mode": "reencrypt", "rows_rewritten": done,
                                                               "table": self.store.table})
        return result

    def _transform(self, frame: pd.DataFrame, key_id: bytes, key: bytes, bad: dict) -> list[tuple]:
        """(pk, old values..., new values...) for every row with a value not under the new data key."""
        updates = []
        for row in frame.itertuples(index=False, name=None):
            pk, values = row[0], row[1:]
            olds, news, change = [], [], False
            try:
                for column, value in zip(self.store.columns, values, strict=True):
                    if value is None:
                        olds.append(None)
                        news.append(None)
                        continue
                    raw = bytes(value)
                    olds.append(raw)
                    if parse_header(raw, "").key_id == key_id:
                        news.append(raw)
                        continue
                    plaintext = self._decrypt(raw, column, pk)
                    news.append(seal(plaintext, key.aead, key_id, self.key_class, self.store.table, column, pk))
                    change = True
            except EnvelopeError as exc:
                bad[pk] = str(exc)
                continue
            if change:
                updates.append((pk, *olds, *news))
        return updates

    def _up_to_date(self, census: PartitionCensus, start: float) -> PartitionResult:
        # No digest to compare: applications keep writing to a live table.
        return self._reconcile(PartitionResult(census.partition, "up_to_date", census.oldest, census.oldest,
                                               census.rows, None, None, time.monotonic() - start),
                               {"table": self.store.table}, compare_digest=False)

    def _validate(self, partition: str, min_version: int | None) -> PartitionResult:
        """Decrypt every value of the partition (each bound to its row and column) and check its data key: one
        of this partition's (key class, table, partition), under a version no older than the census says and
        ``min_version``. The versions recorded are those the values themselves name: the per-value proof the
        retirement gate requires after the partition's last change.

        The digest of the plaintext is recorded, not compared: applications keep writing to a live table.
        """
        start = time.monotonic()
        census = self.partition_census(partition)
        own = {bytes(r.key_id): r for r in self.keys.keys_of(self.store.table, partition)}
        named: dict[bytes, int] = {}  # data key id -> values naming it
        digest, rows, bad = hashlib.sha256(), 0, []
        for frame in self.store.batches(partition):
            for row in frame.itertuples(index=False, name=None):
                rows += 1
                digest.update(repr(row[0]).encode())
                for column, value in zip(self.store.columns, row[1:], strict=True):
                    if value is None:
                        continue
                    try:
                        digest.update(self._decrypt(value, column, row[0]))
                    except EnvelopeError as exc:
                        bad.append(str(exc))
                        continue
                    key_id = parse_header(bytes(value), "").key_id
                    named[key_id] = named.get(key_id, 0) + 1
        if named.keys() - own.keys():  # a data key made while this ran (an application writing)
            own.update({bytes(r.key_id): r for r in self.keys.keys_of(self.store.table, partition)})
        foreign = self._foreign(partition, {k: n for k, n in named.items() if k not in own})
        versions = frozenset(int(own[k].version) for k in named if k in own) or census.versions
        proven = PartitionCensus(partition, versions, census.written_under, rows=rows)
        result = PartitionResult(partition, "validated", proven.oldest, max(proven.versions), rows, None,
                                 digest.hexdigest(), time.monotonic() - start)
        undecryptable = f"{len(bad)} values do not decrypt: " + "; ".join(bad[:BAD_ROWS_SHOWN]) if bad else None
        older = None
        if proven.oldest < census.oldest:
            older = (f"values are under data keys wrapped by v{proven.oldest}, older than the census says "
                     f"(v{census.oldest}): the census does not account for every value")
        return self._finish_validation(result, None, undecryptable, foreign, older, self._below(proven, min_version))

    def _foreign(self, partition: str, named: dict[bytes, int]) -> str | None:
        """The finding for values that decrypt under data keys of another table or partition (of this key
        class): a rewrap of this partition would not re-wrap them."""
        if not named:
            return None
        rows = self.keys.rows_of(set(named))
        where = sorted({f"{r.table_name} partition {r.partition}" for r in rows.values()})
        return (f"{sum(named.values())} values are under data keys of another table or partition, not of "
                f"{self.store.table} partition {partition}: " + "; ".join(where[:BAD_ROWS_SHOWN]))
