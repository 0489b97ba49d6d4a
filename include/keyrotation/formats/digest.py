"""Plaintext digests: prove that data decrypts to what it was, without storing the data."""

from __future__ import annotations

import hashlib

import pandas as pd
import pyarrow as pa


class DigestBuilder:
    """:func:`table_digest` taken batch by batch, so a partition never has to be in memory whole.

    The schema and the row count come first (both known from a Parquet footer before any data is
    read); the batches must then be given in row order and add up to that count.
    """

    def __init__(self, schema: pa.Schema, num_rows: int) -> None:
        self._h = hashlib.sha256()
        self._h.update(str([(f.name, str(f.type)) for f in schema]).encode())
        self._h.update(num_rows.to_bytes(8, "little"))
        self.expected_rows = num_rows
        self.rows = 0

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows:
            frame = batch.to_pandas(types_mapper=pd.ArrowDtype)
            self._h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
            self.rows += batch.num_rows

    def hexdigest(self) -> str:
        if self.rows != self.expected_rows:
            raise ValueError(f"digest of {self.rows} rows, expected {self.expected_rows}")
        return "sha256:" + self._h.hexdigest()


def table_digest(table: pa.Table) -> str:
    """SHA-256 over the schema and a stable per-row hash of every value, in row order.

    Independent of how the table is chunked or which key encrypted it, so the digest taken
    before a re-encryption must equal the one taken after.
    """
    digest = DigestBuilder(table.schema, table.num_rows)
    digest.update(table)
    return digest.hexdigest()
