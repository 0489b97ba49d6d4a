"""Re-encryption of objects that the cloud encrypts itself, partition by partition: S3 objects under
SSE-KMS and GCS objects under a customer-managed key (CMEK). What follows says S3; on GCS the
object's ``kmsKeyName`` names its CryptoKeyVersion, the copy is ``objects.rewrite`` with the key as
``destinationKmsKeyName`` (GCS encrypts with its primary) guarded by the object's generation.

The object's ``SSEKMSKeyId`` names the KMS key that protects it, and with the alias strategy each
key is one version of the key class, so the census needs only ``HeadObject``. Re-encryption is
S3's in-place copy with the new key (multipart above 5 GB): S3 decrypts with the old key and
encrypts with a new data key under the new one, and the body never leaves S3. Each object is read
before (proving the old key still decrypts it) and after (the new one does), and the partition's
digest, over every object's SHA-256, must match; the ledger keeps it for later validations.

Objects need no staging or manifest: each copy is atomic, so a crash leaves every object whole,
under either key, and a re-run picks up the ones still under an old version.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from keyrotation import ledger as lg
from keyrotation.backends.base import KmsBackend
from keyrotation.census import PartitionCensus
from keyrotation.errors import PartitionError, ValidationError
from keyrotation.ledger import Ledger, RunContext
from keyrotation.partition_engine import PartitionEngine, PartitionResult
from keyrotation.stores.objects import EncryptedObjectStore, ObjectInfo

log = logging.getLogger(__name__)
COPY_THREADS = 8
STRAY = "(outside partitions)"


class ObjectEngine(PartitionEngine):
    """Census, re-encryption and validation of one ``sse_kms_objects`` or ``gcs_cmek_objects`` dataset."""

    holders = "objects"

    def __init__(self, key_class: str, dataset: str, store: EncryptedObjectStore, backend: KmsBackend,
                 ledger: Ledger, ctx: RunContext | None = None) -> None:
        self.key_class = key_class
        self.dataset = dataset
        self.store = store
        self.backend = backend
        self.ledger = ledger
        self.ctx = ctx or RunContext()
        self._versions: dict[str, int | None] = {}

    # -- census -------------------------------------------------------------------------------
    def version_of(self, info: ObjectInfo) -> int:
        """The key class version whose KMS key protects the object; PartitionError if none does."""
        if not info.kms_key_id:
            raise PartitionError(self.store.partition_of(info.key),
                                 f"object {info.key} is not encrypted with a KMS key (SSE-KMS or CMEK), so no key "
                                 "version protects it")
        if info.kms_key_id not in self._versions:
            self._versions[info.kms_key_id] = self.backend.version_of_key_id(info.kms_key_id)
        version = self._versions[info.kms_key_id]
        if version is None:
            raise PartitionError(self.store.partition_of(info.key),
                                 f"object {info.key} is encrypted with KMS key {info.kms_key_id}, which is not a "
                                 f"version of key class {self.key_class} ({self.backend.key_ref})")
        return version

    def list_partitions(self) -> list[str]:
        return self.store.list_partitions()

    def partition_census(self, partition: str, objects: list[ObjectInfo] | None = None) -> PartitionCensus:
        objects = objects if objects is not None else self.store.objects(partition)
        versions = frozenset(self.version_of(o) for o in objects)
        return PartitionCensus(partition, versions, None, rows=None, bytes=sum(o.size for o in objects),
                               units=len(objects))

    def strays(self) -> dict[str, str]:
        """Objects outside the partition folders: they make the census incomplete."""
        strays = self.store.stray_keys()
        if not strays:
            return {}
        return {STRAY: f"{len(strays)} objects outside the {self.store.partitioning}= folders, not re-encrypted by "
                       "keyrotation: " + ", ".join(strays[:5])}

    # -- operations ---------------------------------------------------------------------------
    def _digest(self, objects: list[ObjectInfo], pool: ThreadPoolExecutor) -> str:
        """SHA-256 over each object's key and body digest: reading a body proves its key decrypts it."""
        digests = dict(zip([o.key for o in objects], pool.map(self.store.digest, [o.key for o in objects]),
                           strict=True))
        lines = "".join(f"{key}\t{digests[key]}\n" for key in sorted(digests))
        return hashlib.sha256(lines.encode()).hexdigest()

    def _process(self, partition: str, target_version: int, mode: str) -> PartitionResult:
        """Copy every object of ``partition`` not yet under ``target_version`` onto itself with its key.

        Both modes are the same for objects: S3's copy, which always re-encrypts the data with a new data key.
        """
        start = time.monotonic()
        objects = self.store.objects(partition)
        before = self.partition_census(partition, objects)
        stale = [o for o in objects if self.version_of(o) < target_version]
        with ThreadPoolExecutor(COPY_THREADS) as pool:
            digest = self._digest(objects, pool)
            if not stale:
                return self._reconcile(PartitionResult(partition, "up_to_date", before.oldest, before.oldest, None,
                                                       before.bytes, digest, time.monotonic() - start,
                                                       objects=before.units), {"objects": before.units})
            recorded = self._recorded_digest(partition)
            if recorded and recorded != digest:
                raise ValidationError(partition, f"objects do not match their recorded digest {recorded}; "
                                                 "partition left untouched")
            key_arn = self.backend.key_id_of(target_version)
            list(pool.map(lambda o: self.store.reencrypt(o.key, key_arn), stale))
            after = self.store.objects(partition)
            census = self.partition_census(partition, after)
            if census.versions != {target_version}:
                raise PartitionError(partition, f"after the copy the objects are under {sorted(census.versions)}, "
                                                f"expected only v{target_version}")
            if self._digest(after, pool) != digest:
                raise ValidationError(partition, "objects read back after the copy do not match the digest taken "
                                                 "before it")
        result = PartitionResult(partition, "reencrypted", before.oldest, target_version, None, census.bytes, digest,
                                 time.monotonic() - start, objects=len(after))
        self._record(lg.PARTITION_REENCRYPTED, result, detail={"mode": self.store.copy_mode, "objects": len(stale)})
        return result

    def _validate(self, partition: str, min_version: int | None) -> PartitionResult:
        """Read every object of the partition and compare the digest with the one in the ledger."""
        start = time.monotonic()
        objects = self.store.objects(partition)
        census = self.partition_census(partition, objects)
        with ThreadPoolExecutor(COPY_THREADS) as pool:
            digest = self._digest(objects, pool)
        recorded = self._recorded_digest(partition)
        result = PartitionResult(partition, "validated", census.oldest, max(census.versions), None, census.bytes,
                                 digest, time.monotonic() - start, objects=len(objects))
        never = "no digest on record: the partition was never re-encrypted by keyrotation" if recorded is None else None
        return self._finish_validation(result, None, never, self._digest_finding("objects read", digest, recorded),
                                       self._below(census, min_version))
