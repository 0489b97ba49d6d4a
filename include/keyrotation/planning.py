"""Which partitions a re-encryption run touches, and how they are cut into mapped-task chunks."""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from itertools import accumulate

from keyrotation.census import Census, PartitionCensus
from keyrotation.errors import ConfigError

log = logging.getLogger(__name__)

# Airflow's [core] max_map_length default: a mapped task may fan out over at most this many items.
MAX_MAPPED_TASKS = 1024
SCOPES = ("auto", "interval", "sweep", "range")


def _date(value: str, field: str) -> str:
    try:
        return date.fromisoformat(value).isoformat()
    except (TypeError, ValueError):
        raise ConfigError(f"parameter {field}: {value!r} is not a date (YYYY-MM-DD)") from None


def select_partitions(census: Census, target_version: int, mode: str, scope: str, *,
                      interval_partition: str | None = None, partition_from: str | None = None,
                      partition_to: str | None = None, unfinished: Iterable[str] = (),
                      catch_up: bool = False) -> list[str]:
    """Partitions in scope that are not yet under ``target_version``, or whose last run did not finish
    (``unfinished``: not validated since their last change, leftovers of an interrupted run on disk).

    ``interval``: the run's own partition (a scheduled or backfill run); ``range``: partitions from
    ``partition_from`` to ``partition_to`` inclusive; ``sweep``: every partition of the dataset.
    ``catch_up`` (scheduled runs): with ``interval``, also every other partition still under an older
    version or unfinished, so the lifecycle converges even when the sweep a rotation started was lost.
    """
    if scope not in SCOPES or scope == "auto":
        raise ConfigError(f"parameter scope: {scope!r} must be one of interval, sweep, range")
    needing = set(census.needing(target_version, mode)) | set(unfinished)
    if scope == "interval":
        if not interval_partition:
            raise ConfigError("parameter scope: 'interval' needs a run with a data interval (scheduled or backfill)")
        behind = sorted(needing - {interval_partition}) if catch_up else []
        if behind:
            log.info("%s: %d more partitions under older versions or unfinished, caught up by this scheduled run: %s",
                     census.dataset, len(behind), ", ".join(behind[:10]) + (" ..." if len(behind) > 10 else ""))
        if interval_partition not in census.partitions and interval_partition not in census.errors:
            log.warning("%s: no partition %s (no data for this interval)", census.dataset, interval_partition)
            return behind
        candidates = [interval_partition, *behind]
    elif scope == "range":
        if not partition_from or not partition_to:
            raise ConfigError("parameters partition_from and partition_to are both required for scope 'range'")
        low, high = _date(partition_from, "partition_from"), _date(partition_to, "partition_to")
        if low > high:
            raise ConfigError(f"parameter partition_from: {low} is after partition_to {high}")
        candidates = [p for p in [*census.partitions, *census.errors] if low <= p <= high]
    else:
        candidates = [*census.partitions, *census.errors]
    # Unreadable partitions are planned too: the engine records their failure in the ledger.
    return sorted(p for p in candidates if p in needing or p in census.errors)


