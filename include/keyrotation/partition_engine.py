"""What every engine (Parquet partitions, SSE-KMS/CMEK objects, SQL tables) is: the interface the
runtime, the census and the DAGs use, and the steps that are the same for every format (the mode
check, the partition's lease, the reconciliation of an up-to-date partition, the digest comparison,
the ledger records and running an operation over partitions with progress)."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any

from keyrotation import ledger as lg
from keyrotation.census import PartitionCensus
from keyrotation.config import human_bytes, human_duration
from keyrotation.errors import KeyRotationError, KmsUnreachable, PartitionError, ValidationError
from keyrotation.ledger import Ledger, RunContext
from keyrotation.locks import PartitionLeases

log = logging.getLogger(__name__)
MODES = ("rewrap", "reencrypt")
#: What fails one partition (recorded, the others go on); anything else stops the run.
ERRORS = (KeyRotationError, OSError, ValueError)


@dataclass
class PartitionResult:
    partition: str
    action: str  # written | rewrapped | reencrypted | up_to_date | reconciled | validated | failed
    from_version: int | None = None
    to_version: int | None = None
    rows: int | None = None
    bytes: int | None = None
    digest: str | None = None
    duration_s: float = 0.0
    error: str | None = None
    #: A failure that may pass on its own (the KMS unreachable): worth a task retry; bad input is not.
    retryable: bool = False
    #: The objects of an object dataset (which has no rows).
    objects: int | None = None

    @property
    def recorded_rows(self) -> int | None:
        """What the ledger's ``rows`` column (and the result's dict) holds: the rows, or the objects of an
        object dataset."""
        return self.rows if self.objects is None else self.objects

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rows"] = self.recorded_rows
        del out["objects"]
        return out


class PartitionEngine(ABC):
    """One dataset of one key class: its partitions, their census, and their re-encryption and validation.

    Subclasses set ``key_class``, ``dataset`` (its name), ``ledger`` and ``ctx``, and implement the
    format's steps: :meth:`list_partitions`, :meth:`partition_census`, :meth:`_process` and :meth:`_validate`.
    """

    key_class: str
    dataset: str
    ledger: Ledger
    ctx: RunContext
    #: What makes a partition blocking in a census (listed, not fatal).
    census_errors: tuple[type[Exception], ...] = (KeyRotationError, OSError)
    #: The census's ``kind``: the format whose proofs the retirement gate asks for (see :class:`Census`).
    census_kind: str = ""
    #: What holds a version, as validation findings name it.
    holders: str = "keys"
    #: Ledger rows of :meth:`_record` held back to be written together, in one transaction (see
    #: :meth:`_records_together`); None: each is written at once.
    _pending: list[dict] | None = None

    @cached_property
    def leases(self) -> PartitionLeases:
        return PartitionLeases(self.ledger)

    # -- the interface ------------------------------------------------------------------------
    @abstractmethod
    def list_partitions(self) -> list[str]:
        """The dataset's partitions, sorted."""

    @abstractmethod
    def partition_census(self, partition: str) -> PartitionCensus:
        """Which versions protect ``partition``; raises what makes it blocking (:attr:`census_errors`)."""

    def required_columns(self) -> frozenset[str]:
        """The columns the census must find encrypted (the retirement gate checks them), if the format says."""
        return frozenset()

    #: Partitions a census reads at once (more than one where each read waits on a remote store).
    census_threads: int = 1

    def scan(self) -> dict[str, Any] | None:
        """Every partition's listing from one listing of the whole dataset, by partition (what
        :meth:`partition_census` takes as ``found``); None where the format does not list its dataset so."""
        return None

    def census_fingerprint(self, found: Any, last_ledger_id: int | None) -> str:
        """What a partition's census depends on, hashed: its listing as :meth:`scan` gives it, and the id of the
        ledger's last row for it (what it does not cover, :meth:`reusable` checks). Only for formats whose
        :meth:`scan` gives listings."""
        raise NotImplementedError

    def reusable(self, census: PartitionCensus) -> bool:
        """Whether a census kept under an unchanged fingerprint still holds (what the fingerprint leaves out)."""
        return True

    def strays(self) -> dict[str, str]:
        """What a census of every partition lists as blocking besides the partitions (e.g. objects outside
        them), by name."""
        return {}

    def process(self, partition: str, target_version: int, mode: str) -> PartitionResult:
        """Bring ``partition`` under ``target_version`` in ``mode`` (rewrap or reencrypt); a no-op when it
        already is. Holds the partition's lease: a second run of the same partition waits, then finds it done."""
        if mode not in MODES:
            raise PartitionError(partition, f"unknown re-encryption mode {mode!r} (use rewrap or reencrypt)")
        with self.leases.hold(self.dataset, partition):
            return self._process(partition, target_version, mode)

    def validate(self, partition: str, min_version: int | None = None) -> PartitionResult:
        """Read the partition back, check it against what the engine records of it and that nothing is under
        a version older than ``min_version``; a finding is recorded and raised (ValidationError)."""
        with self.leases.hold(self.dataset, partition):
            return self._validate(partition, min_version)

    def process_many(self, partitions: list[str], target_version: int, mode: str) -> list[PartitionResult]:
        """:meth:`process` each of ``partitions`` (a mapped task's chunk), as :meth:`run` does: a failing
        partition is recorded and the rest go on. Engines that can do a chunk's work together (fewer KMS
        requests, fewer transactions) do so, with the same results and ledger rows."""
        return self.run(partitions, lambda p: self.process(p, target_version, mode))

    @abstractmethod
    def _process(self, partition: str, target_version: int, mode: str) -> PartitionResult: ...

    @abstractmethod
    def _validate(self, partition: str, min_version: int | None) -> PartitionResult: ...

    # -- common steps -------------------------------------------------------------------------
    def _record(self, event: str, result: PartitionResult, status: str = "ok", detail: dict | None = None) -> None:
        row = Ledger.row(
            event, self.key_class, self.ctx, status=status, detail=detail, dataset=self.dataset,
            partition=result.partition, from_version=result.from_version, to_version=result.to_version,
            rows=result.recorded_rows, bytes=result.bytes, digest=result.digest,
            duration_s=round(result.duration_s, 4),
        )
        if self._pending is not None:
            self._pending.append(row)
        else:
            self.ledger.record_many([row])

    @contextmanager
    def _records_together(self) -> Iterator[None]:
        """Within the block, :meth:`_record` rows are held back and written at its end (however it ends) in one
        transaction, in the order they were made, the hash chain as if written one by one."""
        if self._pending is not None:  # nested: the outer block writes them
            yield
            return
        self._pending = []
        try:
            yield
        finally:
            rows, self._pending = self._pending, None
            self.ledger.record_many(rows)

    def _recorded_digest(self, partition: str) -> str | None:
        """The digest of the partition's last ledger record."""
        return (self.ledger.partition_record(self.dataset, partition) or {}).get("digest")

    def _reconcile(self, result: PartitionResult, detail: dict, compare_digest: bool = True) -> PartitionResult:
        """``result`` is already under the target (``up_to_date``): record it in the ledger if a crash kept the
        last run from doing so, i.e. the last record names another version (or, where the engine keeps
        digests, another digest)."""
        last = self.ledger.partition_record(self.dataset, result.partition)
        if last is None or last["to_version"] != result.to_version or (
                compare_digest and last["digest"] != result.digest):
            result.action = "reconciled"
            self._record(lg.PARTITION_RECONCILED, result, detail=detail)
        return result

    @staticmethod
    def _digest_finding(read: str, digest: str | None, recorded: str | None) -> str | None:
        """The finding when the digest the partition reads to is not the one recorded."""
        return None if digest == recorded else f"{read} to digest {digest}, recorded {recorded}"

    def _below(self, census: PartitionCensus, min_version: int | None) -> str | None:
        """The finding when some key of the partition is under a version older than ``min_version``."""
        if min_version is not None and census.oldest < min_version:
            return f"still has {self.holders} under v{census.oldest}, expected v{min_version} or newer"
        return None

    def _finish_validation(self, result: PartitionResult, detail: dict | None,
                           *findings: str | None) -> PartitionResult:
        """Record a validation: failed (and raise ValidationError) on the first of ``findings`` there is."""
        problem = next((f for f in findings if f), None)
        if problem:
            result.action, result.error = "failed", problem
            self._record(lg.VALIDATION_FAILED, result, status="failed", detail={**(detail or {}), "error": problem})
            raise ValidationError(result.partition, problem)
        self._record(lg.PARTITION_VALIDATED, result, detail=detail)
        return result

    def _failed(self, partition: str, exc: Exception) -> PartitionResult:
        """The result of a partition whose operation raised ``exc``; recorded (a failed validation is already)."""
        message = str(exc) if isinstance(exc, PartitionError) else f"partition {partition}: {exc}"
        result = PartitionResult(partition, "failed", error=message, retryable=isinstance(exc, KmsUnreachable))
        if not isinstance(exc, ValidationError):
            self._record(lg.PARTITION_FAILED, result, status="failed", detail={"error": message})
        log.error("%s (key class %s): %s", self.dataset, self.key_class, message)
        return result

    def _progress(self, total: int) -> Callable[[PartitionResult], None]:
        """What logs each partition's result as it comes, with the totals so far, the rate and an ETA."""
        started = time.monotonic()
        done = rows = size = 0

        def log_result(result: PartitionResult) -> None:
            nonlocal done, rows, size
            done += 1
            rows, size = rows + (result.recorded_rows or 0), size + (result.bytes or 0)
            elapsed = time.monotonic() - started
            eta = elapsed / done * (total - done)
            rate = f"{rows / elapsed:,.0f}" if elapsed > 0 else "-"
            log.info("%s %d/%d partition %s: %s (v%s -> v%s) %.2fs; so far %s rows, %s, %s rows/s; "
                     "elapsed %s, eta %s", self.dataset, done, total, result.partition, result.action,
                     result.from_version, result.to_version, result.duration_s, f"{rows:,}", human_bytes(size),
                     rate, human_duration(timedelta(seconds=round(elapsed))),
                     human_duration(timedelta(seconds=round(eta))))

        return log_result

    def run(self, partitions: list[str], operation: Callable[[str], PartitionResult]) -> list[PartitionResult]:
        """Apply ``operation`` to each partition with progress and ETA in the log; a failing partition is
        recorded in the ledger and the rest go on."""
        results: list[PartitionResult] = []
        progress = self._progress(len(partitions))
        for partition in partitions:
            try:
                result = operation(partition)
            except ERRORS as exc:
                result = self._failed(partition, exc)
            results.append(result)
            progress(result)
        return results
