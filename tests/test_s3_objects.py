"""SseKmsObjectStore against moto_server over HTTP: census, in-place re-encryption (single and multipart),
a writer racing the copy, bad locations and refused permissions.

moto 5.2.5 ignores the copy preconditions (``x-amz-copy-source-if-match``, ``If-Match``) where S3 answers
412 PreconditionFailed. :func:`s3_with_preconditions` evaluates them just before each request is sent,
against the object's current ETag on the server, and raises what S3 would (see the module docstring of
keyrotation.stores.s3_objects).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from urllib.parse import unquote

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from keyrotation.errors import PartitionError, PermissionDenied
from keyrotation.stores import s3_objects
from keyrotation.stores.s3_objects import SseKmsObjectStore
from keyrotation_dev.devserver import MotoServer

MiB = 1024**2
THREADS = 8
PREFIX = "datasets/events"
PARTITIONS = ["2024-01-01", "2024-01-02", "2024-01-03", "2024-02-29"]
# What a copy must keep, as HeadObject reports it.
KEPT = ("ContentLength", "Metadata", "ContentType", "ContentEncoding", "ContentDisposition", "ContentLanguage",
        "CacheControl", "Expires", "StorageClass", "ServerSideEncryption", "TagCount")


def s3_with_preconditions(moto: MotoServer):
    """An S3 client that refuses copies whose preconditions fail, as S3 does and moto does not.

    Before CopyObject, UploadPartCopy and CompleteMultipartUpload are sent, ``CopySourceIfMatch`` and
    ``IfMatch`` are compared with the object's ETag on the server; a mismatch raises the ClientError
    S3 answers with (412 PreconditionFailed). A missing ETag header goes unchecked, as on S3.
    """
    client, probe = moto.client("s3"), moto.client("s3")

    def check(params, model, **_):
        conditions = []
        if "CopySourceIfMatch" in params:  # the source object's ETag; botocore has made CopySource "bucket/key"
            bucket, key = unquote(params["CopySource"].split("?")[0]).split("/", 1)
            conditions.append(("CopySourceIfMatch", bucket, key))
        if "IfMatch" in params:  # the destination object's ETag (S3 conditional writes)
            conditions.append(("IfMatch", params["Bucket"], params["Key"]))
        for header, bucket, key in conditions:
            if params[header].strip('"') != probe.head_object(Bucket=bucket, Key=key)["ETag"].strip('"'):
                raise ClientError({"Error": {"Code": "PreconditionFailed", "Condition": header,
                                             "Message": "At least one of the pre-conditions you specified did not "
                                                        "hold"},
                                   "ResponseMetadata": {"HTTPStatusCode": 412}}, model.name)

    for operation in ("CopyObject", "UploadPartCopy", "CompleteMultipartUpload"):
        client.meta.events.register(f"before-parameter-build.s3.{operation}", check)
    return client


def new_bucket(s3) -> str:
    name = f"kr-{secrets.token_hex(6)}"
    s3.create_bucket(Bucket=name)
    return name


def kms_keys(moto: MotoServer, n: int = 2) -> list[str]:
    kms = moto.client("kms")
    return [kms.create_key(Description=f"s3-objects-test-{i}")["KeyMetadata"]["Arn"] for i in range(n)]


def tags_of(s3, bucket: str, key: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}


def kept(head: dict) -> dict:
    return {name: head.get(name) for name in KEPT}


def record_heads(client) -> dict[str, dict]:
    """The last HeadObject response the client received for each key (what the store saw)."""
    seen: dict[str, dict] = {}

    def remember_key(params, context, **_):
        context["test_head_key"] = params["Key"]

    def record(parsed, context, **_):
        seen[context["test_head_key"]] = parsed

    client.meta.events.register("before-parameter-build.s3.HeadObject", remember_key)
    client.meta.events.register("after-call.s3.HeadObject", record)
    return seen


def uploads_left(s3, bucket: str) -> list:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


@pytest.mark.slow
def test_thousand_objects_are_reencrypted_in_place_keeping_everything(moto, monkeypatch):
    monkeypatch.setattr(s3_objects, "LIST_PAGE_SIZE", 7)  # every listing below spans several pages
    # A plain client: the precondition emulation would add two requests per copy (the other tests use it).
    s3 = moto.client("s3", config=Config(max_pool_connections=THREADS))
    heads = record_heads(s3)
    bucket = new_bucket(s3)
    key_a, key_b = kms_keys(moto)
    expires = datetime(2031, 5, 17, 12, 0, tzinfo=UTC)

    def spec(i: int) -> tuple[str, bytes, dict]:
        partition = PARTITIONS[i % len(PARTITIONS)]
        folder = "nested/deeper/" if i % 3 else ""
        key = f"{PREFIX}/dt={partition}/{folder}obj-{i:04d}{' é' if i % 50 == 0 else ''}.json"
        body = json.dumps({"i": i, "pad": "x" * (i % 97)}).encode()
        extra: dict = {"Metadata": {"seq": str(i), "source": "census-test"},
                       "ContentType": "application/json" if i % 2 else "text/plain; charset=utf-8",
                       "Tagging": f"class=pii&seq={i}&note=a%20b"}
        if i % 10 == 0:
            extra |= {"ContentEncoding": "identity", "ContentDisposition": f'attachment; filename="{i}.json"',
                      "ContentLanguage": "en-GB", "CacheControl": "max-age=60", "Expires": expires,
                      "StorageClass": "STANDARD_IA"}
        return key, body, extra

    specs = [spec(i) for i in range(1000)]

    def put(item: tuple[str, bytes, dict]) -> None:
        key, body, extra = item
        s3.put_object(Bucket=bucket, Key=key, Body=body, ServerSideEncryption="aws:kms", SSEKMSKeyId=key_a, **extra)

    strays = [f"{PREFIX}/README.txt", f"{PREFIX}/dt=2024-01-09", f"{PREFIX}/misc/dt=2024-01-01/x.json",
              f"{PREFIX}/misc/y.json"]
    outside = ["other/dt=2024-01-01/z.json", "datasets/eventsXL/dt=2024-01-01/z.json"]
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(put, specs))
        for key in strays + outside:
            s3.put_object(Bucket=bucket, Key=key, Body=b"stray", ServerSideEncryption="aws:kms", SSEKMSKeyId=key_a)

        store = SseKmsObjectStore(s3, f"s3://{bucket}/{PREFIX}/")
        assert store.list_partitions() == PARTITIONS
        assert store.stray_keys() == sorted(strays)

        keys = [k for k, _, _ in specs]
        results = list(pool.map(lambda k: store.reencrypt(k, key_b), keys))
        assert [r.key for r in results] == keys and {r.kms_key_id for r in results} == {key_b}

        # A fresh census: what objects() reports, and the HeadObject responses it is built from.
        heads.clear()
        by_partition = dict(zip(PARTITIONS, pool.map(store.objects, PARTITIONS), strict=True))
        sample = [i for i in range(len(specs)) if i % 10 == 0]  # every kind of object, and the 'é' keys
        tags = dict(zip(sample, pool.map(lambda i: tags_of(s3, bucket, specs[i][0]), sample), strict=True))
        digests = dict(zip(sample, pool.map(lambda i: store.digest(specs[i][0]), sample), strict=True))

    for partition, infos in by_partition.items():
        assert [o.key for o in infos] == sorted(k for k in keys if f"/dt={partition}/" in k)
        assert all(store.partition_of(o.key) == partition for o in infos)
        assert {o.kms_key_id for o in infos} == {key_b}
        assert all(o.last_modified.tzinfo is not None and o.size > 0 and o.etag for o in infos)
    for i, (key, body, extra) in enumerate(specs):
        expected = {"ContentLength": len(body), "Metadata": extra["Metadata"], "ContentType": extra["ContentType"],
                    "ContentEncoding": extra.get("ContentEncoding"),
                    "ContentDisposition": extra.get("ContentDisposition"),
                    "ContentLanguage": extra.get("ContentLanguage"), "CacheControl": extra.get("CacheControl"),
                    "Expires": extra.get("Expires"), "StorageClass": extra.get("StorageClass"),
                    "ServerSideEncryption": "aws:kms", "TagCount": 3}
        assert heads[key]["SSEKMSKeyId"] == key_b and kept(heads[key]) == expected, key
        if i in sample:
            assert tags[i] == {"class": "pii", "seq": str(i), "note": "a b"}, key
            assert digests[i] == hashlib.sha256(body).hexdigest(), key
    # Strays and objects outside the prefix were not touched.
    for key in strays + outside:
        assert s3.head_object(Bucket=bucket, Key=key)["SSEKMSKeyId"] == key_a


def test_large_objects_are_copied_in_parts_keeping_everything(moto):
    s3 = s3_with_preconditions(moto)
    bucket = new_bucket(s3)
    key_a, key_b = kms_keys(moto)
    parts_copied = []
    s3.meta.events.register("after-call.s3.UploadPartCopy", lambda **kw: parts_copied.append(1))
    body = os.urandom(12 * MiB + 12345)
    key = f"{PREFIX}/dt=2024-03-01/big/blob.bin"
    s3.put_object(Bucket=bucket, Key=key, Body=body, ServerSideEncryption="aws:kms", SSEKMSKeyId=key_a,
                  Metadata={"owner": "team-x", "sha": "abc"}, ContentType="application/octet-stream",
                  ContentEncoding="identity", ContentDisposition="inline", ContentLanguage="de",
                  CacheControl="no-store", Expires=datetime(2030, 1, 1, tzinfo=UTC), StorageClass="STANDARD_IA",
                  Tagging="class=pii&owner=team%20x")
    before = s3.head_object(Bucket=bucket, Key=key)
    store = SseKmsObjectStore(s3, f"s3://{bucket}/{PREFIX}", multipart_threshold=6 * MiB, part_size=5 * MiB)

    info = store.reencrypt(key, key_b)

    after = s3.head_object(Bucket=bucket, Key=key)
    assert info.kms_key_id == after["SSEKMSKeyId"] == key_b and info.size == len(body)
    assert len(parts_copied) == 3 and after["ETag"].endswith('-3"')  # 5 + 5 + 2 MiB: the multipart path
    assert kept(after) == kept(before) and after["Metadata"] == {"owner": "team-x", "sha": "abc"}
    assert after["ContentType"] == "application/octet-stream" and after["StorageClass"] == "STANDARD_IA"
    assert tags_of(s3, bucket, key) == {"class": "pii", "owner": "team x"}
    assert store.digest(key) == hashlib.sha256(body).hexdigest()
    assert uploads_left(s3, bucket) == []

    # At the threshold, one CopyObject does it.
    small = f"{PREFIX}/dt=2024-03-01/exact.bin"
    s3.put_object(Bucket=bucket, Key=small, Body=body[: 6 * MiB], ServerSideEncryption="aws:kms", SSEKMSKeyId=key_a)
    assert store.reencrypt(small, key_b).kms_key_id == key_b
    assert len(parts_copied) == 3 and "-" not in s3.head_object(Bucket=bucket, Key=small)["ETag"]


def test_an_object_rewritten_after_head_is_not_clobbered(moto):
    s3 = s3_with_preconditions(moto)
    writer = moto.client("s3")
    bucket = new_bucket(s3)
    key_a, key_b = kms_keys(moto)
    key = f"{PREFIX}/dt=2024-01-01/race.json"
    s3.put_object(Bucket=bucket, Key=key, Body=b"old", ServerSideEncryption="aws:kms", SSEKMSKeyId=key_a)
    store = SseKmsObjectStore(s3, f"s3://{bucket}/{PREFIX}")

    def write_after_head(**_):  # a writer replaces the object between our HeadObject and CopyObject
        writer.put_object(Bucket=bucket, Key=key, Body=b"new", ServerSideEncryption="aws:kms", SSEKMSKeyId=key_a,
                          Metadata={"by": "writer"})

    s3.meta.events.register("after-call.s3.HeadObject", write_after_head, unique_id="race")
    with pytest.raises(PartitionError, match="changed while being re-encrypted") as caught:
        store.reencrypt(key, key_b)
    assert caught.value.partition == "2024-01-01" and key in str(caught.value)
    s3.meta.events.unregister("after-call.s3.HeadObject", unique_id="race")

    current = writer.get_object(Bucket=bucket, Key=key)
    assert current["Body"].read() == b"new" and current["Metadata"] == {"by": "writer"}
    assert current["SSEKMSKeyId"] == key_a
    # Re-run: the new version is re-encrypted.
    assert store.reencrypt(key, key_b).kms_key_id == key_b
    assert writer.get_object(Bucket=bucket, Key=key)["Body"].read() == b"new"


@pytest.mark.parametrize("moment", ["UploadPartCopy", "CompleteMultipartUpload"])
def test_a_multipart_copy_raced_by_a_writer_is_aborted(moto, moment):
    s3 = s3_with_preconditions(moto)
    writer = moto.client("s3")
    bucket = new_bucket(s3)
    key_a, key_b = kms_keys(moto)
    key = f"{PREFIX}/dt=2024-01-01/big.bin"
    s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(11 * MiB), ServerSideEncryption="aws:kms",
                  SSEKMSKeyId=key_a)
    new_body = os.urandom(7 * MiB)
    store = SseKmsObjectStore(s3, f"s3://{bucket}/{PREFIX}", multipart_threshold=6 * MiB, part_size=5 * MiB)
    # 11 MiB in 5 MiB parts: 3 parts. The writer strikes after part 1 (part 2's CopySourceIfMatch must
    # catch it) or after part 3 (CompleteMultipartUpload's IfMatch must catch it).
    strike_after = {"UploadPartCopy": 1, "CompleteMultipartUpload": 3}[moment]
    parts = []

    def writer_strikes(**_):
        parts.append(1)
        if len(parts) == strike_after:
            writer.put_object(Bucket=bucket, Key=key, Body=new_body, ServerSideEncryption="aws:kms",
                              SSEKMSKeyId=key_a)

    s3.meta.events.register("after-call.s3.UploadPartCopy", writer_strikes)
    with pytest.raises(PartitionError, match=f"changed while being re-encrypted \\({moment}: PreconditionFailed"):
        store.reencrypt(key, key_b)
    assert len(parts) == strike_after
    current = writer.get_object(Bucket=bucket, Key=key)
    assert current["Body"].read() == new_body and current["SSEKMSKeyId"] == key_a
    assert uploads_left(s3, bucket) == []  # the multipart upload was aborted


@pytest.mark.parametrize("location", ["gs://x/data", "s3://", "s3:///data", "bucket/data", "s3://Bad_Bucket/x",
                                      "s3://ab", ""])
def test_a_bad_location_is_named(moto, location):
    with pytest.raises(PartitionError, match="is not s3://<bucket>") as caught:
        SseKmsObjectStore(moto.client("s3"), location)
    assert caught.value.partition == "*" and repr(location) in str(caught.value)


def test_missing_partitions_buckets_keys_and_datasets_are_named(moto):
    s3 = moto.client("s3")
    bucket = new_bucket(s3)
    key = f"{PREFIX}/dt=2024-01-01/a.json"
    s3.put_object(Bucket=bucket, Key=key, Body=b"{}")
    store = SseKmsObjectStore(s3, f"s3://{bucket}/{PREFIX}")
    assert store.list_partitions() == ["2024-01-01"] and store.stray_keys() == []
    assert store.head(key).kms_key_id is None  # not SSE-KMS

    with pytest.raises(PartitionError, match=f"no objects under s3://{bucket}/{PREFIX}/dt=2099-01-01/") as caught:
        store.objects("2099-01-01")
    assert caught.value.partition == "2099-01-01"
    with pytest.raises(PartitionError, match="does not exist"):
        store.head(f"{PREFIX}/dt=2024-01-01/missing.json")
    with pytest.raises(PartitionError, match="outside the dataset"):
        store.reencrypt("elsewhere/dt=2024-01-01/a.json", "arn:aws:kms:us-east-1:123456789012:key/x")
    with pytest.raises(PartitionError, match="not inside a dt=<value>/ folder"):
        store.partition_of(f"{PREFIX}/README.txt")
    with pytest.raises(PartitionError, match="holds no objects"):
        SseKmsObjectStore(s3, f"s3://{bucket}/nothing-here").list_partitions()
    with pytest.raises(PartitionError, match="NoSuchBucket") as caught:
        SseKmsObjectStore(s3, f"s3://{bucket}-missing/{PREFIX}").list_partitions()
    assert caught.value.partition == "*"
    with pytest.raises(ValueError, match="part_size"):
        SseKmsObjectStore(s3, f"s3://{bucket}", part_size=MiB)


def test_refused_permissions_raise_permission_denied(tmp_path):
    """moto_server enforcing IAM: a role that may read objects but not list or write them."""
    # The first five requests (the setup below) are let through unauthenticated; all later ones are checked.
    with MotoServer(log_path=str(tmp_path / "moto.log"), env={"INITIAL_NO_AUTH_ACTION_COUNT": "5"}) as server:
        iam, admin = server.client("iam"), server.client("s3")
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "*"}]}))
        access = iam.create_access_key(UserName="reader")["AccessKey"]
        admin.create_bucket(Bucket="kr-denied")
        key = f"{PREFIX}/dt=2024-01-01/a.json"
        admin.put_object(Bucket="kr-denied", Key=key, Body=b"secret-content")
        reader = server.client("s3", aws_access_key_id=access["AccessKeyId"],
                               aws_secret_access_key=access["SecretAccessKey"])
        store = SseKmsObjectStore(reader, f"s3://kr-denied/{PREFIX}")

        assert store.head(key).size == len(b"secret-content")
        assert store.digest(key) == hashlib.sha256(b"secret-content").hexdigest()
        with pytest.raises(PermissionDenied, match=f"ListObjectsV2 on s3://kr-denied/{PREFIX}/ refused"):
            store.list_partitions()
        with pytest.raises(PermissionDenied, match=f"CopyObject on s3://kr-denied/{key} refused") as caught:
            store.reencrypt(key, "arn:aws:kms:us-east-1:123456789012:key/x")
        assert "secret-content" not in str(caught.value)
