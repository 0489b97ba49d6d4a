"""The census: which master key versions protect which partitions, from key material alone.

The one place that answers "is any data still under an old version?"; the re-encryption
planner and the retirement gate both ask it. No data file is read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from keyrotation.errors import KeyRotationError
from keyrotation.formats.parquet_pme import ParquetEncryption
from keyrotation.stores.partitions import PartitionStore


@dataclass(frozen=True)
class PartitionCensus:
    partition: str
    versions: frozenset[int]
    written_under: int | None
    rows: int | None = None
    bytes: int | None = None
    files: int = 1

    @property
    def oldest(self) -> int:
        return min(self.versions)


@dataclass
class Census:
    dataset: str
    partitions: dict[str, PartitionCensus] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

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
        }

    def format(self) -> str:
        parts = ", ".join(f"v{v}: {n}" for v, n in self.by_version().items()) or "no partitions"
        line = f"census {self.dataset}: {len(self.partitions)} partitions ({parts})"
        if self.errors:
            line += f"; {len(self.errors)} unreadable: " + ", ".join(sorted(self.errors))
        return line


def partition_census(store: PartitionStore, pme: ParquetEncryption, partition: str) -> PartitionCensus:
    manifest = store.read_manifest(partition)
    versions: set[int] = set()
    for name in store.live_files(partition):
        versions |= pme.wrapping_versions(store.path(partition, name), store.fs)
    if manifest is None:
        return PartitionCensus(partition, frozenset(versions), None, files=len(store.live_files(partition)))
    return PartitionCensus(partition, frozenset(versions), manifest.written_under_version, manifest.rows,
                           manifest.bytes, len(manifest.files))


def take_census(dataset: str, store: PartitionStore, pme: ParquetEncryption,
                partitions: list[str] | None = None) -> Census:
    """Census of every partition (or of ``partitions``); an unreadable partition is listed, not fatal."""
    census = Census(dataset)
    for partition in partitions if partitions is not None else store.list_partitions():
        try:
            census.partitions[partition] = partition_census(store, pme, partition)
        except (KeyRotationError, OSError) as exc:
            census.errors[partition] = str(exc)
    return census
