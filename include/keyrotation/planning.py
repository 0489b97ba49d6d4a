"""Which partitions a re-encryption run touches, and how they are cut into mapped-task chunks."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date

from keyrotation.census import Census
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
