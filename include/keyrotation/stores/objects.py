"""What the object engine needs of a store of objects that the cloud encrypts itself (S3 SSE-KMS,
GCS CMEK): each object's KMS key, a streamed digest of its body, and a server-side re-encryption."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from keyrotation.errors import PartitionError


@dataclass(frozen=True)
class ObjectInfo:
    """One object as the store describes it."""

    key: str  # full object key (name)
    size: int
    kms_key_id: str | None  # the KMS key (version) that protects it: an ARN on AWS, a CryptoKeyVersion on GCS
    last_modified: datetime  # tz-aware
    etag: str  # what a conditional re-encryption is guarded by: the ETag on S3, the generation on GCS


class EncryptedObjectStore(Protocol):
    """The objects under a location, grouped by their ``<partitioning>=<value>/`` folder."""

    location: str
    partitioning: str
    #: How the store re-encrypts, for the ledger: ``s3_copy`` or ``gcs_rewrite``.
    copy_mode: str

    def partition_of(self, key: str) -> str: ...

    def list_partitions(self) -> list[str]: ...

    def stray_keys(self) -> list[str]: ...

    def objects(self, partition: str) -> list[ObjectInfo]: ...

    def digest(self, key: str) -> str: ...

    def reencrypt(self, key: str, kms_key_id: str) -> ObjectInfo: ...


class PartitionedObjectLayout:
    """The keys of a dataset of objects under a prefix, grouped by ``<partitioning>=<value>/`` folders.

    Shared by the S3 and GCS stores, which supply :meth:`_list_keys` (names and, with a delimiter,
    folder prefixes under a prefix, through every page) and call :meth:`_init_layout`.
    """

    location: str
    partitioning: str
    root: str  # every key of the dataset starts with this ("" or "prefix/")

    def _init_layout(self, location: str, partitioning: str, prefix: str) -> None:
        if not partitioning or "/" in partitioning or "=" in partitioning:
            raise ValueError(f"partitioning {partitioning!r} must be a non-empty name without '/' or '='")
        self.location = location
        self.partitioning = partitioning
        prefix = prefix.strip("/")
        self.root = f"{prefix}/" if prefix else ""

    def _list_keys(self, prefix: str, label: str, delimiter: str | None = None) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    @property
    def _marker(self) -> str:
        return f"{self.root}{self.partitioning}="

    def partition_of(self, key: str) -> str:
        """The partition value of an object key; PartitionError if the key is in no partition folder."""
        if not key.startswith(self._marker) or "/" not in key[len(self._marker):]:
            raise PartitionError("*", f"object key {key!r} is not inside a {self.partitioning}=<value>/ folder "
                                      f"of {self.location}")
        return key[len(self._marker):].split("/", 1)[0]

    def list_partitions(self) -> list[str]:
        """Sorted values of the ``<partitioning>=<value>/`` folders directly under the prefix."""
        keys, folders = self._list_keys(self.root, "*", delimiter="/")
        if not keys and not folders:
            raise PartitionError("*", f"dataset location {self.location} holds no objects")
        return sorted({f[len(self._marker):-1] for f in folders if f.startswith(self._marker)})

    def stray_keys(self) -> list[str]:
        """Sorted keys under the prefix that are not inside a ``<partitioning>=<value>/`` folder."""
        keys, folders = self._list_keys(self.root, "*", delimiter="/")
        for folder in folders:
            if not folder.startswith(self._marker):
                keys += self._list_keys(folder, "*")[0]
        return sorted(keys)

    def _partition_prefix(self, partition: str) -> str:
        if not partition or "/" in partition:
            raise PartitionError(partition, "not a valid partition value")
        return f"{self._marker}{partition}/"

    def _check_inside(self, key: str) -> None:
        if not key.startswith(self.root) or key == self.root:
            raise PartitionError("*", f"object key {key!r} is outside the dataset {self.location}")

    def _label(self, key: str) -> str:
        try:
            return self.partition_of(key)
        except PartitionError:
            return "*"
