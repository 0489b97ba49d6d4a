"""The re-encryption engine: brings one partition at a time under a target master key version.

Two modes:

* ``rewrap``: re-wrap each file's key material under the target version. Data files are untouched. A chunk
  of partitions (:meth:`ParquetEngine.rewrap_many`) has its distinct wrapped KEKs re-wrapped together, in the
  KMS's batch call where it has one, before each partition's key material is written as one alone would be.
* ``reencrypt``: decrypt, check the plaintext digest, write a new generation of files with fresh
  data keys under the target version, read it back and check the digest again, then commit by
  rewriting the partition manifest. The data streams through in batches of ``batch_rows`` (the
  digest is taken as it goes), so memory is bounded by a batch and a row group, not the partition.
  Where it can, the partition's file is instead re-encrypted module by module, without decoding
  (:meth:`ParquetEngine._commit_modules`; the ledger detail says which path and why not the module one).

Every step is idempotent and every crash point is safe: before the manifest is rewritten the old
generation is the live one and whatever was staged is removed on the next run; after, the new
one is live and the old files are removed on the next run. The ledger is reconciled on re-run when
a crash fell between the commit and the ledger write.

Nothing the engine did not write is removed: clean-up takes staging names and the files the ledger
records for the partition (a ``generation_staged`` row is written before a new generation's files
get their final names), and every removal is logged and recorded. A validation proves, besides the
digest, which versions the KMS itself unwrapped the partition's keys with and which columns the
files' footers encrypt; the retirement gate asks for that proof (:mod:`keyrotation.proof`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from keyrotation import ledger as lg
from keyrotation.census import CENSUS_THREADS, PartitionCensus, known_versions, partition_census
from keyrotation.errors import KeyRotationError, KmsUnreachable, PartitionError, PermissionDenied, ValidationError
from keyrotation.formats.digest import CheckedDigest, DigestBuilder
from keyrotation.formats.parquet_pme import KeyMaterial, ParquetEncryption, key_material_path
from keyrotation.formats.pme_modules import ModuleReencryptionError, ModuleReencryptionUnavailable
from keyrotation.ledger import Ledger, RunContext
from keyrotation.partition_engine import ERRORS, PartitionEngine, PartitionResult
from keyrotation.stores.partitions import GENERATION_NAME, MANIFEST, STAGING_PREFIX, Manifest, PartitionStore

log = logging.getLogger(__name__)

Checkpoint = Callable[[str], None]
#: Rows decrypted, hashed and re-encrypted at a time: with the row groups of the files written
#: (``ROW_GROUP_ROWS``), what bounds a re-encryption's memory, whatever the partition's size.
DEFAULT_BATCH_ROWS = 65_536
#: Partitions a batched KEK rotation (:meth:`ParquetEngine.rewrap_many`) takes together: their leases, their
#: KMS requests (a few of the KMS's batches) and their ledger rows; what a kill there leaves to reconcile.
REWRAP_GROUP = 1_000
#: Changes whenever what a partition's census holds, or how it is read, changes: kept censuses of an older
#: form are then never reused (see :mod:`keyrotation.census_cache`).
CENSUS_FORMAT = 1


def _no_checkpoint(_name: str) -> None:
    return None


def _distinct_wrapped(materials: dict[str, KeyMaterial]) -> list[str]:
    """The distinct wrapped keys of a partition's files' key material, in order: what the KMS re-wraps."""
    return list(dict.fromkeys(w for m in materials.values() for w in m.wrapped))


class ParquetEngine(PartitionEngine):
    """Re-encrypts, writes and validates the partitions of one Parquet dataset of one key class."""

    census_kind = "parquet_pme"

    def __init__(self, key_class: str, dataset: str, store: PartitionStore, pme: ParquetEncryption,
                 ledger: Ledger, ctx: RunContext | None = None, checkpoint: Checkpoint | None = None,
                 batch_rows: int = DEFAULT_BATCH_ROWS) -> None:
        self.key_class = key_class
        self.dataset = dataset
        self.store = store
        self.pme = pme
        self.ledger = ledger
        self.ctx = ctx or RunContext()
        # Tests pass a checkpoint that raises at a named step to simulate a crash there.
        self.checkpoint = checkpoint or _no_checkpoint
        self.batch_rows = batch_rows
        #: Whether ``reencrypt`` tries the module path first (:meth:`_commit_modules`), falling back to decoding.
        self.module_path = True
        self._known: frozenset[int] | None = None
        #: The file names the ledger records, by partition, read for a group of partitions at once (while
        #: :meth:`rewrap_many` holds their leases); what :meth:`_clean` asks the ledger otherwise.
        self._ledger_files: dict[str, set[str]] | None = None

    # -- helpers ------------------------------------------------------------------------------
    def _known_versions(self) -> frozenset[int]:
        """The versions the KMS has, read once per engine (a task): every label must be one of them."""
        if self._known is None:
            self._known = known_versions(self.pme)
        return self._known

    # -- census -------------------------------------------------------------------------------
    def list_partitions(self) -> list[str]:
        return self.store.list_partitions()

    def partition_census(self, partition: str, materials: dict[str, KeyMaterial] | None = None,
                         found: dict[str, pafs.FileInfo] | None = None) -> PartitionCensus:
        """The partition's census (``materials``, ``found``: see :func:`keyrotation.census.partition_census`)."""
        return partition_census(self.store, self.pme, partition, self._known_versions(), materials, found)

    @property
    def census_threads(self) -> int:  # type: ignore[override]
        return 1 if isinstance(self.store.fs, pafs.LocalFileSystem) else CENSUS_THREADS

    def scan(self) -> dict[str, dict[str, pafs.FileInfo]]:
        return self.store.scan()

    def census_fingerprint(self, found: dict[str, pafs.FileInfo], last_ledger_id: int | None) -> str:
        files = sorted((name, info.type.value, info.size, info.mtime_ns) for name, info in found.items())
        facts = [CENSUS_FORMAT, self.store.location, last_ledger_id, files]
        return hashlib.sha256(json.dumps(facts).encode()).hexdigest()

    def reusable(self, census: PartitionCensus) -> bool:
        """Whether a kept census still holds against the KMS now: every version it names is one the KMS has
        (a rotation adds versions; a deletion makes the partition blocking, so it is read again), and no file
        in it had a problem (what was found unknown may be known now)."""
        known = self._known_versions()
        return census.versions <= known and all(not f.problem and f.versions <= known for f in census.unmanaged)

    def required_columns(self) -> frozenset[str]:
        return frozenset(self.pme.encrypted_columns)

    # -- reading ------------------------------------------------------------------------------

    def _encrypted_in(self, partition: str, files: list[str]) -> tuple[frozenset[int], frozenset[str]]:
        """The versions the KMS unwrapped ``files``' keys with, and the columns every one of their footers
        says are encrypted (one KMS request per file)."""
        versions: set[int] = set()
        columns: frozenset[str] | None = None
        for name in files:
            protection = self.pme.inspect(self.store.path(partition, name), self.store.fs)
            versions |= protection.versions
            columns = protection.encrypted_columns if columns is None else columns & protection.encrypted_columns
        return frozenset(versions), columns or frozenset()

    def _unreadable(self, partition: str, name: str, exc: Exception) -> PartitionError:
        hint = " (file or key material altered, or protected by another key)" if "decrypt" in str(exc) else ""
        return PartitionError(partition, f"cannot read {name}: {exc}{hint}")

    def _read(self, partition: str, files: list[str]) -> pa.Table:
        """The whole partition in memory (for callers that need it so; the engine streams)."""
        tables = []
        for name in files:
            try:
                tables.append(self.pme.read(self.store.path(partition, name), self.store.fs))
            except (OSError, ValueError, pa.ArrowException) as exc:
                raise self._unreadable(partition, name, exc) from None
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")

    def _batches(self, partition: str, files: list[str]) -> tuple[pa.Schema, int, Iterator[pa.RecordBatch]]:
        """Schema, row count and the plaintext batches of ``files``, decrypted ``batch_rows`` at a time.

        Files of different schemas (a partition some other tool wrote) are read whole and unified, as
        :meth:`_read` does, so the digest is the same either way.
        """
        sources = []
        for name in files:
            try:
                sources.append((name, self.pme.open(self.store.path(partition, name), self.store.fs)))
            except (OSError, ValueError, pa.ArrowException) as exc:
                raise self._unreadable(partition, name, exc) from None
        schemas = [source.schema_arrow for _, source in sources]
        if any(not schema.equals(schemas[0]) for schema in schemas[1:]):
            for _, source in sources:
                source.close()
            table = self._read(partition, files)
            return table.schema, table.num_rows, iter(table.to_batches(max_chunksize=self.batch_rows))

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                for name, source in sources:
                    try:
                        yield from source.iter_batches(batch_size=self.batch_rows)
                    except (OSError, ValueError, pa.ArrowException) as exc:
                        raise self._unreadable(partition, name, exc) from None
            finally:
                for _, source in sources:
                    source.close()

        return schemas[0], sum(source.num_rows for _, source in sources), batches()

    def _digest(self, partition: str, files: list[str], like: str | None = None) -> tuple[str, int]:
        """The plaintext digest and row count of ``files``, read batch by batch; with the algorithm of the
        digest ``like`` names, to compare with it (a legacy one recorded before the current algorithm)."""
        schema, rows, batches = self._batches(partition, files)
        digest = DigestBuilder.like(like, schema, rows)
        for batch in batches:
            digest.update(batch)
        return digest.hexdigest(), rows

    def _manifest(self, partition: str) -> Manifest:
        """The partition's manifest. A partition the ledger has never seen (written by another tool) is
        adopted: a manifest naming its Parquet files. A manifest gone from a partition the ledger knows is
        rebuilt from the ledger's last record when every file it names is there, else refused. Either is
        logged and recorded."""
        manifest = self.store.read_manifest(partition)
        if manifest is not None:
            return manifest
        last = self.ledger.partition_record(self.dataset, partition)
        if last is None:
            files = self.store.live_files(partition)
            manifest = Manifest(files=files, generation=self.store.next_generation(partition) - 1)
            event, message = lg.PARTITION_ADOPTED, "no manifest and no ledger record: adopted its files"
        else:
            detail = json.loads(last["detail"] or "{}")
            files = list(detail.get("files") or [])
            present = set(self.store.listing(partition))
            if not files or not set(files) <= present:
                raise PartitionError(partition, f"its manifest {MANIFEST} is missing and the ledger's last record "
                                                f"({last['event']}, id {last['id']}) names files {files} that are not "
                                                "all there: restore the manifest; nothing was changed")
            generations = [int(m.group(1)) for f in files if (m := GENERATION_NAME.match(f))]
            manifest = Manifest(files=files, generation=max(generations, default=1), rows=last["rows"],
                                bytes=last["bytes"], digest=last["digest"],
                                written_under_version=detail.get("written_under"))
            event, message = lg.MANIFEST_REBUILT, "manifest missing: rebuilt from the ledger's last record"
        self.store.write_manifest(partition, manifest)
        log.warning("%s partition %s: %s %s", self.dataset, partition, message, files)
        self.ledger.record(event, self.key_class, self.ctx, dataset=self.dataset, partition=partition,
                           detail={"files": files})
        return manifest

    def _clean(self, partition: str) -> list[str]:
        """Remove what an interrupted run of the engine left (staging names, earlier generations the ledger
        records); log and record each removal. Unmanaged files stay where they are."""
        known = self._ledger_files.get(partition) if self._ledger_files is not None else None
        if known is None:
            known = self.ledger.partition_files(self.dataset, partition)
        removed = self.store.clean(partition, known)
        if removed:
            log.info("%s partition %s: removed what an earlier run left: %s", self.dataset, partition,
                     ", ".join(removed))
            self.ledger.record(lg.PARTITION_CLEANED, self.key_class, self.ctx, dataset=self.dataset,
                               partition=partition, detail={"removed": removed})
        return removed

    def _commit_generation(self, partition: str, source: pa.Table | list[str], digest: str | None,
                           version: int) -> Manifest:
        """Write ``source`` (a table, or the partition's files re-read batch by batch) as the partition's
        next generation under ``version``, check it reads back to its digest, and commit it.

        The digest of a streamed source is taken while it is copied; where ``digest`` is given, a source
        that does not match it (checked with the algorithm it names) is refused, the staged file removed,
        the partition left as it was. The new generation's digest is in the current algorithm.
        """
        store = self.store
        generation = store.next_generation(partition)
        name = f"part-{generation:05d}.parquet"
        staged = store.path(partition, STAGING_PREFIX + name)
        if isinstance(source, pa.Table):
            schema, rows, batches = source.schema, source.num_rows, iter(source.to_batches(self.batch_rows))
        else:
            schema, rows, batches = self._batches(partition, source)
        copied = CheckedDigest(schema, rows, digest)
        try:
            with self.pme.writer(staged, store.fs, schema, version) as writer:
                for batch in batches:
                    copied.update(batch)
                    writer.write_batch(batch)
            read_digest = copied.hexdigest()
            if not copied.matches():
                raise ValidationError(partition, f"decrypted data does not match its recorded digest {digest}; "
                                                 "partition left untouched")
        except BaseException:
            self._discard_staged(staged)
            raise
        digest = read_digest
        self.checkpoint("staged")
        if self._digest(partition, [STAGING_PREFIX + name])[0] != digest:
            raise ValidationError(partition, f"staged file does not read back to digest {digest}")
        return self._commit_staged(partition, generation, rows, digest, version)

    def _discard_staged(self, staged: str) -> None:
        """Remove a staged file and its key material, where they were written."""
        for path in (staged, key_material_path(staged)):
            try:
                self.store.fs.delete_file(path)
            except OSError:
                pass  # not written yet; a leftover is removed by the next run's clean()

    def _commit_staged(self, partition: str, generation: int, rows: int, digest: str, version: int) -> Manifest:
        """Give generation ``generation``'s staged file (checked already) and its key material their final names
        and commit them by rewriting the manifest; clean what they replace."""
        store = self.store
        name = f"part-{generation:05d}.parquet"
        staged = store.path(partition, STAGING_PREFIX + name)
        final = store.path(partition, name)
        previous = store.read_manifest(partition)
        # Before the files get their final names: the ledger is what lets a later run remove them (if this
        # one stops before the commit) or the generation they replace (if after), and nothing else.
        self.ledger.record(lg.GENERATION_STAGED, self.key_class, self.ctx, dataset=self.dataset, partition=partition,
                           to_version=version, detail={"files": [name], "generation": generation,
                                                       "replaces": previous.files if previous else []})
        self.checkpoint("staging_recorded")
        store.fs.move(key_material_path(staged), key_material_path(final))
        self.checkpoint("material_moved")
        store.fs.move(staged, final)
        self.checkpoint("data_moved")
        manifest = Manifest(files=[name], generation=generation, rows=rows,
                            bytes=store.size(partition, [name]), digest=digest, written_under_version=version,
                            encrypted_columns=sorted(self.pme.encrypted_columns))
        store.write_manifest(partition, manifest)
        self.checkpoint("committed")
        self._clean(partition)
        self.checkpoint("cleaned")
        return manifest

    def _refuse_plaintext(self, partition: str, encrypted: frozenset[str]) -> None:
        """Refuse to re-encrypt files that encrypt a column the key class no longer names (it would be written in
        plaintext)."""
        dropped = sorted(encrypted - self.required_columns())
        if dropped:
            raise PartitionError(partition, f"column(s) {', '.join(dropped)} are encrypted in its files but not "
                                            "in the key class's encrypted_columns: re-encrypting would write them "
                                            "in plaintext, refused (add them back to encrypted_columns)")

    def _commit_modules(self, partition: str, files: list[str], digest: str | None, rows: int | None,
                        version: int, checked: list[frozenset[str]]) -> Manifest:
        """The partition's one file re-encrypted module by module (:meth:`ParquetEncryption.reencrypt_modules`)
        as its next generation under ``version``, committed as :meth:`_commit_generation` commits a decoded one.

        Every module of the new file decrypts to the old one's plaintext (proven while it is written), so the
        recorded digest carries over without decoding the data. Raises ModuleReencryptionUnavailable (before
        anything is written) where this path does not apply, with the reason; ModuleReencryptionError where the
        file does not authenticate (the decode path then says what pyarrow finds). The columns the file's footer
        encrypts are checked before anything is written (:meth:`_refuse_plaintext`) and appended to ``checked``.
        """
        if len(files) != 1:
            raise ModuleReencryptionUnavailable(f"the partition has {len(files)} files: a generation is one file, "
                                                "and only decoding merges them")
        if digest is None:
            raise ModuleReencryptionUnavailable("no recorded digest to carry over (a partition keyrotation did not "
                                                "write or check before)")

        def check_columns(encrypted: frozenset[str]) -> None:
            self._refuse_plaintext(partition, encrypted)
            checked.append(encrypted)
            missing = sorted(self.required_columns() - encrypted)
            if missing:
                raise ModuleReencryptionUnavailable(f"column(s) {', '.join(missing)} are not encrypted in the file: "
                                                    "only decoding can encrypt them")

        store = self.store
        generation = store.next_generation(partition)
        staged = store.path(partition, f"{STAGING_PREFIX}part-{generation:05d}.parquet")
        result = self.pme.reencrypt_modules(store.path(partition, files[0]), staged, store.fs, version,
                                            check_columns=check_columns)
        if rows is None:
            rows = result.rows
        elif result.rows != rows:
            self._discard_staged(staged)
            raise ValidationError(partition, f"the file holds {result.rows} rows, its record says {rows}; "
                                             "partition left untouched")
        self.checkpoint("staged")
        return self._commit_staged(partition, generation, rows, digest, version)

    # -- operations ---------------------------------------------------------------------------
    def write_partition(self, partition: str, table: pa.Table, version: int) -> PartitionResult:
        """Write a new partition (or a new generation replacing it) under ``version``."""
        with self.leases.hold(self.dataset, partition):
            return self._write_partition(partition, table, version)

    def _write_partition(self, partition: str, table: pa.Table, version: int) -> PartitionResult:
        start = time.monotonic()
        self.store.fs.create_dir(self.store.partition_dir(partition), recursive=True)
        self._clean(partition)
        manifest = self._commit_generation(partition, table, None, version)
        result = PartitionResult(partition, "written", None, version, manifest.rows, manifest.bytes,
                                 manifest.digest, time.monotonic() - start)
        self._record(lg.PARTITION_WRITTEN, result, detail={"files": manifest.files, "written_under": version})
        return result

    def _begin(self, partition: str, target_version: int, mode: str,
               materials: dict[str, KeyMaterial] | None = None
               ) -> tuple[float, Manifest, PartitionCensus, PartitionResult | None]:
        """The first steps of :meth:`_process`: the manifest (adopted or rebuilt), the clean-up and the census
        before (``materials`` gets the key material it reads); with the (reconciled) result when the partition
        needs nothing."""
        start = time.monotonic()
        manifest = self._manifest(partition)
        self._clean(partition)
        before = self.partition_census(partition, materials)  # raises on what it cannot establish: unknown ...
        required = self.required_columns()
        columns_known = before.encrypted_columns is not None and required <= before.encrypted_columns
        written_under_target = (manifest.written_under_version or 0) >= target_version
        needs = before.oldest < target_version or (
            mode == "reencrypt" and (not written_under_target or not columns_known)
        )
        if needs and mode == "reencrypt" and before.oldest >= target_version and written_under_target \
                and before.encrypted_columns is None:
            # A manifest from before keyrotation recorded the columns it encrypted: the footers say, instead of
            # a rewrite of data that is already under the target.
            needs = not required <= self._encrypted_in(partition, manifest.files)[1]
        if not needs:
            return start, manifest, before, self._reconcile(
                PartitionResult(partition, "up_to_date", before.oldest, before.oldest, manifest.rows, manifest.bytes,
                                manifest.digest, time.monotonic() - start), {"files": manifest.files})
        return start, manifest, before, None

    def _process(self, partition: str, target_version: int, mode: str) -> PartitionResult:
        read: dict[str, KeyMaterial] = {}
        start, manifest, before, done = self._begin(partition, target_version, mode, read)
        if done is not None:
            return done
        if mode == "rewrap":
            materials = self._rewrap_materials(partition, manifest, read)
            distinct = _distinct_wrapped(materials)
            rewrapped = dict(zip(distinct, self.pme.backend.rewrap(distinct, target_version), strict=True))
            return self._write_rewrapped(partition, start, manifest, before, materials, rewrapped, target_version)
        recorded = manifest.digest or self._recorded_digest(partition)
        files = list(manifest.files)
        # the module path reads the file's footer itself: the columns it encrypts are checked there, before writing
        checked: list[frozenset[str]] = []
        try:
            if not self.module_path:
                raise ModuleReencryptionUnavailable("the module path is turned off for this engine")
            manifest = self._commit_modules(partition, files, recorded, manifest.rows, target_version, checked)
            path: dict = {"path": "module"}
        except (ModuleReencryptionUnavailable, ModuleReencryptionError) as exc:
            reason = exc.reason if isinstance(exc, ModuleReencryptionUnavailable) else str(exc)
            if not checked:
                self._refuse_plaintext(partition, self._encrypted_in(partition, manifest.files)[1])
            log.info("%s partition %s: re-encrypted by decoding, not module by module: %s", self.dataset, partition,
                     reason)
            manifest = self._commit_generation(partition, files, recorded, target_version)
            path = {"path": "decode", "fallback_reason": reason}
        result = PartitionResult(partition, "reencrypted", before.oldest, target_version, manifest.rows,
                                 manifest.bytes, manifest.digest, time.monotonic() - start)
        self._record(lg.PARTITION_REENCRYPTED, result, detail={"mode": mode, "files": manifest.files,
                                                               "written_under": manifest.written_under_version,
                                                               **path})
        self.checkpoint("recorded")
        return result

    # -- KEK rotation -------------------------------------------------------------------------
    def _rewrap_materials(self, partition: str, manifest: Manifest, read: dict[str, KeyMaterial]
                          ) -> dict[str, KeyMaterial]:
        """What a rewrap of the partition changes: the key material of each of its files, by file name, as the
        census before read it (``read``) (after taking a baseline digest of a foreign partition, on first
        sight)."""
        if manifest.digest is None:
            manifest.digest, manifest.rows = self._digest(partition, manifest.files)
            manifest.bytes = self.store.size(partition, manifest.files)
            self.store.write_manifest(partition, manifest)
        return {name: read.get(name) or self.pme.key_material(self.store.path(partition, name), self.store.fs)
                for name in manifest.files}

    def _write_rewrapped(self, partition: str, start: float, manifest: Manifest, before: PartitionCensus,
                         materials: dict[str, KeyMaterial], rewrapped: dict[str, str], target_version: int,
                         recorded: bool = True) -> PartitionResult:
        """Write each file's key material re-wrapped (``rewrapped``: old wrapped key -> new), read the labels
        back, and record the partition rewrapped (``recorded``: and pass the checkpoint that follows)."""
        for material in materials.values():
            self.pme.write_rewrapped(material, rewrapped, self.store.fs, self.checkpoint)
            self.checkpoint("rewrapped_file")
        after: set[int] = set()
        for name in materials:  # read back what was written: its labels, without listing the partition again
            after |= self.pme.wrapping_versions(self.store.path(partition, name), self.store.fs)
        if after != {target_version}:
            raise PartitionError(partition, f"after rewrap the key material is under {sorted(after)}, "
                                            f"expected only v{target_version}")
        result = PartitionResult(partition, "rewrapped", before.oldest, target_version, manifest.rows, manifest.bytes,
                                 manifest.digest, time.monotonic() - start)
        self._record(lg.PARTITION_REWRAPPED, result, detail={"mode": "rewrap", "files": manifest.files,
                                                             "written_under": manifest.written_under_version})
        if recorded:
            self.checkpoint("recorded")
        return result

    def process_many(self, partitions: list[str], target_version: int, mode: str) -> list[PartitionResult]:
        if mode == "rewrap":
            return self.rewrap_many(partitions, target_version)
        return super().process_many(partitions, target_version, mode)

    def rewrap_many(self, partitions: list[str], target_version: int) -> list[PartitionResult]:
        """Bring ``partitions`` under ``target_version`` by rewrap, as :meth:`process` does one by one (the same
        results and ledger rows), with far fewer KMS requests and transactions.

        In groups of :data:`REWRAP_GROUP` partitions: the group's leases are taken in one transaction; each
        partition's key material is read; the group's distinct wrapped KEKs are re-wrapped together, in the
        KMS's batch call where it has one (:attr:`~keyrotation.backends.base.KmsBackend.max_batch`); then each
        partition's new key material is written as :meth:`process` writes it (each file's under a temporary name,
        renamed over the old: a kill before leaves the old, both decrypt, and the new wrapped KEKs are simply not
        used), and the group's ledger rows are written in one transaction. A failing partition is recorded
        and the others go on; when the KMS refuses a batch, each partition is retried alone, so only the
        partitions whose keys it refuses fail. A partition another run holds is processed after the group,
        waiting for its lease as :meth:`process` does.
        """
        partitions = list(dict.fromkeys(partitions))
        results: list[PartitionResult] = []
        progress = self._progress(len(partitions))
        for begin in range(0, len(partitions), REWRAP_GROUP):
            group = partitions[begin : begin + REWRAP_GROUP]
            with self.leases.hold_many(self.dataset, group) as taken:
                done = self._rewrap_group(taken, target_version)
            for partition in group:
                result = done.get(partition)
                if result is None:  # another run held its lease: wait for it, then most likely find it done
                    try:
                        result = self.process(partition, target_version, "rewrap")
                    except ERRORS as exc:
                        result = self._failed(partition, exc)
                results.append(result)
                progress(result)
        return results

    def _rewrap_group(self, partitions: list[str], target_version: int) -> dict[str, PartitionResult]:
        results: dict[str, PartitionResult] = {}
        rewrapped_ok: list[str] = []
        # Read before any change here: files a partition's adoption records now are its live files, which
        # the clean-up keeps whatever the ledger says.
        self._ledger_files = self.ledger.partition_files_many(self.dataset, partitions)
        try:
            with self._records_together():
                self._rewrap_prepared(partitions, target_version, results, rewrapped_ok)
        finally:
            self._ledger_files = None
        for _ in rewrapped_ok:  # the group's rows are in the ledger now
            self.checkpoint("recorded")
        return results

    def _rewrap_prepared(self, partitions: list[str], target_version: int, results: dict[str, PartitionResult],
                         rewrapped_ok: list[str]) -> None:
        """Each partition's census and key material; the KMS requests for them all; each one's new key material
        written: into ``results`` (and the rewrapped ones, in order, into ``rewrapped_ok``)."""
        # A partition's duration is its own: its census and key material read, an equal share of the group's KMS
        # requests, and its writes (not the time it waited while the rest of the group was read).
        plans: dict[str, tuple[float, Manifest, PartitionCensus, dict[str, KeyMaterial]]] = {}
        for partition in partitions:
            try:
                read: dict[str, KeyMaterial] = {}
                start, manifest, before, done = self._begin(partition, target_version, "rewrap", read)
                if done is not None:
                    results[partition] = done
                else:
                    materials = self._rewrap_materials(partition, manifest, read)
                    plans[partition] = (time.monotonic() - start, manifest, before, materials)
            except ERRORS as exc:
                results[partition] = self._failed(partition, exc)
        kms_start = time.monotonic()
        rewrapped, refused = self._rewrap_kms(plans, target_version)
        kms_share = (time.monotonic() - kms_start) / max(1, len(plans))
        for partition, (own, manifest, before, materials) in plans.items():
            try:
                if partition in refused:
                    raise refused[partition]
                start = time.monotonic() - own - kms_share
                results[partition] = self._write_rewrapped(partition, start, manifest, before, materials,
                                                           rewrapped, target_version, recorded=False)
                rewrapped_ok.append(partition)
            except ERRORS as exc:
                results[partition] = self._failed(partition, exc)

    def _rewrap_kms(self, plans: dict[str, tuple[float, Manifest, PartitionCensus, dict[str, KeyMaterial]]],
                    target_version: int) -> tuple[dict[str, str], dict[str, Exception]]:
        """Re-wrap the distinct wrapped keys of ``plans`` together: old -> new, and the error of each partition
        whose keys the KMS did not re-wrap. A refused batch is retried partition by partition, so one bad
        partition fails alone; an unreachable or refusing KMS is every partition's error."""
        backend = self.pme.backend
        wanted = {p: _distinct_wrapped(plan[3]) for p, plan in plans.items()}
        distinct = list(dict.fromkeys(w for ws in wanted.values() for w in ws))
        if not distinct:
            return {}, {}
        try:
            return dict(zip(distinct, backend.rewrap(distinct, target_version), strict=True)), {}
        except (KmsUnreachable, PermissionDenied) as exc:
            return {}, dict.fromkeys(plans, exc)
        except ERRORS as exc:
            if len(plans) == 1:
                return {}, dict.fromkeys(plans, exc)
            log.warning("%s: the KMS refused a batch rewrap of %d keys (%s); each partition's keys again alone",
                        self.dataset, len(distinct), exc)
        rewrapped: dict[str, str] = {}
        refused: dict[str, Exception] = {}
        for partition, keys in wanted.items():
            try:
                rewrapped.update(zip(keys, backend.rewrap(keys, target_version), strict=True))
            except (KmsUnreachable, PermissionDenied) as exc:  # no use asking again for the others
                refused.update({p: exc for p in wanted if p not in refused and not set(wanted[p]) <= set(rewrapped)})
                break
            except ERRORS as exc:
                refused[partition] = exc
        return rewrapped, refused

    def _validate(self, partition: str, min_version: int | None) -> PartitionResult:
        """Decrypt and digest the partition, and prove what protects it: the versions the KMS unwraps its
        keys with (equal to the labels of its key material) and the encrypted columns its footers name
        (every configured one). Any failure, unreadable files included, is a recorded failed validation."""
        start = time.monotonic()
        manifest = self.store.read_manifest(partition)
        if manifest is None:
            raise PartitionError(partition, "has no manifest: it was never written or re-encrypted by keyrotation")
        result = PartitionResult(partition, "validated", duration_s=0.0)
        detail: dict = {"generation": manifest.generation, "files": manifest.files}
        try:
            census = self.partition_census(partition)
            result.from_version, result.to_version = census.oldest, max(census.versions)
            recorded = self._recorded_digest(partition) or manifest.digest
            result.digest, result.rows = self._digest(partition, manifest.files, like=recorded)
            result.bytes = manifest.bytes
            confirmed, encrypted = self._encrypted_in(partition, manifest.files)
        except (PermissionDenied, KmsUnreachable):
            raise  # the KMS refused or was away: no finding about the data
        except (KeyRotationError, OSError) as exc:
            result.duration_s = time.monotonic() - start
            return self._finish_validation(result, detail, str(exc).removeprefix(f"partition {partition}: "))
        result.duration_s = time.monotonic() - start
        detail.update(kms_confirmed=sorted(confirmed), encrypted_columns=sorted(encrypted),
                      key_material=census.material_digest)
        missing = sorted(self.required_columns() - encrypted)
        unconfirmed = None if confirmed == census.versions else (
            f"key material is labelled {sorted(census.versions)}, but the KMS unwrapped its keys with "
            f"{sorted(confirmed)}")
        unencrypted = None if not missing else (
            f"column(s) {', '.join(missing)} are not encrypted in its files, but encrypted_columns requires them: "
            "a run in reencrypt mode encrypts them")
        return self._finish_validation(result, detail, self._digest_finding("decrypts", result.digest, recorded),
                                       unconfirmed, self._below(census, min_version), unencrypted)

