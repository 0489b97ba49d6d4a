"""The rows of one ``sql_table`` dataset in PostgreSQL: every SQL statement the SQL engine runs.

Partitions are the dates of the dataset's partition column; rows are read in primary-key order a
batch at a time (keyset pagination) and written back with a compare-and-set ``UPDATE``, one
transaction per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pandas as pd
import sqlalchemy as sa
from psycopg2.extras import execute_values

from keyrotation.config import Dataset
from keyrotation.errors import PartitionError
from keyrotation.formats.envelope import key_id_offset
from keyrotation.stores.data_keys import DATA_KEYS


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

    def key_versions(self, partition: str, key_class: str) -> tuple[list[Any], int]:
        """The partition's values grouped by the data key they name: rows of (``version``, ``created_under``,
        ``n`` values, ``keys`` distinct data keys), ``version`` None for data keys not in the data-key table;
        and the partition's row count."""
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
