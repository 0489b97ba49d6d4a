"""Behind (issue 16, item 2): data left under an older version longer than the policy's ``behind_after`` is
reported so, in the key inventory's badge and the compliance report's DATA-1 finding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from keyrotation.census import Census, PartitionCensus
from keyrotation.config import KeyClass
from keyrotation.status import behind

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _key_class(behind_after: str) -> KeyClass:
    return KeyClass.model_validate({"name": "pii", "backend": "vault_transit", "key_ref": "pii", "conn_id": "c",
                                    "rotation": {"cryptoperiod": "90d"},
                                    "reencryption": {"behind_after": behind_after}})


def _census(versions: dict[str, int], errors: tuple[str, ...] = ()) -> Census:
    census = Census("customers")
    census.partitions = {p: PartitionCensus(p, frozenset({v}), v) for p, v in versions.items()}
    census.errors = dict.fromkeys(errors, "unreadable")
    return census


def test_behind_only_past_the_threshold_and_only_with_stale_or_blocking_data():
    kc = _key_class("3d")
    stale = [_census({"2024-01-01": 1, "2024-01-02": 2})]
    assert behind(kc, 2, NOW - timedelta(days=2), stale, NOW) is None  # within the threshold
    assert behind(kc, 2, NOW - timedelta(days=4), stale, NOW) == (
        "behind: 1 partitions still under versions older than v2 (or blocking) 4.0 days after it became current "
        "(policy: 3.0 days)")
    assert behind(kc, 2, NOW - timedelta(days=30), [_census({"2024-01-01": 2})], NOW) is None  # all current
    assert behind(kc, 2, NOW - timedelta(days=30), [_census({"2024-01-01": 2}, errors=("2024-01-03",))],
                  NOW).startswith("behind: 1 partitions")  # blocking counts
    assert behind(kc, None, None, stale, NOW) is None  # no reference yet: nothing to be behind


def test_the_default_threshold_is_a_week():
    assert _key_class("7d").reencryption.behind_after == KeyClass.model_validate(
        {"name": "x", "backend": "vault_transit", "key_ref": "x", "conn_id": "c",
         "rotation": {"cryptoperiod": "90d"}}).reencryption.behind_after == timedelta(days=7)