def chunk(partitions: list[str], chunk_size: int, max_chunks: int = MAX_MAPPED_TASKS) -> list[list[str]]:
    """Split into chunks of ``chunk_size``, enlarged if needed to stay within ``max_chunks``."""
    if not partitions:
        return []
    size = max(chunk_size, -(-len(partitions) // max_chunks))
    return [partitions[i : i + size] for i in range(0, len(partitions), size)]


# -- Sizing chunks by work ----------------------------------------------------------------------------------
# What one partition costs the re-encryption task that processes it (seconds of engine work, estimated from
# its census entry), so that each mapped task gets about ``target_seconds`` of work: Airflow's cost per task
# instance (about 0.1 s in dag.test, bench/results/latest.md section 5; seconds with a process start per
# task in a deployment) then stays a small share whatever the partitions' size. The validation task over
# the same chunk does work of the same order (it reads what the re-encryption wrote). Figures from
# bench/results/latest.md (2 cores, OpenBao, SQLite ledger), rounded up; an estimate, not a promise.

#: Per partition, any mode: lease, manifest, ledger rows, census of the one partition. Section 1: 6.0 ms per
#: partition of one file at P=1,000 in rewrap mode, of which 1.2 ms is the file's KMS request (next constant).
PARTITION_S = 0.005
#: rewrap, per data file (Parquet PME): one server-side rewrap of its key material and the key material file
#: written. Section 1: "time in KMS" 1.22 s for 1,000 rewrap requests; 2 ms allows for the file write.
REWRAP_FILE_S = 0.002
#: reencrypt (Parquet PME), per byte of the files as stored: both passes (copy, read-back check). Section 2:
#: 339.8 MB in 20.24 s wall = 16.8 MB/s.
REENCRYPT_BYTES_PER_S = 16_800_000
#: reencrypt (Parquet PME) when the census has rows but no bytes (a partition without a manifest): section 2,
#: 494,048 rows/s (10,000,000 rows in 20.24 s).
REENCRYPT_ROWS_PER_S = 494_000
#: Object formats (S3 SSE-KMS, GCS CMEK), per object, either mode (the store copies the object onto itself
#: under the new key): not measured in bench/results/latest.md; REQUESTS_PER_OBJECT (5) storage and KMS
#: requests at about 20 ms a round trip.
OBJECT_S = 0.1
#: Object formats, per byte: a server-side copy (S3 CopyObject, GCS rewrite), and a digest read before and
#: after; not measured in bench/results/latest.md: assumed 50 MB/s, the order of one S3 GET stream.
OBJECT_BYTES_PER_S = 50_000_000
#: SQL table, rewrap, per data key (the census counts data keys as units): section 3, KMS + data-key rows +
#: ledger + leases 100.3 ms for 10 partitions of one data key each = 10 ms.
SQL_REWRAP_KEY_S = 0.01
#: SQL table, reencrypt, per row: the engine's census of the partition before it (the data key id of every
#: value, an index scan): section 3, 2.99 s for 1,000,000 rows = 3.0 µs per row. A rewrap reads the data-key
#: table only (``SqlTableEngine.data_key_census``), so it costs per data key, whatever the rows.
SQL_CENSUS_ROW_S = 3.0e-6
#: SQL table, reencrypt, per row: section 3, 14,600 rows/s (300,000 rows in 20.55 s, census included).
SQL_REENCRYPT_ROWS_PER_S = 14_600
#: A partition of unknown size (a census error, no size recorded): counted as the largest known partition of
#: the census, and at least this much, so that it does not make a chunk run far past its target.
UNKNOWN_PARTITION_S = 30.0


def partition_work(census: Census, partitions: list[str], mode: str, data_format: str = "parquet") -> list[float]:
    """Estimated seconds of re-encryption work of each of ``partitions`` (same order), from their census; a
    partition of unknown size counts as the census's largest known one, and at least UNKNOWN_PARTITION_S."""
    known = {name: _work(entry, mode, data_format) for name, entry in census.partitions.items()}
    unknown = max([UNKNOWN_PARTITION_S, *(w for w in known.values() if w is not None)])
    return [w if (w := known.get(name)) is not None else unknown for name in partitions]


def _work(p: PartitionCensus, mode: str, data_format: str) -> float | None:
    if data_format in OBJECT_FORMATS:
        return PARTITION_S + p.units * OBJECT_S + (p.bytes or 0) / OBJECT_BYTES_PER_S
    if data_format == "sql_table":
        if p.rows is None:
            return None
        per_row = SQL_CENSUS_ROW_S + 1 / SQL_REENCRYPT_ROWS_PER_S if mode == "reencrypt" else 0.0
        return PARTITION_S + p.units * SQL_REWRAP_KEY_S + p.rows * per_row
    if mode == "reencrypt":
        if p.bytes is not None:
            return PARTITION_S + p.units * REWRAP_FILE_S + p.bytes / REENCRYPT_BYTES_PER_S
        if p.rows is not None:
            return PARTITION_S + p.units * REWRAP_FILE_S + p.rows / REENCRYPT_ROWS_PER_S
        return None
    return PARTITION_S + p.units * REWRAP_FILE_S


def _cut(work: list[float], target: float) -> list[int]:
    """Start indexes of contiguous chunks of at most ``target`` seconds each (a larger item alone): next-fit,
    which for contiguous chunks gives the fewest chunks under a cap, so the count never rises with it."""
    starts, total = [], 0.0
    for i, w in enumerate(work):
        if not starts or total + w > target:
            starts.append(i)
            total = 0.0
        total += w
    return starts


def _least_cap(work: list[float], low: float, high: float, chunks: int) -> float:
    """About the least cap in [low, high] that cuts ``work`` into at most ``chunks`` (``high`` does)."""
    if len(_cut(work, low)) <= chunks:
        return low
    for _ in range(40):
        middle = (low + high) / 2
        if len(_cut(work, middle)) > chunks:
            low = middle
        else:
            high = middle
    return high


def _even(work: list[float], count: int, cap: float) -> list[int] | None:
    """Start indexes of ``count`` contiguous chunks cut where the running total is nearest each multiple of
    total / count; None if one would be empty, or above ``cap`` but a single partition."""
    prefix = list(accumulate(work, initial=0.0))
    total, starts = prefix[-1], [0]
    for j in range(1, count):
        goal = total * j / count
        i = bisect_left(prefix, goal)  # prefix[i - 1] < goal <= prefix[i]
        if i > 0 and goal - prefix[i - 1] < prefix[i] - goal:
            i -= 1
        if not starts[-1] < i < len(work):
            return None
        starts.append(i)
    ends = [*starts[1:], len(work)]
    if any(prefix[b] - prefix[a] > cap and b - a > 1 for a, b in zip(starts, ends, strict=True)):
        return None
    return starts


def chunk_by_work(partitions: list[str], census: Census, mode: str, target_seconds: float,
                  max_chunks: int = MAX_MAPPED_TASKS, data_format: str = "parquet") -> list[list[str]]:
    """Split ``partitions`` (in order) into contiguous chunks of about ``target_seconds`` of estimated work
    each (:func:`partition_work`): as few chunks as that allows, none above the target but a partition larger
    than it, alone in its chunk, and their work evened out as far as the cuts allow (12 partitions of 10 s at
    a 60 s target: 3 chunks of 4, not 5 + 5 + 2). With more than ``max_chunks`` chunks that way, the target
    grows to the least that fits."""
    if not partitions:
        return []
    if target_seconds <= 0 or max_chunks < 1:
        raise ValueError(f"target_seconds and max_chunks must be positive, not {target_seconds}, {max_chunks}")
    work = partition_work(census, partitions, mode, data_format)
    total = sum(work)
    cap = max(float(target_seconds), total / max_chunks)
    if len(_cut(work, cap)) > max_chunks:
        cap = _least_cap(work, cap, total, max_chunks)  # _cut(work, total) is one chunk
    count = len(_cut(work, cap))
    # Evened out: cut at the multiples of total / count, or else at the least cap that still gives ``count``
    # chunks (below the target, a partition larger than the cap stays alone in its chunk).
    starts = _even(work, count, cap) or _cut(work, _least_cap(work, min(total / count, cap), cap, count))
    ends = [*starts[1:], len(partitions)]
    return [partitions[a:b] for a, b in zip(starts, ends, strict=True)]


# List price of AWS KMS and of Cloud KMS software-key operations: USD 0.03 per 10,000 requests.
CLOUD_KMS_USD_PER_10K = 0.03
# KMS requests per data file. rewrap: one server-side batch rewrap of the file's key material.
# reencrypt: unwrap the input's KEK to read its footer (which columns it encrypts), unwrap it to read the
# data, wrap the new one, unwrap it again to read the staged file back. Validation afterwards: one unwrap
# to read the data, one to prove the versions and read the footer.
VALIDATION_REQUESTS = 2
REQUESTS_PER_FILE = {"rewrap": 1 + VALIDATION_REQUESTS, "reencrypt": 4 + VALIDATION_REQUESTS}
# Where the KMS cannot rewrap server-side (Cloud KMS), rewrap is a decrypt and an encrypt per file.
REQUESTS_PER_FILE_CLIENT_REWRAP = {"rewrap": 2 + VALIDATION_REQUESTS, "reencrypt": 4 + VALIDATION_REQUESTS}
# SSE-KMS objects, requests S3 makes to KMS for us: read before (decrypt), copy (decrypt + generate a
# data key), read after (decrypt), validation (decrypt). Without S3 Bucket Keys each counts.
REQUESTS_PER_OBJECT = 1 + 2 + 1 + 1
OBJECT_FORMATS = {"sse_kms_objects": "S3", "gcs_cmek_objects": "GCS"}


@dataclass(frozen=True)
class Estimate:
    partitions: int
    files: int
    rows: int
    bytes: int
    kms_requests: int
    basis: str

    @property
    def cloud_cost_usd(self) -> float:
        return self.kms_requests / 10_000 * CLOUD_KMS_USD_PER_10K


def estimate(census: Census, partitions: list[str], mode: str, data_format: str = "parquet",
             server_side_rewrap: bool = True) -> Estimate:
    """What a run over ``partitions`` will touch and cost in KMS requests (rows and bytes as last recorded)."""
    known = [census.partitions[p] for p in partitions if p in census.partitions]
    files = sum(p.units for p in known)
    if data_format in OBJECT_FORMATS:
        per_file, basis = REQUESTS_PER_OBJECT, (f"{REQUESTS_PER_OBJECT} per object (made by "
                                                f"{OBJECT_FORMATS[data_format]}), validation included")
    else:
        per_file = (REQUESTS_PER_FILE if server_side_rewrap else REQUESTS_PER_FILE_CLIENT_REWRAP)[mode]
        basis = f"{per_file} per file in {mode} mode, validation included"
    return Estimate(len(partitions), files, sum(p.rows or 0 for p in known), sum(p.bytes or 0 for p in known),
                    files * per_file, basis)
