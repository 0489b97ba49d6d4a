"""The rows of one ``sql_table`` dataset in PostgreSQL: every SQL statement the SQL engine runs.

Partitions are the dates of the dataset's partition column; rows are read in primary-key order a
batch at a time (keyset pagination) and written back with a compare-and-set ``UPDATE``, one
transaction per batch.

Which data keys a partition's values name is answered from a *key-id index* per encrypted column: an
expression index on ``(the partition day, the value's data key id bytes)`` (partial: ``IS NOT NULL``),
which the engine creates (``CREATE INDEX CONCURRENTLY``) when it is missing and the database allows it.
With it, :meth:`SqlTableStore.key_ids` reads the distinct data key ids of a partition by a skip scan
(one index probe per distinct id: O(data keys x log rows), not O(rows)); without it (no privilege, a
``timestamptz`` partition column, an invalid index) :meth:`SqlTableStore.key_versions` scans every value,
as before. Both are exact: every value of the partition is accounted for, none is sampled.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import pandas as pd
import sqlalchemy as sa
from psycopg2.extras import execute_values

from keyrotation.config import Dataset
from keyrotation.errors import PartitionError
from keyrotation.formats.envelope import key_id_offset
from keyrotation.stores.data_keys import DATA_KEYS

log = logging.getLogger(__name__)
#: How long creating a key-id index may wait for a lock (or for older transactions) before giving up.
INDEX_LOCK_TIMEOUT = "5s"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SqlTableStore:
    """One ``sql_table`` dataset's table: its partitions, the data keys its values name, its rows."""

    def __init__(self, db: sa.Engine, dataset: Dataset) -> None:
        if db.dialect.name != "postgresql":
            raise PartitionError("*", f"dataset {dataset.name}: sql_table needs PostgreSQL, not {db.dialect.name}")
        self.db = db
        self.table = dataset.table or ""
        self.pk = dataset.primary_key
        self.partition_column = dataset.partition_column or ""
        self.columns = list(dataset.encrypted_columns)
        self.batch_size = dataset.batch_size
        #: Whether the engine may create a missing key-id index (the dataset's ``create_key_id_index``).
        self.create_indexes = dataset.create_key_id_index
        self._index_advice_logged = False
        self._check_table(dataset.name)

    def _check_table(self, dataset: str) -> None:
        inspector = sa.inspect(self.db)
        if not inspector.has_table(self.table):
            raise PartitionError("*", f"dataset {dataset}: table {self.table!r} does not exist")
        present = {c["name"] for c in inspector.get_columns(self.table)}
        missing = [c for c in [self.pk, self.partition_column, *self.columns] if c not in present]
        if missing:
            raise PartitionError("*", f"dataset {dataset}: table {self.table!r} has no column(s) "
                                      f"{', '.join(missing)}")

    def _where_partition(self) -> str:
        return f"CAST({_ident(self.partition_column)} AS date) = CAST(:partition AS date)"

    def list_partitions(self) -> list[str]:
        sql = (f"SELECT DISTINCT CAST(CAST({_ident(self.partition_column)} AS date) AS text) FROM "
               f"{_ident(self.table)} ORDER BY 1")
        with self.db.connect() as conn:
            return [r[0] for r in conn.execute(sa.text(sql))]

    # -- the key-id index ---------------------------------------------------------------------
    def _key_id(self, column: str, key_class: str) -> str:
        """The data key id bytes of ``column``'s values (the expression the key-id index holds)."""
        return f"substring({_ident(column)} FROM {key_id_offset(key_class)} FOR 16)"

    def _day(self) -> str:
        return f"CAST({_ident(self.partition_column)} AS date)"

    def key_id_index(self, column: str, key_class: str) -> str:
        """The name of ``column``'s key-id index for ``key_class`` (its definition hashed into the name)."""
        definition = f"{self.table}|{self.partition_column}|{column}|{key_id_offset(key_class)}"
        return "keyrotation_kid_" + hashlib.sha256(definition.encode()).hexdigest()[:24]

    def key_id_index_ddl(self, column: str, key_class: str) -> str:
        """The statement that creates ``column``'s key-id index (the engine runs it, or a DBA where
        ``create_key_id_index`` is false)."""
        return (f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {_ident(self.key_id_index(column, key_class))} ON "
                f"{_ident(self.table)} ({self._day()}, {self._key_id(column, key_class)}) "
                f"WHERE {_ident(column)} IS NOT NULL")

    def _index_states(self, names: list[str]) -> dict[str, bool]:
        """name -> valid (usable by the planner), for those of ``names`` that exist."""
        sql = ("SELECT c.relname, i.indisvalid AND i.indisready FROM pg_class c JOIN pg_index i ON i.indexrelid = "
               "c.oid WHERE c.relkind = 'i' AND c.relname IN :names AND pg_table_is_visible(c.oid)")
        with self.db.connect() as conn:
            return {r[0]: bool(r[1]) for r in conn.execute(
                sa.text(sql).bindparams(sa.bindparam("names", expanding=True)), {"names": names})}

    def _ddl(self, sql: str) -> None:
        with self.db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f"SET lock_timeout = '{INDEX_LOCK_TIMEOUT}'"))
            try:
                conn.execute(sa.text(sql))
            finally:
                conn.execute(sa.text("RESET lock_timeout"))

    def ensure_key_id_indexes(self, key_class: str, create: bool = True) -> str | None:
        """Make sure every encrypted column has a valid key-id index (created concurrently if missing and
        ``create``); None when they all do, else why not (the census then scans every value)."""
        names = {c: self.key_id_index(c, key_class) for c in self.columns}
        states = self._index_states(list(names.values()))
        if all(states.get(n) for n in names.values()):
            return None
        if not create:
            missing = [c for c, n in names.items() if not states.get(n)]
            if not self.create_indexes and not self._index_advice_logged:
                self._index_advice_logged = True
                log.warning("%s: no key-id index on %s and create_key_id_index is false, so the census scans every "
                            "value; a DBA can create it with: %s", self.table, ", ".join(missing),
                            "; ".join(self.key_id_index_ddl(c, key_class) for c in missing))
            return "no valid key-id index on " + ", ".join(missing)
        for column, name in names.items():
            if states.get(name):
                continue
            try:
                log.info("%s.%s: creating the key-id index %s (CREATE INDEX CONCURRENTLY: writes go on)",
                         self.table, column, name)
                if name in states:  # left invalid by an interrupted concurrent build: build it again
                    self._ddl(f"DROP INDEX CONCURRENTLY IF EXISTS {_ident(name)}")
                self._ddl(self.key_id_index_ddl(column, key_class))
            except sa.exc.SQLAlchemyError as exc:
                reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
                log.warning("%s.%s: cannot create the key-id index %s (%s); the census scans every value",
                            self.table, column, name, reason)
                return f"cannot create the key-id index on {self.table}.{column}: {reason}"
        states = self._index_states(list(names.values()))
        missing = [c for c, n in names.items() if not states.get(n)]
        return f"no valid key-id index on {', '.join(missing)}" if missing else None

    def key_ids(self, partition: str, key_class: str) -> set[bytes]:
        """The distinct data key ids the partition's values name, every column: a skip scan of the key-id
        indexes (one probe per distinct id). Needs :meth:`ensure_key_id_indexes` to have passed: without the
        index each probe is a scan of the table."""
        out: set[bytes] = set()
        with self.db.connect() as conn:
            for column in self.columns:
                out.update(bytes(r[0]) for r in conn.execute(sa.text(self.key_ids_sql(column, key_class)),
                                                             {"partition": partition}))
        return out

    def key_ids_sql(self, column: str, key_class: str) -> str:
        """The skip scan of ``column``'s key-id index over partition ``:partition``: the smallest data key id,
        then the smallest one above it, until none is left."""
        kid = self._key_id(column, key_class)
        where = f"{self._day()} = CAST(:partition AS date) AND {_ident(column)} IS NOT NULL"
        return (f"WITH RECURSIVE ids(kid) AS ((SELECT {kid} FROM {_ident(self.table)} WHERE {where} "
                f"ORDER BY {kid} LIMIT 1) UNION ALL SELECT (SELECT {kid} FROM {_ident(self.table)} "
                f"WHERE {where} AND {kid} > ids.kid ORDER BY {kid} LIMIT 1) FROM ids WHERE ids.kid IS NOT "
                f"NULL) SELECT kid FROM ids WHERE kid IS NOT NULL")

    def values_under(self, partition: str, key_class: str, key_ids: set[bytes]) -> int:
        """How many values of the partition name one of ``key_ids`` (index scans of the key-id indexes)."""
        if not key_ids:
            return 0
        total = 0
        with self.db.connect() as conn:
            for column in self.columns:
                sql = sa.text(f"SELECT count(*) FROM {_ident(self.table)} WHERE {self._day()} = CAST(:partition AS "
                              f"date) AND {_ident(column)} IS NOT NULL AND {self._key_id(column, key_class)} IN :ids"
                              ).bindparams(sa.bindparam("ids", expanding=True))
                total += int(conn.execute(sql, {"partition": partition, "ids": list(key_ids)}).scalar() or 0)
        return total

    def row_count(self, partition: str) -> int:
        with self.db.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {_ident(self.table)} WHERE "
                                            f"{self._where_partition()}"), {"partition": partition}).scalar() or 0)

    def key_versions(self, partition: str, key_class: str) -> tuple[list[Any], int]:
        """The partition's values grouped by the data key they name: rows of (``version``, ``created_under``,
        ``n`` values, ``keys`` distinct data keys), ``version`` None for data keys not in the data-key table;
        and the partition's row count. A scan of every value: the census without a key-id index."""
        offset = key_id_offset(key_class)
        values = " UNION ALL ".join(
            f"SELECT substring({_ident(c)} FROM {offset} FOR 16) AS kid FROM {_ident(self.table)} "
            f"WHERE {self._where_partition()} AND {_ident(c)} IS NOT NULL" for c in self.columns)
        sql = (f"SELECT dk.version, dk.created_under, count(*) AS n, count(DISTINCT v.kid) AS keys "
               f"FROM ({values}) v LEFT JOIN {DATA_KEYS} dk ON dk.key_id = v.kid "
               f"AND dk.key_class = :key_class GROUP BY 1, 2")
        rows_sql = f"SELECT count(*) FROM {_ident(self.table)} WHERE {self._where_partition()}"
        with self.db.connect() as conn:
            groups = list(conn.execute(sa.text(sql), {"partition": partition, "key_class": key_class}))
            rows = conn.execute(sa.text(rows_sql), {"partition": partition}).scalar()
        return groups, int(rows or 0)

    def batches(self, partition: str) -> Iterator[pd.DataFrame]:
        """The partition's rows (primary key, then the encrypted columns) in primary-key order, ``batch_size``
        at a time (keyset pagination)."""
        cols = ", ".join(_ident(c) for c in [self.pk, *self.columns])
        last = None
        while True:
            after = f" AND {_ident(self.pk)} > :last" if last is not None else ""
            sql = (f"SELECT {cols} FROM {_ident(self.table)} WHERE {self._where_partition()}{after} "
                   f"ORDER BY {_ident(self.pk)} LIMIT :limit")
            with self.db.connect() as conn:
                frame = pd.DataFrame(conn.execute(sa.text(sql), {"partition": partition, "last": last,
                                                                 "limit": self.batch_size}).fetchall(),
                                     columns=[self.pk, *self.columns])
            if frame.empty:
                return
            yield frame
            last = frame[self.pk].iloc[-1].item() if hasattr(frame[self.pk].iloc[-1], "item") else \
                frame[self.pk].iloc[-1]

    def insert(self, columns: list[str], rows: Iterable[tuple]) -> None:
        """Insert ``rows`` (values of ``columns``) in one transaction."""
        sql = f"INSERT INTO {_ident(self.table)} ({', '.join(_ident(c) for c in columns)}) VALUES %s"
        raw = self.db.raw_connection()
        try:
            with raw.cursor() as cur:
                execute_values(cur, sql, rows, page_size=2000)
            raw.commit()
        finally:
            raw.close()

    def compare_and_set(self, updates: list[tuple]) -> list[Any]:
        """Apply the updates, (pk, old values..., new values...), in one transaction where a row still holds
        its old values; return the primary keys whose value had changed meanwhile."""
        n = len(self.columns)
        olds = [f"o{i}" for i in range(n)]
        news = [f"n{i}" for i in range(n)]
        sets = ", ".join(f"{_ident(c)} = v.{news[i]}" for i, c in enumerate(self.columns))
        same = " AND ".join(f"t.{_ident(c)} IS NOT DISTINCT FROM v.{olds[i]}" for i, c in enumerate(self.columns))
        sql = (f"UPDATE {_ident(self.table)} AS t SET {sets} FROM (VALUES %s) AS v(pk, {', '.join(olds + news)}) "
               f"WHERE t.{_ident(self.pk)} = v.pk AND {same} RETURNING t.{_ident(self.pk)}")
        template = "(" + ", ".join(["%s"] + ["%s::bytea"] * (2 * n)) + ")"
        raw = self.db.raw_connection()
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

    def reread(self, pks: list[Any]) -> pd.DataFrame:
        """The rows of ``pks`` as they are now (primary key, then the encrypted columns)."""
        cols = ", ".join(_ident(c) for c in [self.pk, *self.columns])
        sql = sa.text(f"SELECT {cols} FROM {_ident(self.table)} WHERE {_ident(self.pk)} IN :pks "
                      f"ORDER BY {_ident(self.pk)}").bindparams(sa.bindparam("pks", expanding=True))
        with self.db.connect() as conn:
            return pd.DataFrame(conn.execute(sql, {"pks": list(pks)}).fetchall(), columns=[self.pk, *self.columns])
