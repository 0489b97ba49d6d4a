"""A partitioned dataset on a pyarrow filesystem: ``<root>/dt=YYYY-MM-DD/part-NNNNN.parquet``.

Each partition directory holds a manifest, ``_PARTITION.json``, that names the partition's live
data files. Writing the manifest (to a temporary name, then a rename) is the single commit point
of a re-encryption, so a reader that follows the manifest always sees one consistent generation
of files, whatever point a writer crashed at. :meth:`PartitionStore.clean` removes only what the
engine wrote and no longer needs: names its staging produces, and files the caller (the engine, from
the ledger) knows as earlier generations of the partition. Any other file not named by the manifest is
*unmanaged*: listed by :meth:`PartitionStore.unmanaged`, reported by the census, never removed.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs

from keyrotation.errors import PartitionError
from keyrotation.formats import hadoop_crc
from keyrotation.formats.parquet_pme import KEY_MATERIAL_PREFIX, TEMP_MATERIAL_PREFIX, key_material_path
from keyrotation.stores.filesystems import Storage

MANIFEST = "_PARTITION.json"
STAGING_PREFIX = ".staging-"
# A staged file, its key material, and re-wrapped key material before its rename.
_STAGING_NAMES = (STAGING_PREFIX, KEY_MATERIAL_PREFIX + STAGING_PREFIX, TEMP_MATERIAL_PREFIX + KEY_MATERIAL_PREFIX)
GENERATION_NAME = re.compile(r"^part-(\d+)\.parquet$")


@dataclass
class Manifest:
    files: list[str]
    generation: int = 1
    rows: int | None = None
    bytes: int | None = None
    digest: str | None = None
    written_under_version: int | None = None
    #: The columns the engine encrypted when it wrote this generation (None: not written by the engine).
    encrypted_columns: list[str] | None = None
    extra: dict = field(default_factory=dict)


class PartitionStore:
    """A partitioned dataset at ``location`` (a local path or ``s3://bucket/prefix`` and other pyarrow
    filesystem URIs; ``storage`` supplies credentials). On object stores, where there is no rename,
    a move is a copy then a delete of one object: each copy is atomic, so the manifest stays the
    single commit point there too, and a crash leaves only names that :meth:`clean` removes."""

    def __init__(self, location: str, partitioning: str = "dt", storage: Storage | None = None) -> None:
        self.location = location
        self.partitioning = partitioning
        self.fs, self.root = (storage or Storage()).filesystem(location)

    # -- layout -------------------------------------------------------------------------------
    def partition_dir(self, partition: str) -> str:
        return posixpath.join(self.root, f"{self.partitioning}={partition}")

    def path(self, partition: str, name: str) -> str:
        return posixpath.join(self.partition_dir(partition), name)

    def require_root(self) -> None:
        info = self.fs.get_file_info(self.root)
        if info.type != pafs.FileType.Directory:
            raise PartitionError("*", f"dataset location {self.location} does not exist or is not a directory")

    def list_partitions(self) -> list[str]:
        self.require_root()
        prefix = f"{self.partitioning}="
        names = {
            posixpath.basename(i.path)
            for i in self.fs.get_file_info(pafs.FileSelector(self.root))
            if i.type == pafs.FileType.Directory
        }
        if isinstance(self.fs, pafs.GcsFileSystem):
            # pyarrow's GCS listing shows a folder only where a folder marker object exists (GCS itself
            # has none): derive the partition folders from the object names as well.
            root = self.root.rstrip("/") + "/"
            for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True)):
                rest = info.path[len(root):] if info.path.startswith(root) else ""
                if "/" in rest:
                    names.add(rest.split("/", 1)[0])
        return sorted(n[len(prefix):] for n in names if n.startswith(prefix))

    def scan(self) -> dict[str, dict[str, pafs.FileInfo]]:
        """Every partition's folder listing, by partition, each name with its size and modification time, from
        one recursive listing of the dataset root: on an object store a LIST request per thousand objects
        instead of requests per partition. Names as :meth:`listing` gives them (a sub-folder by its name)."""
        self.require_root()
        root = self.root.rstrip("/") + "/"
        prefix = f"{self.partitioning}="
        out: dict[str, dict[str, pafs.FileInfo]] = {}
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True)):
            rest = info.path[len(root):] if info.path.startswith(root) else ""
            folder, _, inner = rest.partition("/")
            if not folder.startswith(prefix):
                continue
            names = out.setdefault(folder[len(prefix):], {})
            if inner:
                name, _, deeper = inner.partition("/")
                if not deeper:
                    names[name] = info
                elif name not in names:  # an object under a sub-folder the store does not list by itself
                    names[name] = pafs.FileInfo(f"{root}{folder}/{name}", pafs.FileType.Directory)
        return dict(sorted(out.items()))

    def listing(self, partition: str) -> list[str]:
        directory = self.partition_dir(partition)
        info = self.fs.get_file_info(directory)
        if info.type != pafs.FileType.Directory:
            raise PartitionError(partition, f"partition directory {directory} does not exist")
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(pafs.FileSelector(directory)))

    # -- manifest -----------------------------------------------------------------------------
    def read_manifest(self, partition: str, info: pafs.FileInfo | None = None) -> Manifest | None:
        """The partition's manifest, None if it has none; ``info``: the manifest as a listing found it (not
        asked for again)."""
        path = self.path(partition, MANIFEST)
        if info is None:
            info = self.fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return None
        try:
            with self.fs.open_input_stream(path) as stream:
                return Manifest(**json.loads(stream.read()))
        except (ValueError, TypeError) as exc:
            raise PartitionError(partition, f"manifest {path} is not valid: {exc}") from None

    def write_manifest(self, partition: str, manifest: Manifest) -> None:
        """Commit point: write to a temporary name, then rename over the manifest."""
        tmp = self.path(partition, f"{STAGING_PREFIX}{MANIFEST}")
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(json.dumps(asdict(manifest), indent=1, sort_keys=True).encode())
        self.fs.move(tmp, self.path(partition, MANIFEST))

    def live_files(self, partition: str) -> list[str]:
        """The partition's data files: those in the manifest, else every visible ``*.parquet``."""
        manifest = self.read_manifest(partition)
        if manifest is not None:
            return list(manifest.files)
        return self.data_files(partition, self.listing(partition))

    @staticmethod
    def data_files(partition: str, names: list[str] | set[str]) -> list[str]:
        """The visible ``*.parquet`` files among a partition folder's ``names`` (its data files when it has no
        manifest), sorted; raises PartitionError when there are none."""
        files = sorted(n for n in names if n.endswith(".parquet") and not n.startswith((".", "_")))
        if not files:
            raise PartitionError(partition, "partition holds no Parquet files")
        return files

    def next_generation(self, partition: str) -> int:
        manifest = self.read_manifest(partition)
        gens = [int(m.group(1)) for n in self.listing(partition) if (m := GENERATION_NAME.match(n))]
        return max([manifest.generation if manifest else 0, *gens]) + 1

    @staticmethod
    def with_companions(files: list[str] | set[str]) -> set[str]:
        """Data files with their key material and, where Hadoop wrote the files (Spark on a local filesystem),
        the checksum side file of each: what belongs to the data files and goes with them."""
        names = {*files, *(posixpath.basename(key_material_path(f)) for f in files)}
        return names | {hadoop_crc.side_file_name(n) for n in names}

    @classmethod
    def _managed(cls, manifest: Manifest) -> set[str]:
        return {MANIFEST, *cls.with_companions(manifest.files)}

    @staticmethod
    def is_staging(name: str) -> bool:
        """A name only the engine's staging produces (a file being written, key material being re-wrapped)."""
        return name.startswith(_STAGING_NAMES)

    def unmanaged(self, partition: str, manifest: Manifest | None = None) -> list[str]:
        """Files in the partition folder that its manifest does not name, staging names aside."""
        manifest = manifest or self.read_manifest(partition)
        if manifest is None:
            return []
        keep = self._managed(manifest)
        return [n for n in self.listing(partition) if n not in keep and not self.is_staging(n)]

    def clean(self, partition: str, earlier_generations: set[str] = frozenset()) -> list[str]:
        """Remove what an interrupted run of the engine left: staging names, and the files of
        ``earlier_generations`` (names the ledger records for this partition) that the manifest no
        longer names, with their key material and Hadoop checksum side files. Nothing else is touched."""
        manifest = self.read_manifest(partition)
        if manifest is None:
            return []
        keep = self._managed(manifest)
        known = self.with_companions(earlier_generations)
        removed = []
        for name in self.listing(partition):
            if name not in keep and (self.is_staging(name) or name in known):
                self.fs.delete_file(self.path(partition, name))
                removed.append(name)
        return removed

    def size(self, partition: str, files: list[str]) -> int:
        return sum(self.fs.get_file_info(self.path(partition, f)).size or 0 for f in files)
