"""The census: which master key versions protect which partitions, from key material and file tails.

The one place that answers "is any data still under an old version?"; the re-encryption
planner and the retirement gate both ask it. No data is decrypted: it reads each partition's
manifest and folder listing, each file's key material and the last bytes of each file (whether
it is encrypted at all). What it cannot prove is *blocking*: a partition whose key material names a
version the KMS does not have, cannot be parsed, or whose data file is missing or not encrypted is
listed in :attr:`Census.errors`; a file the manifest does not name is *unmanaged*, reported with
what protects it, and left in place.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from keyrotation.errors import BackendError, PartitionError
from keyrotation.formats.parquet_footer import FooterError, is_encrypted
from keyrotation.formats.parquet_pme import KEY_MATERIAL_PREFIX, KeyMaterial, ParquetEncryption, key_material_path
from keyrotation.stores.partitions import MANIFEST, PartitionStore

if TYPE_CHECKING:
    from keyrotation.census_cache import CensusCache
    from keyrotation.partition_engine import PartitionEngine


@dataclass(frozen=True)
class UnmanagedFile:
    """A file in a partition folder that the partition's manifest does not name.

    ``kind``: ``parquet`` (a data file), ``key_material`` (key material whose data file is absent) or
    ``other``. ``versions`` is empty when the file is not encrypted or its versions are unknown;
    ``problem`` says why its protection cannot be established, if so.
    """

    name: str
    kind: str
    encrypted: bool | None = None
    versions: frozenset[int] = frozenset()
    problem: str | None = None

    def blocks(self, min_version: int) -> str | None:
        """Why this file keeps versions below ``min_version`` from being retired; None if it does not."""
        if self.kind == "other":
            return None
        if self.problem:
            return f"{self.name}: {self.problem}"
        if self.kind == "parquet" and not self.encrypted:
            return f"{self.name}: not encrypted"
        if self.versions and min(self.versions) < min_version:
            return f"{self.name}: under v{min(self.versions)}"
        return None

    def describe(self) -> str:
        if self.kind == "other":
            return f"{self.name} (not a Parquet file)"
        if self.problem:
            return f"{self.name} ({self.problem})"
        if self.kind == "parquet" and not self.encrypted:
            return f"{self.name} (not encrypted)"
        versions = ", ".join(f"v{v}" for v in sorted(self.versions))
        return f"{self.name} ({'orphan key material, ' if self.kind == 'key_material' else ''}under {versions})"


@dataclass(frozen=True)
class PartitionCensus:
    partition: str
    versions: frozenset[int]
    written_under: int | None
    rows: int | None = None
    bytes: int | None = None
    #: What the partition is made of, counted: data files (Parquet), objects (S3, GCS) or data keys (SQL).
    units: int = 1
    generation: int | None = None
    #: The columns the manifest says the engine encrypted (None: not recorded, e.g. a foreign partition).
    encrypted_columns: frozenset[str] | None = None
    unmanaged: tuple[UnmanagedFile, ...] = ()
    #: Names an interrupted run of the engine left (staging), for the next run to remove.
    leftovers: tuple[str, ...] = ()
    #: sha256 over the live files' key material: a validation records it, the gate compares.
    material_digest: str | None = None

    @property
    def oldest(self) -> int:
        return min(self.versions)


@dataclass
class Census:
    dataset: str
    partitions: dict[str, PartitionCensus] = field(default_factory=dict)
    #: Blocking partitions: their protection cannot be established (unreadable, unknown version, ...).
    errors: dict[str, str] = field(default_factory=dict)
    #: The format whose proofs the retirement gate asks for (``parquet_pme``: KMS-confirmed versions and
    #: encrypted columns in each validation); empty for formats whose census the store itself answers.
    kind: str = ""
    #: The columns the key class's config requires encrypted (Parquet).
    required_columns: frozenset[str] = frozenset()

    def unmanaged_blocking(self, min_version: int) -> dict[str, list[str]]:
        """Unmanaged files that keep versions below ``min_version`` from being retired, per partition."""
        out: dict[str, list[str]] = {}
        for p in self.partitions.values():
            reasons = [r for f in p.unmanaged if (r := f.blocks(min_version))]
            if reasons:
                out[p.partition] = reasons
        return dict(sorted(out.items()))

    def by_version(self) -> dict[int, int]:
        """Partitions per oldest wrapping version."""
        return dict(sorted(Counter(p.oldest for p in self.partitions.values()).items()))

    def under(self, version: int) -> list[str]:
        """Partitions with any key wrapped by a version older than ``version``."""
        return sorted(p.partition for p in self.partitions.values() if p.oldest < version)

    def needing(self, version: int, mode: str) -> list[str]:
        """Partitions a re-encryption to ``version`` in ``mode`` still has to touch."""
        if mode == "reencrypt":
            return sorted(
                p.partition
                for p in self.partitions.values()
                if p.oldest < version or (p.written_under or 0) < version
            )
        return self.under(version)

    def coverage(self) -> dict[int, dict[str, int]]:
        """Partitions, rows and bytes per oldest wrapping version."""
        out: dict[int, dict[str, int]] = {}
        for p in self.partitions.values():
            row = out.setdefault(p.oldest, {"partitions": 0, "rows": 0, "bytes": 0})
            row["partitions"] += 1
            row["rows"] += p.rows or 0
            row["bytes"] += p.bytes or 0
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        return {
            "dataset": self.dataset,
            "partitions": len(self.partitions),
            "by_version": {f"v{v}": n for v, n in self.by_version().items()},
            "unreadable": len(self.errors),
            "blocking": len(self.errors),
            "unmanaged_files": sum(len(p.unmanaged) for p in self.partitions.values()),
        }

    def format(self) -> str:
        parts = ", ".join(f"v{v}: {n}" for v, n in self.by_version().items()) or "no partitions"
        line = f"census {self.dataset}: {len(self.partitions)} partitions ({parts})"
        if self.errors:
            line += f"; {len(self.errors)} blocking: " + "; ".join(
                f"{p}: {self.errors[p]}" for p in sorted(self.errors)[:5])
        unmanaged = [f"{p.partition}/{f.describe()}" for p in self.partitions.values() for f in p.unmanaged]
        if unmanaged:
            line += f"; {len(unmanaged)} unmanaged files (left in place): " + ", ".join(unmanaged[:10])
        return line


def _unmanaged_file(store: PartitionStore, pme: ParquetEncryption, partition: str, name: str,
                    listing: set[str], known: frozenset[int] | None) -> UnmanagedFile:
    path = store.path(partition, name)
    if name.startswith(KEY_MATERIAL_PREFIX) and name.endswith(".json"):
        data = name[len(KEY_MATERIAL_PREFIX):-len(".json")]
        kind, data_path = "key_material", store.path(partition, data)
        encrypted = None
    elif name.endswith(".parquet") and not name.startswith(("_", ".")):
        kind, data_path = "parquet", path
        try:
            encrypted = is_encrypted(path, store.fs)
        except (FooterError, OSError) as exc:
            return UnmanagedFile(name, kind, problem=f"not a readable Parquet file ({exc})")
        if not encrypted:
            return UnmanagedFile(name, kind, encrypted=False)
        if posixpath.basename(key_material_path(path)) not in listing:
            return UnmanagedFile(name, kind, True, problem="encrypted, and its key material is missing")
    else:
        return UnmanagedFile(name, "other")
    try:
        versions = frozenset(pme.wrapping_versions(data_path, store.fs))
    except (BackendError, OSError) as exc:
        return UnmanagedFile(name, kind, encrypted, problem=f"key material unreadable ({exc})")
    unknown = sorted(versions - known) if known is not None else []
    if unknown:
        return UnmanagedFile(name, kind, encrypted, versions,
                             problem=f"names version(s) {unknown} that the master key does not have")
    return UnmanagedFile(name, kind, encrypted, versions)


def partition_census(store: PartitionStore, pme: ParquetEncryption, partition: str,
                     known_versions: frozenset[int] | None = None,
                     materials: dict[str, KeyMaterial] | None = None,
                     found: dict[str, pafs.FileInfo] | None = None) -> PartitionCensus:
    """The census of one partition; raises PartitionError when its protection cannot be established.

    ``known_versions``: the versions the KMS has; a label outside them is blocking. ``materials``, if given,
    gets the key material read of each live file, by name (a rewrap that follows need not read it again).
    ``found``: the partition's folder as :meth:`PartitionStore.scan` listed it (else it is listed here).
    """
    if found is None:
        manifest = store.read_manifest(partition)
        listing = set(store.listing(partition))
    else:
        missing = pafs.FileInfo(store.path(partition, MANIFEST), pafs.FileType.NotFound)
        manifest = store.read_manifest(partition, found.get(MANIFEST, missing))
        listing = set(found)
    if manifest is not None:
        live = list(manifest.files)
    elif found is None:
        live = store.live_files(partition)
    else:
        live = store.data_files(partition, listing)
    versions: set[int] = set()
    material = hashlib.sha256()
    for name in live:
        path = store.path(partition, name)
        if name not in listing:
            material = posixpath.basename(key_material_path(path))
            raise PartitionError(partition, f"data file {name} named by the manifest is missing"
                                            + (" (its key material is still there)" if material in listing else ""))
        try:
            encrypted = is_encrypted(path, store.fs)
        except FooterError as exc:
            raise PartitionError(partition, f"cannot read {name}: {exc}") from None
        if not encrypted:
            raise PartitionError(partition, f"{name} is not encrypted (plain Parquet), but the dataset requires "
                                            "encryption")
        try:
            read = pme.key_material(path, store.fs)
        except FileNotFoundError:
            raise PartitionError(partition, f"{name} is encrypted but its key material is missing") from None
        versions |= pme.labels(read)
        material.update(f"{name}:{read.digest};".encode())
        if materials is not None:
            materials[name] = read
    unknown = sorted(versions - known_versions) if known_versions is not None else []
    if unknown:
        have = ", ".join(f"v{v}" for v in sorted(known_versions or ())) or "none"
        raise PartitionError(partition, f"key material names version(s) {unknown} that the master key "
                                        f"{pme.backend.key_ref!r} does not have (it has {have}): unknown key version")
    managed = {MANIFEST, *store.with_companions(live)}
    others = sorted(n for n in listing - managed if not store.is_staging(n))
    # The key material and side files of an unmanaged data file belong to that file's entry, not entries of their own.
    owned = {c for n in others for c in store.with_companions([n]) if c != n}
    others = [n for n in others if n not in owned]
    unmanaged = tuple(_unmanaged_file(store, pme, partition, n, listing, known_versions) for n in others)
    leftovers = tuple(sorted(n for n in listing if store.is_staging(n)))
    if manifest is None:
        return PartitionCensus(partition, frozenset(versions), None, units=len(live), unmanaged=unmanaged,
                               leftovers=leftovers, material_digest=material.hexdigest())
    columns = frozenset(manifest.encrypted_columns) if manifest.encrypted_columns is not None else None
    return PartitionCensus(partition, frozenset(versions), manifest.written_under_version, manifest.rows,
                           manifest.bytes, len(manifest.files), manifest.generation, columns, unmanaged, leftovers,
                           material.hexdigest())


def known_versions(pme: ParquetEncryption) -> frozenset[int]:
    """The versions the KMS has for the key class's master key (every label must be one of them)."""
    state = pme.backend.key_state()
    if state.versions:
        return frozenset(state.versions)
    return frozenset(range(max(1, state.min_available_version), state.latest_version + 1))


