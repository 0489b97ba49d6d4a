"""A dataset of arbitrary S3 objects under SSE-KMS: ``s3://bucket/prefix/<partitioning>=<value>/<any key>``.

S3 encrypts these objects itself with a KMS key, so re-encrypting one is a server-side copy of the
object onto itself that names the new key. The plaintext never leaves S3; only :meth:`digest`
reads bodies, and it streams them. The boto3 S3 client is injected (from the amazon provider's
hook in Airflow); this module never creates credentials.

The copy is conditional on the ETag that HeadObject saw: ``CopySourceIfMatch`` on CopyObject and
on every UploadPartCopy, and ``IfMatch`` (S3 conditional writes) on CopyObject and
CompleteMultipartUpload. A writer that replaces the object in the meantime wins: S3 answers 412
PreconditionFailed (or 409 ConditionalRequestConflict), the copy or multipart upload is dropped
and :class:`PartitionError` says the object changed. A tag-only change between GetObjectTagging
and the end of a multipart copy does not change the ETag, so it is not detected there.

What real S3 does that this code relies on (AWS CopyObject documentation): ``MetadataDirective``
and ``TaggingDirective`` COPY keep the user metadata, the content headers (Content-Type,
-Encoding, -Disposition, -Language, Cache-Control, Expires) and the tags; the storage class is
*not* kept (the copy is STANDARD unless given), nor is the website redirect location, so both are
passed from HeadObject. On a versioned bucket the copy is a new version and the previous one
stays, still under the old key. The copy gets the bucket's default ACL.

moto 5.2.5 (moto_server, which the tests use) differs from S3:

* it ignores ``x-amz-copy-source-if-match`` on CopyObject and UploadPartCopy and ``If-Match`` on
  CopyObject and CompleteMultipartUpload: it copies whatever the object is at that moment and never
  answers 412. ``tests/test_s3_objects.py`` therefore evaluates those headers itself, in a botocore
  hook on its client that compares them with the object's current ETag on the server and raises the
  412 PreconditionFailed S3 documents. The race tests thus check this module's handling, not moto's,
  and the other copy tests check that the ETags sent are the right ones;
* it stores ``SSEKMSKeyId`` as the caller spelled it, where S3 always returns the key ARN (the
  tests use ARNs);
* its ETags are the MD5 of the body even under SSE-KMS, and a copy keeps the ETag; on S3 an SSE-KMS
  object's ETag is not its MD5 and changes with the copy. Nothing here compares ETags across a copy.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from datetime import UTC
from typing import Any
from urllib.parse import quote, urlencode

from botocore import xform_name
from botocore.exceptions import ClientError

from keyrotation.errors import KeyRotationError, PartitionError, PermissionDenied
from keyrotation.stores.objects import ObjectInfo, PartitionedObjectLayout

log = logging.getLogger(__name__)

MiB = 1024**2
GiB = 1024**3
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
MAX_COPY_SIZE = 5 * GiB  # the largest object one CopyObject can copy
LIST_PAGE_SIZE = 1000  # keys per ListObjectsV2 page (S3's maximum)
DIGEST_CHUNK = 1 * MiB

_LOCATION = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?$")
# Content headers HeadObject returns and CreateMultipartUpload takes under the same names.
_CONTENT_HEADERS = ("ContentType", "ContentEncoding", "ContentDisposition", "ContentLanguage", "CacheControl",
                    "Expires")
# "403" is what a refused HeadObject carries: a HEAD response has no error body.
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AccountProblem"}
_CHANGED_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


def _info(key: str, head: dict[str, Any]) -> ObjectInfo:
    modified = head["LastModified"]
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=UTC)
    kms_key_id = head.get("SSEKMSKeyId") if head.get("ServerSideEncryption") == "aws:kms" else None
    return ObjectInfo(key=key, size=head["ContentLength"], kms_key_id=kms_key_id, last_modified=modified,
                      etag=head["ETag"])


class SseKmsObjectStore(PartitionedObjectLayout):
    """The objects under ``s3://bucket/prefix``, grouped by their ``<partitioning>=<value>/`` folder."""

    copy_mode = "s3_copy"

    def __init__(self, client: Any, location: str, partitioning: str = "dt",
                 multipart_threshold: int = 5 * GiB, part_size: int = 512 * MiB) -> None:
        """``client`` is a boto3 S3 client; ``location`` is ``s3://bucket[/prefix]``.

        Objects larger than ``multipart_threshold`` bytes (at most 5 GiB, CopyObject's limit) are
        re-encrypted by a multipart copy in parts of ``part_size`` bytes (5 MiB to 5 GiB; larger if
        the object would otherwise need more than 10,000 parts).
        """
        match = _LOCATION.match(location)
        if not match:
            raise PartitionError("*", f"dataset location {location!r} is not s3://<bucket>[/<prefix>]")
        if not 0 <= multipart_threshold <= MAX_COPY_SIZE:
            raise ValueError(f"multipart_threshold must be between 0 and {MAX_COPY_SIZE} bytes")
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes")
        self._init_layout(location, partitioning, match.group(2) or "")
        self.client = client
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.bucket = match.group(1)

    # -- layout -------------------------------------------------------------------------------
    def objects(self, partition: str) -> list[ObjectInfo]:
        """Every object of a partition, sorted by key, each from HeadObject (which names its KMS key)."""
        prefix = self._partition_prefix(partition)
        keys, _ = self._list_keys(prefix, partition)
        if not keys:
            raise PartitionError(partition, f"no objects under s3://{self.bucket}/{prefix}")
        return [self.head(key) for key in sorted(keys)]

    # -- objects ------------------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo:
        """The object's size, KMS key, modification time and ETag."""
        return _info(key, self._head(key))

    def reencrypt(self, key: str, kms_key_id: str) -> ObjectInfo:
        """Copy the object onto itself under SSE-KMS with ``kms_key_id``; its HeadObject info afterwards.

        User metadata, content headers, tags and storage class are kept. Objects larger than
        ``multipart_threshold`` are copied in ``part_size`` parts; a failed multipart copy is
        aborted. If the object changed after HeadObject, it is left alone and PartitionError says so.
        """
        head = self._head(key)
        if head["ContentLength"] > self.multipart_threshold:
            self._copy_multipart(key, kms_key_id, head)
        else:
            self._copy(key, kms_key_id, head)
        return self.head(key)

    def digest(self, key: str) -> str:
        """SHA-256 (hex) of the object's body, streamed in chunks."""
        self._check_inside(key)
        body = self._call("GetObject", key, Bucket=self.bucket, Key=key)["Body"]
        sha = hashlib.sha256()
        try:
            for chunk in body.iter_chunks(DIGEST_CHUNK):
                sha.update(chunk)
        finally:
            body.close()
        return sha.hexdigest()

    # -- copies -------------------------------------------------------------------------------
    def _target(self, head: dict[str, Any], kms_key_id: str) -> dict[str, Any]:
        """Parameters of the new object that S3 would not carry over from the source."""
        params: dict[str, Any] = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key_id,
                                  "StorageClass": head.get("StorageClass", "STANDARD")}
        if "BucketKeyEnabled" in head:
            params["BucketKeyEnabled"] = head["BucketKeyEnabled"]
        if "WebsiteRedirectLocation" in head:
            params["WebsiteRedirectLocation"] = head["WebsiteRedirectLocation"]
        return params

    def _copy(self, key: str, kms_key_id: str, head: dict[str, Any]) -> None:
        etag = head["ETag"]
        self._call("CopyObject", key, Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                   CopySourceIfMatch=etag, IfMatch=etag, MetadataDirective="COPY", TaggingDirective="COPY",
                   **self._target(head, kms_key_id))

    def _copy_multipart(self, key: str, kms_key_id: str, head: dict[str, Any]) -> None:
        etag, size = head["ETag"], head["ContentLength"]
        part_size = max(self.part_size, math.ceil(size / MAX_PARTS))
        tags = self._call("GetObjectTagging", key, Bucket=self.bucket, Key=key)["TagSet"]
        create: dict[str, Any] = {"Metadata": head.get("Metadata", {}),
                                  **{name: head[name] for name in _CONTENT_HEADERS if name in head},
                                  **self._target(head, kms_key_id)}
        if tags:
            create["Tagging"] = urlencode([(t["Key"], t["Value"]) for t in tags], quote_via=quote)
        upload_id = self._call("CreateMultipartUpload", key, Bucket=self.bucket, Key=key, **create)["UploadId"]
        log.debug("re-encrypting s3://%s/%s (%d bytes) in %d parts", self.bucket, key, size,
                  math.ceil(size / part_size))
        try:
            parts = []
            for number, start in enumerate(range(0, size, part_size), start=1):
                end = min(start + part_size, size) - 1
                result = self._call("UploadPartCopy", key, Bucket=self.bucket, Key=key, UploadId=upload_id,
                                    PartNumber=number, CopySource={"Bucket": self.bucket, "Key": key},
                                    CopySourceRange=f"bytes={start}-{end}", CopySourceIfMatch=etag)
                parts.append({"PartNumber": number, "ETag": result["CopyPartResult"]["ETag"]})
            self._call("CompleteMultipartUpload", key, Bucket=self.bucket, Key=key, UploadId=upload_id,
                       MultipartUpload={"Parts": parts}, IfMatch=etag)
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as exc:
                log.warning("could not abort multipart upload %s of s3://%s/%s: %s", upload_id, self.bucket, key,
                            exc.response.get("Error", {}).get("Code", exc))
            raise

    # -- calls --------------------------------------------------------------------------------
    def _head(self, key: str) -> dict[str, Any]:
        self._check_inside(key)
        return self._call("HeadObject", key, Bucket=self.bucket, Key=key)

    def _call(self, action: str, key: str, **kwargs: Any) -> dict[str, Any]:
        try:
            return getattr(self.client, xform_name(action))(**kwargs)
        except ClientError as exc:
            raise self._error(exc, action, key, self._label(key)) from None

    def _list_keys(self, prefix: str, label: str, delimiter: str | None = None) -> tuple[list[str], list[str]]:
        """Keys and (with a delimiter) folder prefixes under ``prefix``, through every page."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix,
                                  "PaginationConfig": {"PageSize": LIST_PAGE_SIZE}}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        keys: list[str] = []
        folders: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                keys += [o["Key"] for o in page.get("Contents", [])]
                folders += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        except ClientError as exc:
            raise self._error(exc, "ListObjectsV2", prefix, label) from None
        return keys, folders

    def _error(self, exc: ClientError, action: str, key: str, label: str) -> KeyRotationError:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", "")
        where = f"s3://{self.bucket}/{key}"
        if code in _DENIED_CODES:
            return PermissionDenied(f"S3 {action} on {where} refused: {code}: {message} (the IAM policy, the "
                                    "bucket policy or the KMS key policy does not allow it)")
        if code in _CHANGED_CODES:
            return PartitionError(label, f"object {where} changed while being re-encrypted ({action}: {code}); "
                                         "the new version was left as written: re-run to re-encrypt it")
        if code in _MISSING_CODES:
            return PartitionError(label, f"S3 {action}: object {where} does not exist ({code})")
        return PartitionError(label, f"S3 {action} on {where} failed: {code}: {message}")
