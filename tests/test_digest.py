"""The plaintext digest (arrow-sha256): canonical over Arrow values, whatever their chunking, encoding or
the bytes under their nulls; different for any change of value, null, schema or order; and the legacy
sha256 digests still verify through the engine."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import customers, days, runtime, seed
from keyrotation import ledger as lg
from keyrotation.errors import ValidationError
from keyrotation.formats.digest import CURRENT, LEGACY, CheckedDigest, DigestBuilder, digest_algorithm, table_digest


def _nested(rows: int = 200) -> pa.Table:
    """Every kind of column the digest handles, with nulls at every level."""
    rng = np.random.default_rng(7)
    ints = rng.integers(-1_000, 1_000, rows)
    null = rng.random(rows) < 0.2
    words = [None if null[i] else f"w{ints[i]}" * (i % 4) for i in range(rows)]
    lists = [None if null[i] else [None if (i + j) % 5 == 0 else int(ints[i]) + j for j in range(i % 4)]
             for i in range(rows)]
    structs = [None if i % 7 == 0 else {"x": None if i % 3 == 0 else int(ints[i]), "s": words[i]} for i in range(rows)]
    maps = [None if i % 6 == 0 else [(f"k{j}", None if j == 1 else float(ints[i]) / 3) for j in range(i % 3)]
            for i in range(rows)]
    return pa.table({
        "i64": pa.array(ints, mask=null),
        "i8": pa.array(ints % 100, pa.int8(), mask=null),
        "f64": pa.array(ints / 7, mask=null),
        "flag": pa.array(ints % 2 == 0, mask=null),
        "dec": pa.array([None if null[i] else int(ints[i]) for i in range(rows)], pa.decimal128(12, 2)),
        "ts": pa.array(ints, pa.int64(), mask=null).cast(pa.timestamp("us", tz="UTC")),
        "fsb": pa.array([None if null[i] else int(ints[i] % 256).to_bytes(1, "little") * 3 for i in range(rows)],
                        pa.binary(3)),
        "s": pa.array(words),
        "ls": pa.array(words, pa.large_string()),
        "bin": pa.array([None if w is None else w.encode() for w in words], pa.binary()),
        "list": pa.array(lists, pa.list_(pa.int64())),
        "llist": pa.array(lists, pa.large_list(pa.int64())),
        "fsl": pa.array([None if null[i] else [int(ints[i]), None] for i in range(rows)], pa.list_(pa.int64(), 2)),
        "struct": pa.array(structs, pa.struct([("x", pa.int64()), ("s", pa.string())])),
        "list_struct": pa.array([None if null[i] else [structs[i], None] for i in range(rows)],
                                pa.list_(pa.struct([("x", pa.int64()), ("s", pa.string())]))),
        "map": pa.array(maps, pa.map_(pa.string(), pa.float64())),
        "day": pa.array(ints, pa.int32(), mask=null).cast(pa.date32()),
        "nothing": pa.nulls(rows),
    })


def _split(table: pa.Table, cuts: list[int]) -> list[pa.RecordBatch]:
    bounds = [0, *sorted(cuts), table.num_rows]
    return [batch for a, b in zip(bounds, bounds[1:], strict=False) for batch in table.slice(a, b - a).to_batches()]


def _digest_of(schema: pa.Schema, rows: int, batches: list) -> str:
    digest = DigestBuilder(schema, rows)
    for batch in batches:
        digest.update(batch)
    return digest.hexdigest()


@pytest.fixture(params=["customers", "nested"])
def table(request) -> pa.Table:
    return customers("2024-01-01", 500) if request.param == "customers" else _nested()


def test_prefix_names_the_algorithm(table):
    assert table_digest(table).startswith("arrow-sha256:")
    assert table_digest(customers("2024-01-01", 5), LEGACY).startswith("sha256:")  # flat tables only
    assert digest_algorithm(table_digest(table)) == CURRENT
    with pytest.raises(ValueError, match="unknown algorithm"):
        digest_algorithm("md5:0123")
    with pytest.raises(ValueError, match="unknown algorithm"):
        DigestBuilder.like("0123", table.schema, table.num_rows)


def test_equal_across_batch_boundaries(table):
    expected = table_digest(table)
    rng = np.random.default_rng(1)
    for _ in range(12):
        cuts = sorted(rng.choice(np.arange(1, table.num_rows), size=int(rng.integers(1, 6)), replace=False))
        assert _digest_of(table.schema, table.num_rows, _split(table, list(cuts))) == expected
    single = [table.slice(i, 1) for i in range(table.num_rows)]
    assert _digest_of(table.schema, table.num_rows, single) == expected
    assert _digest_of(table.schema, table.num_rows, table.to_batches(max_chunksize=7)) == expected


def test_equal_across_per_column_chunking(table):
    rng = np.random.default_rng(2)
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        bounds = [0, *sorted(rng.choice(np.arange(1, table.num_rows), size=3, replace=False)), table.num_rows]
        columns[name] = pa.chunked_array([column.slice(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)],
                                         column.type)
    rechunked = pa.table(columns, schema=table.schema)
    assert [len(c.chunks) for c in rechunked.columns] == [4] * table.num_columns
    assert table_digest(rechunked) == table_digest(table)
    assert _digest_of(table.schema, table.num_rows, [rechunked.slice(0, 123), rechunked.slice(123)]) == \
        table_digest(table)


def test_equal_across_a_parquet_round_trip(table):
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=64)
    back = pq.read_table(io.BytesIO(sink.getvalue()))
    assert back.equals(table)
    assert table_digest(back) == table_digest(table)
    batches = list(pq.ParquetFile(io.BytesIO(sink.getvalue())).iter_batches(batch_size=50))
    assert _digest_of(back.schema, back.num_rows, batches) == table_digest(table)


def test_equal_for_dictionary_and_plain_encoding():
    plain = pa.table({"s": pa.array(["a", None, "bb", "a", "ccc", None, "bb"]),
                      "n": pa.array([3, 1, None, 3, 3, 2, 1])})
    encoded = pa.table({"s": plain.column("s").combine_chunks().dictionary_encode(),
                        "n": plain.column("n").combine_chunks().dictionary_encode()})
    assert pa.types.is_dictionary(encoded.schema.field("s").type)
    assert table_digest(encoded) == table_digest(plain)
    # A dictionary whose entries are not in first-seen order, with unused and repeated ones.
    odd = pa.DictionaryArray.from_arrays(pa.array([2, None, 0, 2, 3, None, 0], pa.int8()),
                                         pa.array(["bb", "zz", "a", "ccc"]))
    assert table_digest(pa.table({"s": odd, "n": plain.column("n")})) == table_digest(plain)
    sink = io.BytesIO()
    pq.write_table(plain, sink)
    read = pq.read_table(io.BytesIO(sink.getvalue()), read_dictionary=["s"])
    assert pa.types.is_dictionary(read.schema.field("s").type)
    assert table_digest(read) == table_digest(plain)


# -- garbage under nulls, slices --------------------------------------------------------------------

def _validity(bits: list[bool]) -> pa.Buffer:
    return pa.array(bits).buffers()[1]


def test_fixed_width_garbage_under_nulls_hashes_like_clean():
    clean = pa.array([1, None, 3, None], pa.int64())
    values = pa.py_buffer(np.array([1, 0x5A5A5A5A, 3, -1], np.int64).tobytes())
    dirty = pa.Array.from_buffers(pa.int64(), 4, [_validity([True, False, True, False]), values])
    assert dirty.equals(clean) and dirty.buffers()[1] != clean.buffers()[1]
    assert table_digest(pa.table({"c": dirty})) == table_digest(pa.table({"c": clean}))
    flags = pa.Array.from_buffers(pa.bool_(), 4, [_validity([True, False, True, False]),
                                                  _validity([True, True, False, True])])
    assert table_digest(pa.table({"c": flags})) == table_digest(pa.table({"c": pa.array([True, None, False, None])}))


def test_binary_garbage_under_nulls_hashes_like_clean():
    clean = pa.array(["ab", None, "c"])
    offsets = pa.py_buffer(np.array([0, 2, 7, 8], np.int32).tobytes())
    dirty = pa.Array.from_buffers(pa.string(), 3, [_validity([True, False, True]), offsets, pa.py_buffer(b"abXXXXXc")])
    assert dirty.equals(clean)
    assert table_digest(pa.table({"c": dirty})) == table_digest(pa.table({"c": clean}))


def test_nested_garbage_under_nulls_hashes_like_clean():
    children = pa.array([1, 2, 99, 98, 3])
    offsets = pa.py_buffer(np.array([0, 2, 4, 5], np.int32).tobytes())
    dirty = pa.ListArray.from_buffers(pa.list_(pa.int64()), 3, [_validity([True, False, True]), offsets],
                                      children=[children])
    clean = pa.array([[1, 2], None, [3]], pa.list_(pa.int64()))
    assert dirty.equals(clean)
    assert table_digest(pa.table({"c": dirty})) == table_digest(pa.table({"c": clean}))
    # A struct's fields under a null struct are not its values.
    fields = [pa.array([1, 77, 3]), pa.array(["a", "garbage", "c"])]
    dirty_struct = pa.StructArray.from_arrays(fields, names=["x", "s"], mask=pa.array([False, True, False]))
    clean_struct = pa.array([{"x": 1, "s": "a"}, None, {"x": 3, "s": "c"}], dirty_struct.type)
    assert table_digest(pa.table({"c": dirty_struct})) == table_digest(pa.table({"c": clean_struct}))


def test_sliced_arrays_hash_like_their_copies(table):
    for start in (1, 3, 8, 13):
        piece = table.slice(start, 101)
        copy = pq.read_table(_parquet(piece))
        assert piece.column(0).chunks[0].offset == start or piece.num_columns == 0
        assert table_digest(piece) == table_digest(copy)


def _parquet(table: pa.Table) -> io.BytesIO:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return io.BytesIO(sink.getvalue())


# -- what must change the digest, one kind each ----------------------------------------------------

def _column(values: pa.Array, name: str = "c") -> str:
    return table_digest(pa.table({name: values}))


def test_differs_for_a_different_value():
    base = customers("2024-01-01", 100)
    changed = base.set_column(base.column_names.index("email"), "email", pa.array(
        [v[:-1] + chr(ord(v[-1]) ^ 1) if i == 40 else v for i, v in enumerate(base.column("email").to_pylist())]))
    assert len(changed.column("email").to_pylist()[40]) == len(base.column("email").to_pylist()[40])
    assert table_digest(changed) != table_digest(base)
    assert _column(pa.array([1, 2, 3])) != _column(pa.array([1, 2, 4]))
    assert _column(pa.array([1.0, 0.0])) != _column(pa.array([1.0, -0.0]))
    assert _column(pa.array([True, False])) != _column(pa.array([True, True]))
    # The same bytes, split between values differently.
    assert _column(pa.array(["ab", "c"])) != _column(pa.array(["a", "bc"]))
    assert _column(pa.array([[1, 2], [3]])) != _column(pa.array([[1], [2, 3]]))


def test_differs_for_nulls_in_different_places():
    # The values under the nulls are zero either way: only where the nulls are tells them apart.
    assert _column(pa.array([None, 0, 5])) != _column(pa.array([0, None, 5]))
    assert _column(pa.array([None, 0])) != _column(pa.array([0, 0]))
    assert _column(pa.array([None, ""])) != _column(pa.array(["", None]))
    assert _column(pa.array([None, False])) != _column(pa.array([False, None]))
    kind = pa.struct([("x", pa.int64())])
    assert _column(pa.array([None, {"x": None}], kind)) != _column(pa.array([{"x": None}, None], kind))
    assert _column(pa.array([None, []], pa.list_(pa.int64()))) != _column(pa.array([[], None], pa.list_(pa.int64())))
    # Across batches: the positions of the nulls count from the first row, not the batch's.
    table = pa.table({"c": pa.array([None, 1, 0, 4])})
    moved = pa.table({"c": pa.array([0, 1, None, 4])})
    assert _digest_of(table.schema, 4, _split(table, [2])) != _digest_of(moved.schema, 4, _split(moved, [2]))


def test_differs_for_different_column_names():
    values = pa.array([1, 2, 3])
    assert _column(values, "a") != _column(values, "b")
    kind = pa.struct([("x", pa.int64())])
    other = pa.struct([("y", pa.int64())])
    assert _column(pa.array([{"x": 1}], kind)) != _column(pa.array([{"y": 1}], other))


def test_differs_for_different_types_of_the_same_bytes():
    assert _column(pa.array([1, 2], pa.int64())) != _column(pa.array([1, 2], pa.int64()).cast(pa.timestamp("s")))
    assert _column(pa.array([1, 2], pa.int64())) != _column(pa.array([1, 2], pa.int64()).view(pa.uint64()))
    assert _column(pa.array(["ab"])) != _column(pa.array([b"ab"]))
    assert _column(pa.array([1], pa.timestamp("s", tz="UTC"))) != _column(pa.array([1], pa.timestamp("s")))


def test_differs_for_different_nesting():
    leaf = pa.array([1, 2, 3])
    shallow = pa.StructArray.from_arrays([leaf], names=["x"])
    deep = pa.StructArray.from_arrays([pa.StructArray.from_arrays([leaf], names=["x"])], names=["x"])
    assert _column(shallow) != _column(deep)
    assert _column(pa.array([[1, 2], [3]])) != _column(pa.array([[[1, 2], [3]]]))
    assert _column(pa.array([[1, 2], [3]])) != _column(pa.array([[1, 2], [3]], pa.large_list(pa.int64())))


def test_differs_for_a_different_row_order():
    base = customers("2024-01-01", 100)
    order = np.arange(100)
    order[[10, 11]] = order[[11, 10]]
    assert table_digest(base.take(order)) != table_digest(base)
    assert _column(pa.array([1, 2])) != _column(pa.array([2, 1]))
    assert _column(pa.array(["a", "b"])) != _column(pa.array(["b", "a"]))


def test_row_count_is_checked():
    table = customers("2024-01-01", 10)
    digest = DigestBuilder(table.schema, 11)
    digest.update(table)
    with pytest.raises(ValueError, match="10 rows, expected 11"):
        digest.hexdigest()


# -- legacy digests ------------------------------------------------------------------------------

def test_legacy_algorithm_is_unchanged():
    """``sha256:`` digests recorded before arrow-sha256 are computed exactly as then (a fixed table's digest,
    taken with the code that wrote them)."""
    table = pa.table({"id": pa.array([1, 2, None], pa.int64()), "email": ["a@x.test", None, "c@x.test"]})
    legacy = "sha256:cfbe101411e89385ce9c45bfe4f485ffa019701d0c2123f0ddb1717d6e53e781"
    assert table_digest(table, LEGACY) == legacy
    like = DigestBuilder.like(legacy, table.schema, table.num_rows)
    like.update(table)  # in one batch: the legacy hash of an integer column with nulls depends on the batches
    assert like.hexdigest() == legacy


def test_checked_digest_records_the_current_algorithm_and_checks_the_recorded_one():
    table = customers("2024-01-01", 300)
    for recorded in (None, table_digest(table), table_digest(table, LEGACY)):
        checked = CheckedDigest(table.schema, table.num_rows, recorded)
        for batch in table.to_batches(max_chunksize=64):
            checked.update(batch)
        assert checked.matches()
        assert checked.hexdigest() == table_digest(table)
    other = customers("2024-01-02", 300)
    for recorded in (table_digest(other), table_digest(other, LEGACY)):
        checked = CheckedDigest(table.schema, table.num_rows, recorded)
        checked.update(table)
        assert not checked.matches()


def _legacy_partition(rt, part: str) -> str:  # noqa: ANN001
    """Record the partition's digest as a deployment from before arrow-sha256 did: ``sha256:`` in its manifest
    and the ledger."""
    store = rt.store("customers")
    legacy = table_digest(customers(part), LEGACY)
    manifest = store.read_manifest(part)
    manifest.digest = legacy
    store.write_manifest(part, manifest)
    rt.ledger.record(lg.PARTITION_REWRAPPED, rt.name, dataset="customers", partition=part,
                     to_version=manifest.written_under_version, digest=legacy)
    return legacy


def test_a_legacy_digest_still_verifies_through_the_engine(make_key_class, vault):
    config = make_key_class(mode="reencrypt", name="legacydigest")
    rt = runtime(config, vault)
    [part] = days("2024-10-01", 1)
    seed(rt, "customers", [part])
    engine = rt.engine("customers")
    legacy = _legacy_partition(rt, part)
    # Validation computes the legacy digest to compare with the recorded one.
    assert engine.validate(part).digest == legacy
    # Re-encryption by decoding checks the data against the legacy digest, then records the current one.
    v2 = rt.backend.rotate()
    engine = rt.engine("customers")
    engine.module_path = False
    result = engine.process(part, v2, "reencrypt")
    assert (result.action, result.digest) == ("reencrypted", table_digest(customers(part)))
    assert rt.store("customers").read_manifest(part).digest == table_digest(customers(part))
    assert engine.validate(part, min_version=v2).digest == table_digest(customers(part))


def test_a_legacy_digest_that_does_not_match_refuses_the_reencryption(make_key_class, vault):
    config = make_key_class(mode="reencrypt", name="legacymismatch")
    rt = runtime(config, vault)
    [part] = days("2024-10-02", 1)
    seed(rt, "customers", [part])
    store = rt.store("customers")
    forged = table_digest(customers(part, rows=49), LEGACY)
    manifest = store.read_manifest(part)
    manifest.digest = forged
    store.write_manifest(part, manifest)
    files = store.live_files(part)
    v2 = rt.backend.rotate()
    engine = rt.engine("customers")
    engine.module_path = False  # the decode path checks the data against its record before it writes
    with pytest.raises(ValidationError, match="does not match its recorded digest"):
        engine.process(part, v2, "reencrypt")
    assert store.live_files(part) == files
    assert store.read_manifest(part).digest == forged

    # The module path proves each module equal instead and carries the record over: the validation that
    # follows every re-encryption finds the record wrong, and the gate stays shut.
    result = rt.engine("customers").process(part, v2, "reencrypt")
    assert result.action == "reencrypted" and store.read_manifest(part).digest == forged
    assert json.loads(rt.ledger.rows(events_in=(lg.PARTITION_REENCRYPTED,))[-1]["detail"])["path"] == "module"
    with pytest.raises(ValidationError, match=f"decrypts to digest sha256:[0-9a-f]{{64}}, recorded {forged}"):
        rt.engine("customers").validate(part, min_version=v2)
    assert rt.ledger.rows(events_in=(lg.VALIDATION_FAILED,))[-1]["partition"] == part
