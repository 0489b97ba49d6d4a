"""Plaintext digests: prove that data decrypts to what it was, without storing the data."""

from __future__ import annotations

import hashlib

import pandas as pd
import pyarrow as pa


def table_digest(table: pa.Table) -> str:
    """SHA-256 over the schema and a stable per-row hash of every value, in row order.

    Independent of how the table is chunked or which key encrypted it, so the digest taken
    before a re-encryption must equal the one taken after.
    """
    h = hashlib.sha256()
    h.update(str([(f.name, str(f.type)) for f in table.schema]).encode())
    h.update(table.num_rows.to_bytes(8, "little"))
    if table.num_rows:
        frame = table.to_pandas(types_mapper=pd.ArrowDtype)
        h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return "sha256:" + h.hexdigest()
