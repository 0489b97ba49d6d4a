"""The re-encryption engine: brings one partition at a time under a target master key version.

Two modes:

* ``rewrap``: re-wrap each file's key material under the target version. Data files are untouched.
* ``reencrypt``: decrypt, check the plaintext digest, write a new generation of files with fresh
  data keys under the target version, read it back and check the digest again, then commit by
  rewriting the partition manifest.

Every step is idempotent and every crash point is safe: before the manifest is rewritten the old
generation is the live one and whatever was staged is removed on the next run; after, the new
one is live and the old files are removed on the next run. The ledger is reconciled on re-run when
a crash fell between the commit and the ledger write.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pyarrow as pa

from keyrotation import ledger as lg
from keyrotation.census import partition_census
from keyrotation.errors import KeyRotationError, PartitionError, ValidationError
from keyrotation.formats.digest import table_digest
from keyrotation.formats.parquet_pme import ParquetEncryption, key_material_path
from keyrotation.ledger import Ledger, RunContext
from keyrotation.locks import PartitionLeases
from keyrotation.stores.partitions import STAGING_PREFIX, Manifest, PartitionStore

log = logging.getLogger(__name__)

Checkpoint = Callable[[str], None]


def _no_checkpoint(_name: str) -> None:
    return None


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

    def to_dict(self) -> dict:
        return asdict(self)


class PartitionEngine:
    """What every engine (Parquet, SSE-KMS objects, SQL tables) shares: its ledger records, the end of
    a validation, and running an operation over partitions with progress. Subclasses set
    ``key_class``, ``dataset``, ``ledger`` and ``ctx``."""

    key_class: str
    dataset: str
    ledger: Ledger
    ctx: RunContext

    def _record(self, event: str, result: PartitionResult, status: str = "ok", detail: dict | None = None) -> None:
        self.ledger.record(
            event, self.key_class, self.ctx, status=status, detail=detail, dataset=self.dataset,
            partition=result.partition, from_version=result.from_version, to_version=result.to_version,
            rows=result.rows, bytes=result.bytes, digest=result.digest, duration_s=round(result.duration_s, 4),
        )

    def _finish_validation(self, result: PartitionResult, problem: str | None) -> PartitionResult:
        """Record a validation: failed (and raise ValidationError) when there is a ``problem``."""
        if problem:
            result.action, result.error = "failed", problem
            self._record(lg.VALIDATION_FAILED, result, status="failed")
            raise ValidationError(result.partition, problem)
        self._record(lg.PARTITION_VALIDATED, result)
        return result

    def run(self, partitions: list[str], operation: Callable[[str], PartitionResult]) -> list[PartitionResult]:
        """Apply ``operation`` to each partition with progress and ETA in the log; a failing partition is
        recorded in the ledger and the rest go on."""
        results: list[PartitionResult] = []
        started = time.monotonic()
        for i, partition in enumerate(partitions, 1):
            try:
                result = operation(partition)
            except (KeyRotationError, OSError, ValueError) as exc:
                message = str(exc) if isinstance(exc, PartitionError) else f"partition {partition}: {exc}"
                result = PartitionResult(partition, "failed", error=message)
                if not isinstance(exc, ValidationError):
                    self._record(lg.PARTITION_FAILED, result, status="failed", detail={"error": message})
                log.error("%s (key class %s): %s", self.dataset, self.key_class, message)
            results.append(result)
            elapsed = time.monotonic() - started
            eta = elapsed / i * (len(partitions) - i)
            log.info("%s %d/%d partition %s: %s (v%s -> v%s) %.2fs; elapsed %.1fs, eta %.1fs",
                     self.dataset, i, len(partitions), partition, result.action, result.from_version,
                     result.to_version, result.duration_s, elapsed, eta)
        return results


class ReencryptionEngine(PartitionEngine):
    """Re-encrypts, writes and validates the partitions of one dataset of one key class."""

    def __init__(self, key_class: str, dataset: str, store: PartitionStore, pme: ParquetEncryption,
                 ledger: Ledger, ctx: RunContext | None = None, checkpoint: Checkpoint | None = None) -> None:
        self.key_class = key_class
        self.dataset = dataset
        self.store = store
        self.pme = pme
        self.ledger = ledger
        self.ctx = ctx or RunContext()
        # Tests pass a checkpoint that raises at a named step to simulate a crash there.
        self.checkpoint = checkpoint or _no_checkpoint
        self.leases = PartitionLeases(ledger)
        self._latest: int | None = None

    # -- helpers ------------------------------------------------------------------------------
    def _latest_version(self) -> int:
        if self._latest is None:
            self._latest = self.pme.backend.key_state().latest_version
        return self._latest

    def _read(self, partition: str, files: list[str]) -> pa.Table:
        tables = []
        for name in files:
            try:
                tables.append(self.pme.read(self.store.path(partition, name), self.store.fs))
            except (OSError, ValueError, pa.ArrowException) as exc:
                hint = " (file or key material altered, or protected by another key)" if "decrypt" in str(exc) else ""
                raise PartitionError(partition, f"cannot read {name}: {exc}{hint}") from None
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")

    def _adopt(self, partition: str) -> Manifest:
        """The partition's manifest; a partition written by another tool gets one naming its files."""
        manifest = self.store.read_manifest(partition)
        if manifest is None:
            files = self.store.live_files(partition)
            manifest = Manifest(files=files, generation=self.store.next_generation(partition) - 1)
            self.store.write_manifest(partition, manifest)
        return manifest

    def _commit_generation(self, partition: str, table: pa.Table, digest: str, version: int) -> Manifest:
        """Write ``table`` as the partition's next generation under ``version`` and commit it."""
        store = self.store
        generation = store.next_generation(partition)
        name = f"part-{generation:05d}.parquet"
        staged = store.path(partition, STAGING_PREFIX + name)
        final = store.path(partition, name)
        self.pme.write(table, staged, store.fs, version)
        self.checkpoint("staged")
        readback = table_digest(self.pme.read(staged, store.fs))
        if readback != digest:
            raise ValidationError(partition, f"staged file does not read back to digest {digest}")
        store.fs.move(key_material_path(staged), key_material_path(final))
        self.checkpoint("material_moved")
        store.fs.move(staged, final)
        self.checkpoint("data_moved")
        manifest = Manifest(files=[name], generation=generation, rows=table.num_rows,
                            bytes=store.size(partition, [name]), digest=digest, written_under_version=version)
        store.write_manifest(partition, manifest)
        self.checkpoint("committed")
        store.clean(partition)
        self.checkpoint("cleaned")
        return manifest

    # -- operations ---------------------------------------------------------------------------
    def write_partition(self, partition: str, table: pa.Table, version: int) -> PartitionResult:
        """Write a new partition (or a new generation replacing it) under ``version``."""
        with self.leases.hold(self.dataset, partition):
            return self._write_partition(partition, table, version)

    def _write_partition(self, partition: str, table: pa.Table, version: int) -> PartitionResult:
        start = time.monotonic()
        self.store.fs.create_dir(self.store.partition_dir(partition), recursive=True)
        self.store.clean(partition)
        manifest = self._commit_generation(partition, table, table_digest(table), version)
        result = PartitionResult(partition, "written", None, version, manifest.rows, manifest.bytes,
                                 manifest.digest, time.monotonic() - start)
        self._record(lg.PARTITION_WRITTEN, result)
        return result

    def process(self, partition: str, target_version: int, mode: str) -> PartitionResult:
        """Bring ``partition`` under ``target_version``; a no-op when it already is.

        Holds the partition's lease: a second run of the same partition waits, then finds it done.
        """
        if mode not in ("rewrap", "reencrypt"):
            raise PartitionError(partition, f"unknown re-encryption mode {mode!r} (use rewrap or reencrypt)")
        with self.leases.hold(self.dataset, partition):
            return self._process(partition, target_version, mode)

    def _process(self, partition: str, target_version: int, mode: str) -> PartitionResult:
        start = time.monotonic()
        self.store.clean(partition)
        manifest = self._adopt(partition)
        before = partition_census(self.store, self.pme, partition)
        unknown = sorted(v for v in before.versions if v > self._latest_version())
        if unknown:
            raise PartitionError(partition, f"key material names version(s) {unknown} that the master key "
                                            f"{self.pme.backend.key_ref!r} does not have (latest "
                                            f"v{self._latest_version()}): unknown key version")
        needs = before.oldest < target_version or (
            mode == "reencrypt" and (manifest.written_under_version or 0) < target_version
        )
        if not needs:
            return self._reconcile(partition, manifest, before.oldest, start)

        if mode == "rewrap":
            if manifest.digest is None:  # first sight of a foreign partition: take a baseline digest
                table = self._read(partition, manifest.files)
                manifest.digest, manifest.rows = table_digest(table), table.num_rows
                manifest.bytes = self.store.size(partition, manifest.files)
                self.store.write_manifest(partition, manifest)
            for name in manifest.files:
                self.pme.rotate(self.store.path(partition, name), self.store.fs, target_version)
                self.checkpoint("rewrapped_file")
            after = partition_census(self.store, self.pme, partition)
            if after.versions != {target_version}:
                raise PartitionError(partition, f"after rewrap the key material is under {sorted(after.versions)}, "
                                                f"expected only v{target_version}")
            event, action = lg.PARTITION_REWRAPPED, "rewrapped"
        else:
            table = self._read(partition, manifest.files)
            digest = table_digest(table)
            recorded = manifest.digest or (self.ledger.partition_record(self.dataset, partition) or {}).get("digest")
            if recorded and recorded != digest:
                raise ValidationError(partition, f"decrypted data does not match its recorded digest {recorded}; "
                                                 "partition left untouched")
            manifest = self._commit_generation(partition, table, digest, target_version)
            event, action = lg.PARTITION_REENCRYPTED, "reencrypted"

        result = PartitionResult(partition, action, before.oldest, target_version, manifest.rows, manifest.bytes,
                                 manifest.digest, time.monotonic() - start)
        self._record(event, result, detail={"mode": mode, "files": manifest.files})
        self.checkpoint("recorded")
        return result

    def _reconcile(self, partition: str, manifest: Manifest, version: int, start: float) -> PartitionResult:
        """Already under the target: record it in the ledger if a crash kept the last run from doing so."""
        result = PartitionResult(partition, "up_to_date", version, version, manifest.rows, manifest.bytes,
                                 manifest.digest, time.monotonic() - start)
        last = self.ledger.partition_record(self.dataset, partition)
        if last is None or last["to_version"] != version or last["digest"] != manifest.digest:
            result.action = "reconciled"
            self._record(lg.PARTITION_RECONCILED, result, detail={"files": manifest.files})
        return result

    def validate(self, partition: str, min_version: int | None = None) -> PartitionResult:
        """Decrypt the partition and compare its digest with the one recorded in the ledger."""
        with self.leases.hold(self.dataset, partition):
            return self._validate(partition, min_version)

    def _validate(self, partition: str, min_version: int | None) -> PartitionResult:
        start = time.monotonic()
        manifest = self.store.read_manifest(partition)
        if manifest is None:
            raise PartitionError(partition, "has no manifest: it was never written or re-encrypted by keyrotation")
        census = partition_census(self.store, self.pme, partition)
        recorded = (self.ledger.partition_record(self.dataset, partition) or {}).get("digest") or manifest.digest
        table = self._read(partition, manifest.files)
        digest = table_digest(table)
        result = PartitionResult(partition, "validated", census.oldest, max(census.versions), table.num_rows,
                                 manifest.bytes, digest, time.monotonic() - start)
        problem = None
        if recorded != digest:
            problem = f"decrypts to digest {digest}, recorded {recorded}"
        elif min_version is not None and census.oldest < min_version:
            problem = f"still has keys under v{census.oldest}, expected v{min_version} or newer"
        return self._finish_validation(result, problem)

