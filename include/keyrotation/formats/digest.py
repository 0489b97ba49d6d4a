"""Plaintext digests: prove that data decrypts to what it was, without storing the data.

A digest names its algorithm in its prefix. New digests are ``arrow-sha256:``: SHA-256 over canonical
encodings of the Arrow values, column by column. Digests recorded before it (``sha256:``, a pandas hash
of every value) are still read: whatever compares a computed digest with a recorded one computes it
with the algorithm the recorded one names (:meth:`DigestBuilder.like`, :class:`CheckedDigest`).

The canonical encoding (``arrow-sha256``), per column and per nesting level, is a set of streams, each
hashed as it comes, so the digest does not depend on where batches or chunks begin and end:

* ``nulls``: the position (int64, counted from the column's first element) of every null;
* fixed-width values: the values buffer, null slots zeroed (booleans one byte each);
* binary and strings: each value's length (nulls: 0), and the bytes of the non-null values;
* lists and maps: each row's length (nulls: 0), then the values of the non-null rows as a child column;
* structs: each field as a child column, null where the struct is;
* dictionary and run-end encoded columns: their decoded values (the schema names the value type), so
  an encoding does not change the digest.

Buffers are never hashed as they are: slices, padding and the bytes under nulls are not part of a value.
The schema (names, logical types and nesting, not nullability) and the row count are hashed first.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: What new digests are taken with.
CURRENT = "arrow-sha256"
#: The pandas hash, digests recorded before ``arrow-sha256``: only read, to verify them.
LEGACY = "sha256"
ALGORITHMS = (CURRENT, LEGACY)

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def digest_algorithm(digest: str) -> str:
    """The algorithm a digest was taken with (its prefix); ValueError if this version does not know it."""
    prefix, sep, _ = digest.partition(":")
    if not sep or prefix not in ALGORITHMS:
        raise ValueError(f"a digest of unknown algorithm {prefix[:32]!r} (known: {', '.join(ALGORITHMS)})")
    return prefix


class DigestBuilder:
    """:func:`table_digest` taken batch by batch, so a partition never has to be in memory whole.

    The schema and the row count come first (both known from a Parquet footer before any data is
    read); the batches must then be given in row order and add up to that count.
    """

    def __init__(self, schema: pa.Schema, num_rows: int, algorithm: str = CURRENT) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown digest algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")
        self.algorithm = algorithm
        self._impl: _ArrowDigest | _PandasDigest = (
            _ArrowDigest(schema, num_rows) if algorithm == CURRENT else _PandasDigest(schema, num_rows))
        self.expected_rows = num_rows
        self.rows = 0

    @classmethod
    def like(cls, recorded: str | None, schema: pa.Schema, num_rows: int) -> DigestBuilder:
        """A builder with the algorithm of ``recorded`` (the current one where nothing is recorded), so
        its digest can be compared with it."""
        return cls(schema, num_rows, CURRENT if recorded is None else digest_algorithm(recorded))

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows:
            self._impl.update(batch)
            self.rows += batch.num_rows

    def hexdigest(self) -> str:
        if self.rows != self.expected_rows:
            raise ValueError(f"digest of {self.rows} rows, expected {self.expected_rows}")
        return f"{self.algorithm}:{self._impl.hexdigest()}"


class CheckedDigest:
    """The digest of data being copied (current algorithm: what the copy records) and whether the data
    matches ``recorded``, checked with the algorithm that one names: a legacy digest costs a second hash
    of the copy, once, after which the partition's records are in the current algorithm."""

    def __init__(self, schema: pa.Schema, num_rows: int, recorded: str | None) -> None:
        self.recorded = recorded
        self._digest = DigestBuilder(schema, num_rows)
        self._check = (self._digest if recorded is None or digest_algorithm(recorded) == CURRENT
                       else DigestBuilder.like(recorded, schema, num_rows))

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        self._digest.update(batch)
        if self._check is not self._digest:
            self._check.update(batch)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def matches(self) -> bool:
        """Whether the data is what ``recorded`` says (True where nothing is recorded)."""
        return self.recorded is None or self._check.hexdigest() == self.recorded


