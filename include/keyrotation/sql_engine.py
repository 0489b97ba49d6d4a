"""Re-encryption of encrypted columns in a PostgreSQL table, partition by partition.

Values are field-level envelopes (:mod:`keyrotation.formats.envelope`) under per-partition data keys
kept in ``keyrotation_data_keys`` (:mod:`keyrotation.stores.data_keys`). Partitions are the dates of
the dataset's partition column.

* ``rewrap``: re-wrap the partition's data keys under the new KEK version. The table is not touched:
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
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import sqlalchemy as sa
from psycopg2.extras import execute_values

from keyrotation import ledger as lg
from keyrotation.backends.base import KmsBackend
from keyrotation.census import Census, PartitionCensus
from keyrotation.config import Dataset
from keyrotation.engine import PartitionEngine, PartitionResult
from keyrotation.errors import KeyRotationError, PartitionError
from keyrotation.formats.envelope import EnvelopeError, key_id_offset, open_sealed, parse_header, seal
from keyrotation.ledger import Ledger, RunContext
from keyrotation.locks import PartitionLeases
from keyrotation.stores.data_keys import DATA_KEYS, DataKeyStore, FieldCipher

log = logging.getLogger(__name__)
CAS_RETRIES = 3
BAD_ROWS_SHOWN = 5


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SqlTableEngine(PartitionEngine):
    """Census, re-encryption and validation of one ``sql_table`` dataset of one key class."""

    def __init__(self, key_class: str, dataset: Dataset, engine: sa.Engine, backend: KmsBackend, ledger: Ledger,
                 ctx: RunContext | None = None) -> None:
        if engine.dialect.name != "postgresql":
            raise PartitionError("*", f"dataset {dataset.name}: sql_table needs PostgreSQL, not {engine.dialect.name}")
        self.key_class = key_class
        self.dataset = dataset.name
        self.table = dataset.table or ""
        self.pk = dataset.primary_key
        self.partition_column = dataset.partition_column or ""
        self.columns = list(dataset.encrypted_columns)
        self.batch_size = dataset.batch_size
        self.engine = engine
        self.backend = backend
        self.ledger = ledger
        self.ctx = ctx or RunContext()
        self.keys = DataKeyStore(engine, backend, key_class)
        self.leases = PartitionLeases(ledger)
        self.store = self  # the partition listing, as engines of the other formats offer it
        self._check_table()

    def cipher(self, current_version: Callable[[], int]) -> FieldCipher:
        """The application read/write path over the same data keys."""
        return FieldCipher(self.keys, current_version)

    # -- layout -------------------------------------------------------------------------------
    def _check_table(self) -> None:
        inspector = sa.inspect(self.engine)
        if not inspector.has_table(self.table):
            raise PartitionError("*", f"dataset {self.dataset}: table {self.table!r} does not exist")
        present = {c["name"] for c in inspector.get_columns(self.table)}
        missing = [c for c in [self.pk, self.partition_column, *self.columns] if c not in present]
        if missing:
            raise PartitionError("*", f"dataset {self.dataset}: table {self.table!r} has no column(s) "
                                      f"{', '.join(missing)}")

    def _where_partition(self) -> str:
        return f"CAST({_ident(self.partition_column)} AS date) = CAST(:partition AS date)"

    def list_partitions(self) -> list[str]:
        sql = (f"SELECT DISTINCT CAST(CAST({_ident(self.partition_column)} AS date) AS text) FROM "
               f"{_ident(self.table)} ORDER BY 1")
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.text(sql))]

    # -- census -------------------------------------------------------------------------------
    def partition_census(self, partition: str, strict: bool = True) -> PartitionCensus:
        """Versions of the data keys the partition's values name; values under an unknown data key make
        it an error (``strict``), or are left out for the engine to name row by row."""
        offset = key_id_offset(self.key_class)
        values = " UNION ALL ".join(
            f"SELECT substring({_ident(c)} FROM {offset} FOR 16) AS kid FROM {_ident(self.table)} "
            f"WHERE {self._where_partition()} AND {_ident(c)} IS NOT NULL" for c in self.columns)
        sql = (f"SELECT dk.version, dk.created_under, count(*) AS n, count(DISTINCT v.kid) AS keys "
               f"FROM ({values}) v LEFT JOIN {DATA_KEYS} dk ON dk.key_id = v.kid "
               f"AND dk.key_class = :key_class GROUP BY 1, 2")
        rows_sql = f"SELECT count(*) FROM {_ident(self.table)} WHERE {self._where_partition()}"
        with self.engine.connect() as conn:
            groups = list(conn.execute(sa.text(sql), {"partition": partition, "key_class": self.key_class}))
            rows = conn.execute(sa.text(rows_sql), {"partition": partition}).scalar()
        if not rows:
            raise PartitionError(partition, f"table {self.table} has no rows in this partition")
        unknown = sum(g.n for g in groups if g.version is None)
        if unknown and strict:
            raise PartitionError(partition, f"{unknown} values in {self.table} are under data keys not in "
                                            f"{DATA_KEYS} for key class {self.key_class} (unknown key version, or "
                                            "not encrypted by keyrotation)")
        known = [g for g in groups if g.version is not None]
        if not known:
            raise PartitionError(partition, f"no encrypted values in {self.table}")
        return PartitionCensus(partition, frozenset(int(g.version) for g in known),
                               min(int(g.created_under) for g in known), rows=int(rows), bytes=None,
                               files=sum(int(g.keys) for g in known))

    def census(self, partitions: list[str] | None = None) -> Census:
        census = Census(self.dataset)
        for partition in partitions if partitions is not None else self.list_partitions():
            try:
                census.partitions[partition] = self.partition_census(partition)
            except (KeyRotationError, sa.exc.SQLAlchemyError) as exc:
                census.errors[partition] = str(exc)
        return census

    # -- reading and writing ------------------------------------------------------------------
    def _batches(self, partition: str) -> Any:
        """The partition's rows in primary-key order, ``batch_size`` at a time (keyset pagination)."""
        cols = ", ".join(_ident(c) for c in [self.pk, *self.columns])
        last = None
        while True:
            after = f" AND {_ident(self.pk)} > :last" if last is not None else ""
            sql = (f"SELECT {cols} FROM {_ident(self.table)} WHERE {self._where_partition()}{after} "
                   f"ORDER BY {_ident(self.pk)} LIMIT :limit")
            with self.engine.connect() as conn:
                frame = pd.DataFrame(conn.execute(sa.text(sql), {"partition": partition, "last": last,
                                                                 "limit": self.batch_size}).fetchall(),
                                     columns=[self.pk, *self.columns])
            if frame.empty:
                return
            yield frame
            last = frame[self.pk].iloc[-1].item() if hasattr(frame[self.pk].iloc[-1], "item") else \
                frame[self.pk].iloc[-1]

    def _decrypt(self, value: Any, column: str, pk: Any) -> bytes:
        where = f"{self.table}.{column} row {self.pk}={pk}"
        raw = bytes(value)
        header = parse_header(raw, where)
        if header.key_class != self.key_class:
            raise EnvelopeError(f"{where}: value belongs to key class {header.key_class!r}, not {self.key_class!r}")
        return open_sealed(raw, self.keys.key(header.key_id, where).aead, header, self.table, column, pk, where)

    def write_partition(self, partition: str, frame: pd.DataFrame, version: int) -> PartitionResult:
        """Insert ``frame`` (plaintext in the encrypted columns) into the table, encrypted under ``version``:
        how an application (or a migration) writes; used by the demo and the tests."""
        start = time.monotonic()
        key_id, key = self.keys.current(self.table, partition, version)
        out = frame.copy()
        for column in self.columns:
            out[column] = [None if v is None else seal(str(v).encode(), key.aead, key_id, self.key_class,
                                                       self.table, column, pk)
                           for v, pk in zip(frame[column], frame[self.pk], strict=True)]
        columns = list(out.columns)
        sql = f"INSERT INTO {_ident(self.table)} ({', '.join(_ident(c) for c in columns)}) VALUES %s"
        raw = self.engine.raw_connection()
        try:
            with raw.cursor() as cur:
                execute_values(cur, sql, out.itertuples(index=False, name=None), page_size=2000)
            raw.commit()
        finally:
            raw.close()
        result = PartitionResult(partition, "written", None, version, len(out), None, None, time.monotonic() - start)
        self._record(lg.PARTITION_WRITTEN, result, detail={"table": self.table})
        return result

    # -- operations ---------------------------------------------------------------------------
    def process(self, partition: str, target_version: int, mode: str) -> PartitionResult:
        if mode not in ("rewrap", "reencrypt"):
            raise PartitionError(partition, f"unknown re-encryption mode {mode!r} (use rewrap or reencrypt)")
        with self.leases.hold(self.dataset, partition):
            start = time.monotonic()
            before = self.partition_census(partition, strict=mode == "rewrap")
            if mode == "rewrap":
                return self._rewrap(partition, target_version, before, start)
            return self._reencrypt(partition, target_version, before, start)

    def _rewrap(self, partition: str, target: int, before: PartitionCensus, start: float) -> PartitionResult:
        stale = [r for r in self.keys.keys_of(self.table, partition) if r.version < target]
        if not stale:
            return self._reconcile(partition, before, start)
        changed = self.keys.rewrap(stale, target)
        after = self.partition_census(partition)
        if min(after.versions) < target:
            raise PartitionError(partition, f"after the rewrap data keys are under {sorted(after.versions)}, "
                                            f"expected v{target} or newer")
        result = PartitionResult(partition, "rewrapped", before.oldest, target, before.rows, None, None,
                                 time.monotonic() - start)
        self._record(lg.PARTITION_REWRAPPED, result, detail={"mode": "rewrap", "data_keys": changed,
                                                             "table": self.table})
        return result

    def _reencrypt(self, partition: str, target: int, before: PartitionCensus, start: float) -> PartitionResult:
        if before.oldest >= target and (before.written_under or 0) >= target:
            return self._reconcile(partition, before, start)
        key_id, key = self.keys.current(self.table, partition, target)
        done = skipped = conflicts = 0
        bad: dict[Any, str] = {}
        total = before.rows or 0
        for frame in self._batches(partition):
            pending = frame
            for attempt in range(CAS_RETRIES + 1):
                updates = self._transform(pending, key_id, key, bad)
                skipped += len(pending) - len(updates) - sum(1 for pk in pending[self.pk] if pk in bad)
                if not updates:
                    break
                lost = self._compare_and_set(updates)
                done += len(updates) - len(lost)
                if not lost or attempt == CAS_RETRIES:
                    conflicts += len(lost)
                    break
                pending = self._reread(lost)  # a concurrent writer won: read its value and try again
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
                                                               "table": self.table})
        return result

    def _transform(self, frame: pd.DataFrame, key_id: bytes, key: bytes, bad: dict) -> list[tuple]:
        """(pk, old values..., new values...) for every row with a value not under the new data key."""
        updates = []
        for row in frame.itertuples(index=False, name=None):
            pk, values = row[0], row[1:]
            olds, news, change = [], [], False
            try:
                for column, value in zip(self.columns, values, strict=True):
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
                    news.append(seal(plaintext, key.aead, key_id, self.key_class, self.table, column, pk))
                    change = True
            except EnvelopeError as exc:
                bad[pk] = str(exc)
                continue
            if change:
                updates.append((pk, *olds, *news))
        return updates

    def _compare_and_set(self, updates: list[tuple]) -> list[Any]:
        """Apply the updates in one transaction; return the primary keys whose value had changed meanwhile."""
        n = len(self.columns)
        olds = [f"o{i}" for i in range(n)]
        news = [f"n{i}" for i in range(n)]
        sets = ", ".join(f"{_ident(c)} = v.{news[i]}" for i, c in enumerate(self.columns))
        same = " AND ".join(f"t.{_ident(c)} IS NOT DISTINCT FROM v.{olds[i]}" for i, c in enumerate(self.columns))
        sql = (f"UPDATE {_ident(self.table)} AS t SET {sets} FROM (VALUES %s) AS v(pk, {', '.join(olds + news)}) "
               f"WHERE t.{_ident(self.pk)} = v.pk AND {same} RETURNING t.{_ident(self.pk)}")
        template = "(" + ", ".join(["%s"] + ["%s::bytea"] * (2 * n)) + ")"
        raw = self.engine.raw_connection()
        try:
            with raw.cursor() as cur:
                applied = {r[0] for r in execute_values(cur, sql, updates, template=template, page_size=len(updates),
                                                        fetch=True)}
            raw.commit()
        except Exception:
            raw.rollback()
            raise
        finally:
            raw.close()
        return [u[0] for u in updates if u[0] not in applied]

    def _reread(self, pks: list[Any]) -> pd.DataFrame:
        cols = ", ".join(_ident(c) for c in [self.pk, *self.columns])
        sql = sa.text(f"SELECT {cols} FROM {_ident(self.table)} WHERE {_ident(self.pk)} IN :pks "
                      f"ORDER BY {_ident(self.pk)}").bindparams(sa.bindparam("pks", expanding=True))
        with self.engine.connect() as conn:
            return pd.DataFrame(conn.execute(sql, {"pks": list(pks)}).fetchall(), columns=[self.pk, *self.columns])

    def _reconcile(self, partition: str, census: PartitionCensus, start: float) -> PartitionResult:
        result = PartitionResult(partition, "up_to_date", census.oldest, census.oldest, census.rows, None, None,
                                 time.monotonic() - start)
        last = self.ledger.partition_record(self.dataset, partition)
        if last is None or last["to_version"] != census.oldest:
            result.action = "reconciled"
            self._record(lg.PARTITION_RECONCILED, result, detail={"table": self.table})
        return result

    def validate(self, partition: str, min_version: int | None = None) -> PartitionResult:
        """Decrypt every value of the partition (each bound to its row and column) and check the versions.

        The digest of the plaintext is recorded, not compared: applications keep writing to a live table.
        """
        with self.leases.hold(self.dataset, partition):
            start = time.monotonic()
            census = self.partition_census(partition)
            digest, rows, bad = hashlib.sha256(), 0, []
            for frame in self._batches(partition):
                for row in frame.itertuples(index=False, name=None):
                    rows += 1
                    digest.update(repr(row[0]).encode())
                    for column, value in zip(self.columns, row[1:], strict=True):
                        if value is None:
                            continue
                        try:
                            digest.update(self._decrypt(value, column, row[0]))
                        except EnvelopeError as exc:
                            bad.append(str(exc))
            result = PartitionResult(partition, "validated", census.oldest, max(census.versions), rows, None,
                                     digest.hexdigest(), time.monotonic() - start)
            problem = None
            if bad:
                problem = f"{len(bad)} values do not decrypt: " + "; ".join(bad[:BAD_ROWS_SHOWN])
            elif min_version is not None and census.oldest < min_version:
                problem = f"still has data keys under v{census.oldest}, expected v{min_version} or newer"
            return self._finish_validation(result, problem)
