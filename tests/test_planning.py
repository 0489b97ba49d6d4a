"""Planning: scopes, ranges and chunks that respect Airflow's max_map_length."""

from __future__ import annotations

import pytest

from keyrotation.census import Census, PartitionCensus
from keyrotation.errors import ConfigError
from keyrotation.planning import MAX_MAPPED_TASKS, chunk, select_partitions


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