#: Partitions read at once by a census of a dataset on an object store (each read waits on the network).
CENSUS_THREADS = 16


def take_census(engine: PartitionEngine, partitions: list[str] | None = None, cache: CensusCache | None = None,
                reuse: bool = False) -> Census:
    """Census of every partition of ``engine``'s dataset (or of ``partitions``); a blocking partition is
    listed, not fatal.

    A census of every partition of a dataset its engine can list whole (:meth:`PartitionEngine.scan`) starts
    from that one listing, reads partitions concurrently where the store is remote, and keeps each partition's
    census in ``cache``; with ``reuse``, a partition whose fingerprint is unchanged is taken from the cache, not
    read (see :mod:`keyrotation.census_cache`: for plans and pages, never for a gate).
    """
    census = Census(engine.dataset, kind=engine.census_kind, required_columns=engine.required_columns())
    found = engine.scan() if partitions is None else None
    if found is None:
        for partition in partitions if partitions is not None else engine.list_partitions():
            try:
                census.partitions[partition] = engine.partition_census(partition)
            except engine.census_errors as exc:
                census.errors[partition] = str(exc)
        if partitions is None:
            census.errors.update(engine.strays())
        return census
    fingerprints: dict[str, str] = {}
    kept: dict[str, PartitionCensus] = {}
    if cache is not None:
        last = engine.ledger.last_partition_ids(engine.dataset)
        fingerprints = {p: engine.census_fingerprint(listing, last.get(p)) for p, listing in found.items()}
        kept = cache.lookup(engine.dataset, fingerprints)
    reused = {p: kept[p] for p in found if p in kept and engine.reusable(kept[p])} if reuse else {}

    def one(partition: str) -> PartitionCensus | str:
        try:
            return engine.partition_census(partition, found=found[partition])
        except engine.census_errors as exc:
            return str(exc)

    todo = [p for p in found if p not in reused]
    # The first partition alone: what an engine reads once (the KMS's versions) is read before the threads start.
    read = {p: one(p) for p in todo[:1]}
    threads = min(engine.census_threads, max(1, len(todo) - 1))
    if threads > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="census") as pool:
            read.update(zip(todo[1:], pool.map(one, todo[1:]), strict=True))
    else:
        read.update((p, one(p)) for p in todo[1:])
    for partition in found:
        result = reused.get(partition) or read[partition]
        if isinstance(result, str):
            census.errors[partition] = result
        else:
            census.partitions[partition] = result
    census.errors.update(engine.strays())
    if cache is not None:
        cache.keep(engine.dataset, {p: (fingerprints[p], c) for p, c in read.items()
                                    if not isinstance(c, str) and kept.get(p) != c})
        cache.forget(engine.dataset, [p for p, c in read.items() if isinstance(c, str) and p in kept])
    return census