def table_digest(table: pa.Table, algorithm: str = CURRENT) -> str:
    """The digest of a whole table: independent of how it is chunked or which key encrypted it, so
    the digest taken before a re-encryption must equal the one taken after."""
    digest = DigestBuilder(table.schema, table.num_rows, algorithm)
    digest.update(table)
    return digest.hexdigest()


# -- arrow-sha256 ---------------------------------------------------------------------------------

def _logical(type_: pa.DataType) -> pa.DataType:
    """The type whose values a column holds, without the encoding (dictionary, run-end)."""
    if pa.types.is_dictionary(type_):
        return _logical(type_.value_type)
    if pa.types.is_run_end_encoded(type_):
        return _logical(type_.value_type)
    return type_


def _describe(type_: pa.DataType) -> str:
    """The logical type, nested types spelled out (field names JSON-quoted); a list's item name left out."""
    t = _logical(type_)
    if isinstance(t, pa.ExtensionType):
        return f"extension<{json.dumps(t.extension_name)}:{_describe(t.storage_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ",".join(f"{json.dumps(t.field(i).name)}:{_describe(t.field(i).type)}"
                                    for i in range(t.num_fields)) + ">"
    if pa.types.is_map(t):
        return f"map<{_describe(t.key_type)},{_describe(t.item_type)}{',sorted' if t.keys_sorted else ''}>"
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_describe(t.value_type)},{t.list_size}>"
    if pa.types.is_large_list(t) or pa.types.is_list(t) or pa.types.is_list_view(t) or \
            pa.types.is_large_list_view(t):
        kind = str(t).split("<", 1)[0]
        return f"{kind}<{_describe(t.value_type)}>"
    return str(t)


def _children(type_: pa.DataType) -> list[pa.DataType]:
    t = _logical(type_)
    if isinstance(t, pa.ExtensionType):
        return _children(t.storage_type)
    if pa.types.is_struct(t):
        return [t.field(i).type for i in range(t.num_fields)]
    if pa.types.is_map(t):
        return [pa.struct([pa.field("key", t.key_type), pa.field("value", t.item_type)])]
    if hasattr(t, "value_type") and (pa.types.is_list(t) or pa.types.is_large_list(t) or
                                     pa.types.is_fixed_size_list(t) or pa.types.is_list_view(t) or
                                     pa.types.is_large_list_view(t)):
        return [t.value_type]
    return []


