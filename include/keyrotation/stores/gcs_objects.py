"""A dataset of arbitrary GCS objects under a customer-managed key (CMEK):
``gs://bucket/prefix/<partitioning>=<value>/<any name>``.

GCS encrypts these objects itself, with a data key wrapped by the Cloud KMS key, and each object's
``kmsKeyName`` names the CryptoKeyVersion that wraps it. Re-encrypting one is ``objects.rewrite``
of the object onto itself with ``destinationKmsKeyName`` set to the CryptoKey: GCS decrypts with
the old version and encrypts with the key's primary, and the body never leaves GCS. Large objects
take several rewrite calls (the ``rewriteToken`` loop).

The rewrite is conditional on the generation that the listing saw (``ifGenerationMatch`` and
``ifSourceGenerationMatch``): a writer that replaced the object in the meantime wins, GCS answers
412 and :class:`PartitionError` says the object changed. The destination keeps the source's
content headers, custom metadata and storage class, sent explicitly so that nothing depends on
how GCS fills in a partial resource.

The google-cloud-storage client is injected (from the google provider's connection in Airflow);
this module never creates credentials.
"""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import UTC, datetime
from typing import Any

from google.api_core import exceptions as gexc

from keyrotation.errors import KeyRotationError, PartitionError, PermissionDenied
from keyrotation.stores.objects import ObjectInfo, PartitionedObjectLayout

log = logging.getLogger(__name__)

_LOCATION = re.compile(r"^gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(?:/(.*))?$")
# Resource fields the destination of a rewrite carries over from the source.
_KEPT = ("contentType", "contentEncoding", "contentDisposition", "contentLanguage", "cacheControl", "metadata",
         "storageClass", "customTime")
DIGEST_CHUNK = 1024**2
MAX_REWRITE_CALLS = 10_000


class _Sha256Writer:
    """A file-like sink that hashes what is written to it, so a download streams into a digest."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return len(data)


def _info(blob: Any) -> ObjectInfo:
    updated = blob.updated or datetime.now(UTC)
    if updated.tzinfo is None:
        updated = updated.replace(tzinfo=UTC)
    return ObjectInfo(key=blob.name, size=int(blob.size or 0), kms_key_id=blob.kms_key_name or None,
                      last_modified=updated, etag=str(blob.generation))


class CmekObjectStore(PartitionedObjectLayout):
    """The objects under ``gs://bucket/prefix``, grouped by their ``<partitioning>=<value>/`` folder."""

    copy_mode = "gcs_rewrite"

    def __init__(self, client: Any, location: str, partitioning: str = "dt") -> None:
        """``client`` is a ``google.cloud.storage.Client``; ``location`` is ``gs://bucket[/prefix]``."""
        match = _LOCATION.match(location)
        if not match:
            raise PartitionError("*", f"dataset location {location!r} is not gs://<bucket>[/<prefix>]")
        self._init_layout(location, partitioning, match.group(2) or "")
        self.client = client
        self.bucket_name = match.group(1)
        self.bucket = client.bucket(self.bucket_name)

    # -- layout -------------------------------------------------------------------------------
    def _list(self, prefix: str, label: str, delimiter: str | None = None) -> tuple[list[Any], list[str]]:
        """Blobs (with their metadata) and, with a delimiter, folder prefixes under ``prefix``."""
        try:
            pages = self.client.list_blobs(self.bucket_name, prefix=prefix, delimiter=delimiter, page_size=1000)
            blobs = list(pages)
            return blobs, sorted(pages.prefixes) if delimiter else []
        except gexc.GoogleAPICallError as exc:
            raise self._error(exc, "objects.list", prefix, label) from None

    def _list_keys(self, prefix: str, label: str, delimiter: str | None = None) -> tuple[list[str], list[str]]:
        blobs, folders = self._list(prefix, label, delimiter)
        return [b.name for b in blobs], folders

    def objects(self, partition: str) -> list[ObjectInfo]:
        """Every object of a partition, sorted by name, from the listing (which names each one's key version)."""
        prefix = self._partition_prefix(partition)
        blobs, _ = self._list(prefix, partition)
        if not blobs:
            raise PartitionError(partition, f"no objects under gs://{self.bucket_name}/{prefix}")
        return [_info(b) for b in sorted(blobs, key=lambda b: b.name)]

    # -- objects ------------------------------------------------------------------------------
    def _blob(self, key: str) -> Any:
        self._check_inside(key)
        try:
            blob = self.bucket.get_blob(key)
        except gexc.GoogleAPICallError as exc:
            raise self._error(exc, "objects.get", key, self._label(key)) from None
        if blob is None:
            raise PartitionError(self._label(key), f"GCS object gs://{self.bucket_name}/{key} does not exist")
        return blob

    def head(self, key: str) -> ObjectInfo:
        return _info(self._blob(key))

    def digest(self, key: str) -> str:
        """SHA-256 (hex) of the object's body, streamed."""
        self._check_inside(key)
        sink = _Sha256Writer()
        try:
            self.client.download_blob_to_file(self.bucket.blob(key), sink)
        except gexc.GoogleAPICallError as exc:
            raise self._error(exc, "objects.get (media)", key, self._label(key)) from None
        return sink.sha.hexdigest()

    def reencrypt(self, key: str, kms_key_id: str) -> ObjectInfo:
        """Rewrite the object onto itself under the CryptoKey ``kms_key_id`` (GCS uses its primary version).

        Guarded by the generation seen here; if the object changed meanwhile, it is left alone and
        PartitionError says so.
        """
        source = self._blob(key)
        generation = source.generation
        destination = self.bucket.blob(key, kms_key_name=kms_key_id)
        for field in _KEPT:
            if source._properties.get(field) is not None:
                destination._properties[field] = source._properties[field]
        token, calls = None, 0
        try:
            while True:
                token, done, total = destination.rewrite(source, token=token, if_generation_match=generation,
                                                         if_source_generation_match=generation)
                calls += 1
                if token is None:
                    break
                if calls >= MAX_REWRITE_CALLS:
                    raise PartitionError(self._label(key), f"rewrite of gs://{self.bucket_name}/{key} not done after "
                                                           f"{calls} calls ({done}/{total} bytes)")
                log.debug("rewriting gs://%s/%s: %s/%s bytes", self.bucket_name, key, done, total)
        except gexc.GoogleAPICallError as exc:
            raise self._error(exc, "objects.rewrite", key, self._label(key)) from None
        return self.head(key)

    def _error(self, exc: gexc.GoogleAPICallError, action: str, key: str, label: str) -> KeyRotationError:
        where = f"gs://{self.bucket_name}/{key}"
        message = getattr(exc, "message", str(exc))
        if isinstance(exc, gexc.Forbidden | gexc.Unauthorized):
            return PermissionDenied(f"GCS {action} on {where} refused: {message} (the IAM bindings of the bucket or "
                                    "of the KMS key, for the GCS service agent, do not allow it)")
        if isinstance(exc, gexc.PreconditionFailed):
            return PartitionError(label, f"object {where} changed while being re-encrypted ({action}: 412); the new "
                                         "generation was left as written: re-run to re-encrypt it")
        if isinstance(exc, gexc.NotFound):
            return PartitionError(label, f"GCS {action}: object {where} does not exist")
        return PartitionError(label, f"GCS {action} on {where} failed: {type(exc).__name__}: {message}")
