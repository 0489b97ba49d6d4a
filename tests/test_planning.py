"""Planning: scopes, ranges and chunks that respect Airflow's max_map_length."""

from __future__ import annotations

import pytest

from keyrotation.census import Census, PartitionCensus
from keyrotation.errors import ConfigError
from keyrotation.planning import (
    MAX_MAPPED_TASKS,
    OBJECT_BYTES_PER_S,
    OBJECT_S,
    PARTITION_S,
    REENCRYPT_BYTES_PER_S,
    REWRAP_FILE_S,
    SQL_REENCRYPT_ROWS_PER_S,
    UNKNOWN_PARTITION_S,
    chunk,
    chunk_by_work,
    partition_work,
    select_partitions,
)


def census(versions: dict[str, int], errors: tuple[str, ...] = ()) -> Census:
    c = Census("ds", {p: PartitionCensus(p, frozenset({v}), v) for p, v in versions.items()})
    c.errors = {p: "unreadable" for p in errors}
    return c


def test_scopes_select_only_partitions_under_old_versions():
    c = census({"2024-01-01": 1, "2024-01-02": 2, "2024-01-03": 1, "2024-01-04": 1}, errors=("2024-01-05",))
    assert select_partitions(c, 2, "rewrap", "sweep") == ["2024-01-01", "2024-01-03", "2024-01-04", "2024-01-05"]
    assert select_partitions(c, 2, "rewrap", "interval", interval_partition="2024-01-03") == ["2024-01-03"]
    assert select_partitions(c, 2, "rewrap", "interval", interval_partition="2024-01-02") == []
    assert select_partitions(c, 2, "rewrap", "interval", interval_partition="2023-12-31") == []
    assert select_partitions(c, 2, "rewrap", "range", partition_from="2024-01-02",
                             partition_to="2024-01-03") == ["2024-01-03"]


def test_a_scheduled_run_catches_up_every_partition_left_under_an_older_version():
    c = census({"2024-01-01": 1, "2024-01-02": 2, "2024-01-03": 1, "2024-01-04": 2}, errors=("2024-01-05",))
    assert select_partitions(c, 2, "rewrap", "interval", interval_partition="2024-01-04",
                             catch_up=True) == ["2024-01-01", "2024-01-03"]
    assert select_partitions(c, 2, "rewrap", "interval", interval_partition="2024-01-03",
                             catch_up=True) == ["2024-01-01", "2024-01-03"]
    assert select_partitions(c, 2, "rewrap", "interval", interval_partition="2024-02-01",  # no data that day
                             catch_up=True, unfinished={"2024-01-02"}) == ["2024-01-01", "2024-01-02", "2024-01-03"]
    # A backfill (no catch_up) handles its own partition only.
    assert select_partitions(c, 2, "rewrap", "interval", interval_partition="2024-01-04") == []


def test_reencrypt_mode_also_selects_partitions_rewrapped_but_not_rewritten():
    c = census({"2024-01-01": 2})
    c.partitions["2024-01-01"] = PartitionCensus("2024-01-01", frozenset({2}), written_under=1)
    assert select_partitions(c, 2, "rewrap", "sweep") == []
    assert select_partitions(c, 2, "reencrypt", "sweep") == ["2024-01-01"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scope": "everything"}, "parameter scope"),
    ({"scope": "interval"}, "needs a run with a data interval"),
    ({"scope": "range", "partition_from": "2024-01-01"}, "both required"),
    ({"scope": "range", "partition_from": "2024-13-01", "partition_to": "2024-01-02"}, "partition_from"),
    ({"scope": "range", "partition_from": "2024-01-05", "partition_to": "2024-01-02"}, "is after partition_to"),
])
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        select_partitions(census({"2024-01-01": 1}), 2, "rewrap", **kwargs)


def test_chunks_stay_within_max_map_length():
    parts = [f"p{i:05d}" for i in range(5000)]
    chunks = chunk(parts, 4)
    assert len(chunks) <= MAX_MAPPED_TASKS
    assert [p for c in chunks for p in c] == parts
    assert chunk(parts[:10], 4) == [parts[0:4], parts[4:8], parts[8:10]]
    assert chunk([], 4) == []