class _Column:
    """The streams of one column (or one nesting level of it), fed array by array in order."""

    __slots__ = ("children", "data", "lengths", "nulls", "seen")

    def __init__(self, type_: pa.DataType) -> None:
        self.seen = 0
        self.nulls = hashlib.sha256()
        self.lengths = hashlib.sha256()
        self.data = hashlib.sha256()
        self.children = [_Column(child) for child in _children(type_)]

    def feed(self, arr: pa.Array) -> None:
        t = arr.type
        if pa.types.is_dictionary(t):
            return self.feed(arr.dictionary_decode())
        if pa.types.is_run_end_encoded(t):
            return self.feed(pc.run_end_decode(arr))
        if isinstance(arr, pa.ExtensionArray):
            return self.feed(arr.storage)
        if pa.types.is_map(t):  # the list kernels take no maps: the same offsets and entries as a list
            entries = pa.struct([t.key_field, t.item_field])
            return self.feed(arr.cast(pa.list_(pa.field("entries", entries, nullable=False))))
        n = len(arr)
        if not n:
            return None
        isnull = None
        if arr.null_count:
            isnull = arr.is_null().to_numpy(zero_copy_only=False)
            self.nulls.update(np.flatnonzero(isnull).astype(np.int64) + self.seen)
        self.seen += n
        if pa.types.is_null(t):
            return None
        if pa.types.is_boolean(t):
            bits = np.unpackbits(np.frombuffer(arr.buffers()[1], np.uint8), count=arr.offset + n,
                                 bitorder="little")[arr.offset:]
            if isnull is not None:
                bits[isnull] = 0
            self.data.update(bits)
        elif pa.types.is_string_view(t) or pa.types.is_binary_view(t):
            self._binary(arr.cast(pa.large_string() if pa.types.is_string_view(t) else pa.large_binary()), isnull)
        elif pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t) or \
                pa.types.is_large_binary(t):
            self._binary(arr, isnull)
        elif pa.types.is_struct(t):
            for child, values in zip(self.children, arr.flatten(), strict=True):
                child.feed(values)
        elif self.children:  # list-like, map: lengths, then the values of the rows that are not null
            lengths = pc.list_value_length(arr)
            if isnull is not None:
                lengths = lengths.fill_null(0)
            self.lengths.update(lengths.to_numpy())
            self.children[0].feed(arr.flatten())
        else:
            self._fixed(arr, t, isnull)
        return None

    def _fixed(self, arr: pa.Array, t: pa.DataType, isnull: np.ndarray | None) -> None:
        try:
            width = t.bit_width // 8
        except ValueError:
            raise TypeError(f"no canonical digest for columns of type {t}") from None
        n = len(arr)
        values = np.frombuffer(arr.buffers()[1], np.uint8, count=(arr.offset + n) * width)[arr.offset * width:]
        if isnull is not None:
            values = values.view(_UINT[width]) if width in _UINT else values.reshape(n, width)
            values = values.copy()
            values[isnull] = 0
        self.data.update(values)

    def _binary(self, arr: pa.Array, isnull: np.ndarray | None) -> None:
        wide = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
        n = len(arr)
        buffers = arr.buffers()
        offsets = np.frombuffer(buffers[1], np.int64 if wide else np.int32, count=arr.offset + n + 1)[arr.offset:]
        lengths = np.diff(offsets)
        if isnull is not None and lengths[isnull].any():
            # Bytes under a null (allowed, undefined): hash only the values that are there.
            lengths[isnull] = 0
            self.lengths.update(lengths)
            compact = arr.drop_null()
            buffers, first = compact.buffers(), compact.offset
            offsets = np.frombuffer(buffers[1], offsets.dtype, count=first + len(compact) + 1)[first:]
        else:
            self.lengths.update(lengths)
        if buffers[2] is not None and offsets[-1] > offsets[0]:
            self.data.update(memoryview(buffers[2])[int(offsets[0]):int(offsets[-1])])

    def finish(self, into: Any) -> None:
        into.update(self.seen.to_bytes(8, "little"))
        for stream in (self.nulls, self.lengths, self.data):
            into.update(stream.digest())
        for child in self.children:
            child.finish(into)


class _ArrowDigest:
    def __init__(self, schema: pa.Schema, num_rows: int) -> None:
        self._header = json.dumps([[f.name, _describe(f.type)] for f in schema]).encode()
        self._num_rows = num_rows
        self._columns = [_Column(f.type) for f in schema]

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        for column, values in zip(self._columns, batch.columns, strict=True):
            for chunk in values.chunks if isinstance(values, pa.ChunkedArray) else [values]:
                column.feed(chunk)

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        h.update(len(self._header).to_bytes(8, "little"))
        h.update(self._header)
        h.update(self._num_rows.to_bytes(8, "little"))
        for column in self._columns:
            column.finish(h)
        return h.hexdigest()


# -- sha256 (legacy: read only) -------------------------------------------------------------------

class _PandasDigest:
    """The digest recorded as ``sha256:`` before ``arrow-sha256``: a pandas hash of every value."""

    def __init__(self, schema: pa.Schema, num_rows: int) -> None:
        self._h = hashlib.sha256()
        self._h.update(str([(f.name, str(f.type)) for f in schema]).encode())
        self._h.update(num_rows.to_bytes(8, "little"))

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        import pandas as pd

        frame = batch.to_pandas(types_mapper=pd.ArrowDtype)
        self._h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()