def sized(parts: dict[str, tuple[int, int | None, int | None]], errors: tuple[str, ...] = ()) -> Census:
    """A census of partitions as ``name: (units, rows, bytes)``, all under v1."""
    c = Census("ds", {p: PartitionCensus(p, frozenset({1}), 1, rows=r, bytes=b, units=u)
                      for p, (u, r, b) in parts.items()})
    c.errors = {p: "unreadable" for p in errors}
    return c


def test_chunks_by_work_stay_within_their_target_and_keep_the_order():
    c = sized({f"p{i:04d}": (1, 10, 1_000) for i in range(1000)})
    parts = sorted(c.partitions)
    per = partition_work(c, parts[:1], "rewrap")[0]
    assert per == pytest.approx(PARTITION_S + REWRAP_FILE_S)
    chunks = chunk_by_work(parts, c, "rewrap", 100 * per + 1e-9)
    assert [p for ch in chunks for p in ch] == parts
    assert [len(ch) for ch in chunks] == [100] * 10
    # Tiny partitions, the default target: one task does the lot (its Airflow cost is paid once, not 63 times).
    assert chunk_by_work(parts, c, "rewrap", 60) == [parts]
    # reencrypt is sized by bytes: 168 MB a partition at 16.8 MB/s is about 10 s.
    big = sized({f"p{i:04d}": (1, 1_000_000, 168_000_000) for i in range(12)})
    chunks = chunk_by_work(sorted(big.partitions), big, "reencrypt", 60)
    assert [len(ch) for ch in chunks] == [4, 4, 4]  # as few chunks as fit the target (3), evened out
    assert all(sum(partition_work(big, ch, "reencrypt")) <= 60 for ch in chunks)
    uneven = sized({f"p{i:04d}": (1, 0, (1 + i % 4) * REENCRYPT_BYTES_PER_S) for i in range(200)})
    parts = sorted(uneven.partitions)
    chunks = chunk_by_work(parts, uneven, "reencrypt", 45)
    loads = [sum(partition_work(uneven, ch, "reencrypt")) for ch in chunks]
    assert [p for ch in chunks for p in ch] == parts and max(loads) <= 45
    assert len(chunks) <= -(-sum(loads) // 45) + 1 and min(loads) > 0.8 * max(loads)  # few, even


def test_a_partition_larger_than_the_target_gets_a_chunk_of_its_own():
    c = sized({"a": (1, 10, 10), "b": (1, 10, 10), "huge": (1, 0, 10 * REENCRYPT_BYTES_PER_S),
               "c": (1, 10, 10), "d": (1, 10, 10)})
    assert chunk_by_work(["a", "b", "huge", "c", "d"], c, "reencrypt", 5) == [["a", "b"], ["huge"], ["c", "d"]]
    # Next to a huge one, the others still stay within the target.
    small = {f"s{i:02d}": (1, 0, REENCRYPT_BYTES_PER_S) for i in range(20)}
    c = sized({"a": (1, 0, REENCRYPT_BYTES_PER_S), "b": (1, 0, 100 * REENCRYPT_BYTES_PER_S), **small})
    parts = sorted(c.partitions)
    chunks = chunk_by_work(parts, c, "reencrypt", 5)
    assert ["b"] in chunks and [p for ch in chunks for p in ch] == parts
    assert all(sum(partition_work(c, ch, "reencrypt")) <= 5 for ch in chunks if ch != ["b"])


def test_chunks_by_work_respect_the_cap_on_mapped_tasks():
    c = sized({f"p{i:05d}": (1, 10, 1_000) for i in range(5000)})
    parts = sorted(c.partitions)
    chunks = chunk_by_work(parts, c, "rewrap", 0.01, max_chunks=MAX_MAPPED_TASKS)
    assert len(chunks) <= MAX_MAPPED_TASKS and [p for ch in chunks for p in ch] == parts
    # Uneven sizes: the raised target still fits the cap, the big ones alone.
    uneven = sized({f"p{i:03d}": (1, 0, (100 if i % 7 == 0 else 1) * REENCRYPT_BYTES_PER_S) for i in range(100)})
    parts = sorted(uneven.partitions)
    chunks = chunk_by_work(parts, uneven, "reencrypt", 10, max_chunks=20)
    assert len(chunks) <= 20 and [p for ch in chunks for p in ch] == parts
    assert len(chunk_by_work(parts, uneven, "reencrypt", 10, max_chunks=1)) == 1


def test_unknown_partitions_count_as_the_largest_known_one_at_least():
    c = sized({"a": (1, 10, 10), "b": (1, 10, 10)}, errors=("broken",))
    work = partition_work(c, ["a", "broken", "b"], "rewrap")
    assert work[1] == UNKNOWN_PARTITION_S
    assert chunk_by_work(["a", "broken", "b"], c, "rewrap", 20) == [["a"], ["broken"], ["b"]]
    large = sized({"a": (1, 0, 100 * REENCRYPT_BYTES_PER_S)}, errors=("broken",))
    assert partition_work(large, ["broken"], "reencrypt") == partition_work(large, ["a"], "reencrypt")


def test_work_depends_on_the_mode_and_the_format():
    c = sized({"p": (3, 1_000_000, 500_000_000)})
    rewrap, reencrypt = (partition_work(c, ["p"], m)[0] for m in ("rewrap", "reencrypt"))
    assert rewrap == pytest.approx(PARTITION_S + 3 * REWRAP_FILE_S) and reencrypt > 100 * rewrap
    sql_rewrap, sql_reencrypt = (partition_work(c, ["p"], m, "sql_table")[0] for m in ("rewrap", "reencrypt"))
    assert sql_rewrap < sql_reencrypt and sql_reencrypt > 1_000_000 / SQL_REENCRYPT_ROWS_PER_S
    objects = partition_work(c, ["p"], "rewrap", "sse_kms_objects")[0]
    assert objects == pytest.approx(PARTITION_S + 3 * OBJECT_S + 500_000_000 / OBJECT_BYTES_PER_S)


def test_chunks_by_work_are_deterministic_and_the_override_path_is_unchanged():
    c = sized({f"p{i:04d}": (1 + i % 3, 10, (i % 5) * 10_000_000) for i in range(300)})
    parts = sorted(c.partitions)
    first = chunk_by_work(parts, c, "reencrypt", 30)
    assert first == chunk_by_work(list(parts), c, "reencrypt", 30) and len(first) > 1
    assert chunk(parts, 16) == [parts[i:i + 16] for i in range(0, 300, 16)]
    assert chunk_by_work([], c, "rewrap", 60) == []
    with pytest.raises(ValueError):
        chunk_by_work(parts, c, "rewrap", 0)


def test_chunks_by_work_hold_their_promises_on_random_sizes():
    import random

    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 120)
        c = sized({f"p{i:03d}": (rng.randint(1, 4), 0, int(rng.expovariate(1 / 20) * REENCRYPT_BYTES_PER_S))
                   for i in range(n)})
        parts = sorted(c.partitions)
        target, cap = rng.choice([5, 30, 60, 300]), rng.choice([3, 10, MAX_MAPPED_TASKS])
        chunks = chunk_by_work(parts, c, "reencrypt", target, max_chunks=cap)
        loads = [sum(partition_work(c, ch, "reencrypt")) for ch in chunks]
        assert [p for ch in chunks for p in ch] == parts and all(chunks) and len(chunks) <= cap
        if cap == MAX_MAPPED_TASKS:  # not capped: the target holds but for partitions alone in their chunk
            assert all(load <= target for ch, load in zip(chunks, loads, strict=True) if len(ch) > 1)
            # As few chunks as the target allows: no two neighbours would fit in one.
            assert all(a + b > target for a, b in zip(loads, loads[1:], strict=False))
