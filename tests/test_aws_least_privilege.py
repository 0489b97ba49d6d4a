"""Least privilege on AWS, enforced by moto_server's IAM: each role's IAM user (with the document from
``keyrotation.policies.aws_kms`` attached) can do its part and is refused the rest.

The server is this module's own ``moto_server`` started with ``INITIAL_NO_AUTH_ACTION_COUNT=3``: moto
lets the first 3 requests through unauthenticated (they create an admin IAM user, give it ``*`` and an
access key) and from then on checks every request's signature against the IAM users and evaluates
their policies. Everything else, setup included, runs as IAM users; the "testing" root key is refused.

WHAT MOTO 5.2.5 DOES NOT ENFORCE (read in moto/iam/access_control.py, moto/iam/policy_conditions.py,
moto/core/authorization.py, moto/core/responses.py, moto/kms/), and so what this test does not prove:

1. KMS resources. Every KMS request is authorised against the resource "*" (KmsResponse has no
   ``_determine_resource``), and a statement's Resource pattern must match that string, so a statement
   scoped to ``arn:aws:kms:...:key/*`` or to an alias ARN never applies: with the exact documents moto
   refuses every KMS call but ListAliases and CreateKey (whose resource is "*" on AWS too). The users
   therefore get ``moto_view(document)``: the same document with the Resource of its KMS-only
   statements replaced by "*" (and item 3). S3 statements are attached unchanged. Not tested here:
   that a role cannot use **another key class's key** (moto lets it, see ``test_what_moto_does_not_enforce``)
   and that alias changes are limited to ``alias/customer-pii`` and ``alias/customer-pii/*``;
   ``test_documents_are_scoped`` checks those statically instead, and the backend tests replay the
   package's own requests against the exact documents (below).
2. Condition keys. For identity policies moto evaluates no Condition at all (it passes no request
   context; only trust policies see ``sts:ExternalId``): ``aws:ResourceTag/keyrotation:key-class``,
   ``aws:RequestTag/keyrotation:key-class``, ``aws:TagKeys``, ``s3:prefix``, the kind of key CreateKey
   may ask for (``kms:KeySpec``, ``kms:KeyUsage``, ``kms:KeyOrigin``, ``kms:MultiRegion``,
   ``kms:BypassPolicyLockoutSafetyCheck``) and ``kms:ScheduleKeyDeletionPendingWindowInDays`` are ignored.
   So moto lets a role list **another prefix of the same bucket** (ListBucket), lets rotate create or tag
   a key with **another class's tag** or of **another kind**, and lets retire schedule a deletion with a
   shorter waiting period than the key class's. Object-level access to another prefix (GetObject, PutObject,
   DeleteObject) and anything on another bucket are enforced, by resource ARN, and tested.
3. ReEncrypt is authorised as ``kms:ReEncrypt`` (the API name), not as AWS's ``kms:ReEncryptFrom`` on
   the source key plus ``kms:ReEncryptTo`` on the destination key: ``moto_view`` adds ``kms:ReEncrypt``
   to a statement that allows both.
4. Key policies (only a key policy Deny of kms:DescribeKey on "*" is honoured, for every principal) and
   implied permissions: CreateKey with Tags needing kms:TagResource, CreateAlias/UpdateAlias needing
   the permission on the key(s) as well as on the alias, CopyObject needing GetObject on the source,
   SSE-KMS object reads needing kms:Decrypt.
5. Refusals of KMS calls come back as IAM's XML error body with HTTP 403, which botocore's JSON parser
   reports as Code "403": ``refusal()`` reads the code and message from the XML. A refused HeadObject
   is a bare 403 (no body, as on AWS).
6. HeadBucket is authorised as ``s3:HeadBucket`` (no such IAM action; AWS checks ``s3:ListBucket`` with no
   ``s3:prefix``): ``moto_view`` adds it to a ListBucket statement whose condition passes a request
   without a prefix, the one statement that lets HeadBucket through on AWS.
7. moto answers a missing object 404 whenever GetObject is allowed. S3 answers 404 only to a caller that
   may also s3:ListBucket, checked with the key as ``s3:prefix``, and 403 to anyone else (which pyarrow
   reports as an error where it expects "not found", e.g. when it heads the dataset root).

THE BACKEND TESTS (``test_*_role_*`` below) run the package itself as each role: ``AwsKmsBackend`` on a
boto3 KMS client, and a ``KeyClassRuntime`` whose Parquet datasets live in S3 through pyarrow's
S3FileSystem, for key classes of their own (alias ``alias/<name>``, dataset ``s3://keyrotation-data/<name>``,
users holding ``moto_view`` of the documents rendered for that class). moto decides every request. Then,
for what moto does not evaluate (items 1, 2, 3, 6, 7), ``assert_documents_decide_like_moto`` replays every
request those runs sent (KMS: recorded by botocore event hooks, with the key each one resolved to; S3: read
from moto's request log) against the exact documents with ``allows()``, a reading of IAM for the few
operators the documents use, and requires the same decision: allowed where moto allowed, refused where moto
refused. Still not evaluated anywhere: the key an UpdateAlias moves the alias away from, and the source
object of a CopyObject (pyarrow's move), which sits under the same prefix as its destination.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests
from botocore.exceptions import ClientError

from helpers import customers
from keyrotation.backends.aws_kms import AwsKmsBackend
from keyrotation.config import KeyClassConfig
from keyrotation.errors import BackendError, PermissionDenied
from keyrotation.ledger import Ledger, RunContext
from keyrotation.policies.aws_kms import ROLES, aws_policy
from keyrotation.retirement import retire
from keyrotation.rotation import update_reference
from keyrotation.runtime import KeyClassRuntime
from keyrotation.stores.filesystems import AwsCredentials, Storage
from keyrotation.stores.partitions import MANIFEST
from keyrotation_dev.devserver import MotoServer

ROOT = Path(__file__).resolve().parents[1]
KEY_CLASS, KEY_REF, REGION, ACCOUNT = "customer_pii", "alias/customer-pii", "us-east-1", "123456789012"
BUCKET, PREFIX, OTHER_PREFIX, OTHER_BUCKET = "keyrotation-data", "customers", "orders", "keyrotation-other"
TAG = "keyrotation:key-class"
KMS_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}"

# What each role may do, as IAM actions, written out independently of the module under test. ReEncrypt is
# checked as one call (item 3 above); "s3:GetObject (head)" is a HeadObject, which S3 authorises as GetObject.
ALLOWED = {
    "rotate": {"kms:DescribeKey", "kms:GetKeyRotationStatus", "kms:ListKeyRotations", "kms:RotateKeyOnDemand",
               "kms:EnableKeyRotation", "kms:CreateKey", "kms:TagResource", "kms:CreateAlias", "kms:UpdateAlias",
               "kms:ListAliases"},
    "reencrypt": {"kms:DescribeKey", "kms:ListAliases", "kms:ListKeyRotations", "kms:Encrypt", "kms:Decrypt",
                  "kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:GenerateDataKey", "s3:ListBucket", "s3:GetObject",
                  "s3:PutObject", "s3:DeleteObject", "s3:GetObjectTagging", "s3:PutObjectTagging",
                  "s3:AbortMultipartUpload"},
    "retire": {"kms:DescribeKey", "kms:ListAliases", "kms:ListKeyRotations", "kms:DisableKey",
               "kms:ScheduleKeyDeletion", "s3:ListBucket", "s3:GetObject"},
    "report": {"kms:DescribeKey", "kms:ListAliases", "kms:ListKeyRotations", "kms:GetKeyRotationStatus",
               "kms:ListResourceTags", "s3:ListBucket", "s3:GetObject"},
}
# Checks per role: 17 KMS operations on the class's key, 5 KMS and 1 IAM operation no role has, 8 S3
# operations on the dataset prefix, 3 on another prefix of the same bucket and 2 on another bucket.
EXPECTED_ALLOWED = {"rotate": 10, "reencrypt": 15, "retire": 8, "report": 8}
EXPECTED_DENIED = {"rotate": 26, "reencrypt": 21, "retire": 28, "report": 28}


DELETION_WINDOW_DAYS = 30  # the sample's aws.deletion_window_days: the retire role may ask no shorter wait


def sample_policy(role: str) -> dict[str, Any]:
    return aws_policy(role, key_class=KEY_CLASS, key_ref=KEY_REF, region=REGION, account=ACCOUNT,
                      buckets=[f"{BUCKET}/{PREFIX}"], deletion_window_days=DELETION_WINDOW_DAYS)


def _actions(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else list(action)


def moto_view(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` as moto can evaluate it (items 1, 3 and 6 at the top); S3 resources stay as they are."""
    view = copy.deepcopy(document)
    for statement in view["Statement"]:
        actions = _actions(statement)
        if all(a.startswith("kms:") for a in actions):
            statement["Resource"] = "*"
            if {"kms:ReEncryptFrom", "kms:ReEncryptTo"} <= set(actions):
                statement["Action"] = [*actions, "kms:ReEncrypt"]
        elif "s3:ListBucket" in actions and _holds(statement.get("Condition", {}), {}):
            statement["Action"] = [*actions, "s3:HeadBucket"]
    return view


# -- IAM as read here, for what moto does not evaluate -----------------------------------------------------------
def _like(pattern: str, value: str) -> bool:
    """IAM's wildcard match (``*`` any run of characters, ``?`` one), as in ARNs and StringLike."""
    return re.fullmatch(re.escape(pattern).replace(r"\*", ".*").replace(r"\?", "."), value) is not None


def _holds(conditions: dict[str, dict[str, Any]], context: dict[str, Any]) -> bool:
    """Whether a statement's Condition holds for a request ``context`` (key -> value, or a list for
    multivalued keys); only the operators the documents use."""
    for operator, keys in conditions.items():
        for key, wanted in keys.items():
            wanted = [wanted] if isinstance(wanted, str) else list(wanted)
            value = context.get(key)
            qualifier, _, base = operator.rpartition(":")
            base, if_exists = base.removesuffix("IfExists"), base.endswith("IfExists")
            assert base in ("StringEquals", "StringLike", "Null", "Bool", "NumericGreaterThanEquals"), \
                f"operator {operator} is not read here"

            def match(v: str, base: str = base, wanted: list[str] = wanted) -> bool:
                if base == "NumericGreaterThanEquals":
                    return any(float(v) >= float(w) for w in wanted)
                if base == "Bool":
                    return str(v).lower() in wanted
                return v in wanted if base == "StringEquals" else any(_like(w, v) for w in wanted)

            if base == "Null":
                ok = (value is None) == (wanted == ["true"])
            elif qualifier == "ForAllValues":
                ok = all(match(v) for v in value or [])
            elif value is None:
                ok = if_exists
            else:
                ok = match(value)
            if not ok:
                return False
    return True


def allows(document: dict[str, Any], action: str, resource: str, context: dict[str, Any]) -> bool:
    """Whether the (Allow-only) ``document`` allows ``action`` on ``resource`` for a request ``context``."""
    for statement in document["Statement"]:
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if (statement["Effect"] == "Allow" and action in _actions(statement)
                and any(_like(r, resource) for r in resources) and _holds(statement.get("Condition", {}), context)):
            return True
    return False


def refusal(exc: ClientError) -> tuple[int, str, str]:
    """(HTTP status, error code, message) of a refused call, reading moto's XML body on KMS calls."""
    error = exc.response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message", "")
    if "<Code>" in message:
        code = re.search(r"<Code>(.*?)</Code>", message).group(1)
        found = re.search(r"<Message>(.*?)</Message>", message)
        message = found.group(1) if found else ""
    return exc.response["ResponseMetadata"]["HTTPStatusCode"], code, message


@dataclass
class World:
    """What the admin set up: the server, the admin's clients, the keys, and each role's user."""

    server: MotoServer
    admin: dict[str, Any]
    key_id: str
    other_key_id: str
    ciphertext: bytes
    users: dict[str, dict[str, str]] = field(default_factory=dict)
    counter: itertools.count = field(default_factory=itertools.count)

    def credentials(self, access_key: dict[str, str]) -> dict[str, str]:
        return {"aws_access_key_id": access_key["AccessKeyId"], "aws_secret_access_key": access_key["SecretAccessKey"]}

    def clients(self, role: str) -> dict[str, Any]:
        creds = self.credentials(self.users[role])
        clients = {s: self.server.client(s, **creds) for s in ("kms", "s3", "iam")}
        return {**clients, "user": self.users[role]["UserName"]}

    def add_user(self, name: str, document: dict[str, Any]) -> dict[str, str]:
        iam = self.admin["iam"]
        iam.create_user(UserName=name)
        arn = iam.create_policy(PolicyName=name, PolicyDocument=json.dumps(document))["Policy"]["Arn"]
        iam.attach_user_policy(UserName=name, PolicyArn=arn)
        return iam.create_access_key(UserName=name)["AccessKey"]

    def class_key(self, key_class: str = KEY_CLASS) -> str:
        """A fresh key of ``key_class`` (for the checks that disable or delete one)."""
        return self.admin["kms"].create_key(Tags=[{"TagKey": TAG, "TagValue": key_class}])["KeyMetadata"]["KeyId"]

    def unique(self, stem: str) -> str:
        return f"{stem}-{next(self.counter)}"

    def log_mark(self) -> int:
        """The offset in moto's request log after every request made so far (found by a marker request)."""
        marker = f"/keyrotation-log-mark-{uuid.uuid4().hex}".encode()
        requests.head(self.server.url + marker.decode(), timeout=10)  # unsigned: refused, and logged
        log, deadline = Path(self.server.log_path), time.monotonic() + 10
        while (found := log.read_bytes().find(marker)) < 0:
            assert time.monotonic() < deadline, f"marker request not in {log}"
            time.sleep(0.02)
        return log.read_bytes().index(b"\n", found) + 1

    def s3_requests(self, since: int) -> list[S3Request]:
        """The S3 requests logged between ``since`` (a ``log_mark``) and now."""
        text = Path(self.server.log_path).read_bytes()[since:self.log_mark()].decode(errors="replace")
        out = []
        for line in text.splitlines():
            found = _LOGGED.search(re.sub(r"\x1b\[[0-9;]*m", "", line))
            if not found:
                continue
            method, target, status = found.groups()
            url = urlsplit(target)
            bucket, _, key = unquote(url.path).lstrip("/").partition("/")
            if bucket and not bucket.startswith(("keyrotation-log-mark-", "$extremelyunlikelytoexist$")):
                out.append(S3Request(method, bucket, key, parse_qs(url.query, keep_blank_values=True), int(status)))
        return out


# A request in moto_server's (werkzeug's) log; KMS and IAM requests are "POST /". pyarrow's first HeadBucket,
# of "$extremelyunlikelytoexist$", only probes which S3 implementation answers and is meant to fail.
_LOGGED = re.compile(r'"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


@dataclass(frozen=True)
class S3Request:
    method: str
    bucket: str
    key: str
    query: dict[str, list[str]]
    status: int


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    log = tmp_path_factory.mktemp("moto-iam") / "moto.log"
    with MotoServer(log_path=str(log), env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as server:
        root = server.client("iam")  # the 3 unauthenticated requests: an admin user, "*", an access key
        root.create_user(UserName="admin")
        root.put_user_policy(UserName="admin", PolicyName="admin", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        admin_key = root.create_access_key(UserName="admin")["AccessKey"]
        with pytest.raises(ClientError) as refused:  # enforcement is on: the root key is no IAM user's
            server.client("iam").list_users()
        assert refused.value.response["Error"]["Code"] == "InvalidClientTokenId"

        creds = {"aws_access_key_id": admin_key["AccessKeyId"], "aws_secret_access_key": admin_key["SecretAccessKey"]}
        admin = {s: server.client(s, **creds) for s in ("kms", "s3", "iam", "sts")}
        assert admin["sts"].get_caller_identity()["Account"] == ACCOUNT
        kms, s3 = admin["kms"], admin["s3"]
        key_id = kms.create_key(Tags=[{"TagKey": TAG, "TagValue": KEY_CLASS},
                                      {"TagKey": "keyrotation:version", "TagValue": "1"}])["KeyMetadata"]["KeyId"]
        kms.create_alias(AliasName=KEY_REF, TargetKeyId=key_id)
        kms.create_alias(AliasName=f"{KEY_REF}/v1", TargetKeyId=key_id)
        other_key_id = kms.create_key(Tags=[{"TagKey": TAG, "TagValue": "orders"}])["KeyMetadata"]["KeyId"]
        kms.create_alias(AliasName="alias/orders", TargetKeyId=other_key_id)
        ciphertext = kms.encrypt(KeyId=KEY_REF, Plaintext=b"k" * 32)["CiphertextBlob"]
        for bucket in (BUCKET, OTHER_BUCKET):
            s3.create_bucket(Bucket=bucket)
        for key in (f"{PREFIX}/dt=2024-01-01/part-0.parquet",
                    f"{PREFIX}/dt=2024-01-01/_KEY_MATERIAL_FOR_part-0.parquet.json",
                    f"{OTHER_PREFIX}/dt=2024-01-01/part-0.parquet"):
            s3.put_object(Bucket=BUCKET, Key=key, Body=b"data", Tagging="keyrotation=1")
        s3.put_object(Bucket=OTHER_BUCKET, Key=f"{PREFIX}/part-0.parquet", Body=b"data")

        w = World(server=server, admin=admin, key_id=key_id, other_key_id=other_key_id, ciphertext=ciphertext)
        for role in ROLES:
            w.users[role] = w.add_user(f"keyrotation-{KEY_CLASS}-{role}", moto_view(sample_policy(role)))
        yield w


# -- the checks: (IAM action, what it is tried on, call) -------------------------------------------------------
Call = Callable[[World, dict[str, Any]], Any]
OWN = f"{BUCKET}/{PREFIX}"
MINE = f"{PREFIX}/dt=2024-01-01/part-0.parquet"
THEIRS = f"{OTHER_PREFIX}/dt=2024-01-01/part-0.parquet"


# The calls that act on something made for them return it with the answer, for the proofs below.
def _abort_upload(w: World, c: dict[str, Any]) -> tuple[str, str, Any]:
    key = f"{PREFIX}/{w.unique('upload')}"
    upload = w.admin["s3"].create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    return key, upload, c["s3"].abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload)


def _delete_mine(w: World, c: dict[str, Any]) -> tuple[str, Any]:
    key = f"{PREFIX}/{w.unique('stale')}.parquet"
    w.admin["s3"].put_object(Bucket=BUCKET, Key=key, Body=b"old")
    return key, c["s3"].delete_object(Bucket=BUCKET, Key=key)


def _put_mine(w: World, c: dict[str, Any]) -> tuple[str, Any]:
    key = f"{PREFIX}/{w.unique('new')}"
    return key, c["s3"].put_object(Bucket=BUCKET, Key=key, Body=b"new")


def _create_alias(w: World, c: dict[str, Any]) -> tuple[str, Any]:
    name = f"{KEY_REF}/v{w.unique('2')}"
    return name, c["kms"].create_alias(AliasName=name, TargetKeyId=w.key_id)


def _disable_class_key(w: World, c: dict[str, Any]) -> tuple[str, Any]:
    key = w.class_key()
    return key, c["kms"].disable_key(KeyId=key)


def _schedule_class_key_deletion(w: World, c: dict[str, Any]) -> tuple[str, Any]:
    key = w.class_key()
    return key, c["kms"].schedule_key_deletion(KeyId=key, PendingWindowInDays=7)


CHECKS: list[tuple[str, str, Call]] = [
    # KMS, on the key class's key (the scope moto cannot check, item 1)
    ("kms:DescribeKey", KEY_REF, lambda w, c: c["kms"].describe_key(KeyId=KEY_REF)),
    ("kms:ListAliases", "*", lambda w, c: c["kms"].list_aliases()),
    ("kms:ListKeyRotations", KEY_REF, lambda w, c: c["kms"].list_key_rotations(KeyId=w.key_id)),
    ("kms:GetKeyRotationStatus", KEY_REF, lambda w, c: c["kms"].get_key_rotation_status(KeyId=w.key_id)),
    ("kms:ListResourceTags", KEY_REF, lambda w, c: c["kms"].list_resource_tags(KeyId=w.key_id)),
    ("kms:EnableKeyRotation", KEY_REF,
     lambda w, c: c["kms"].enable_key_rotation(KeyId=w.key_id, RotationPeriodInDays=90)),
    ("kms:RotateKeyOnDemand", KEY_REF, lambda w, c: c["kms"].rotate_key_on_demand(KeyId=w.key_id)),
    ("kms:CreateKey", "new key", lambda w, c: c["kms"].create_key(
        Tags=[{"TagKey": TAG, "TagValue": KEY_CLASS}, {"TagKey": "keyrotation:version", "TagValue": "2"}])),
    ("kms:TagResource", KEY_REF,
     lambda w, c: c["kms"].tag_resource(KeyId=w.key_id, Tags=[{"TagKey": TAG, "TagValue": KEY_CLASS}])),
    ("kms:CreateAlias", f"{KEY_REF}/vN", _create_alias),
    ("kms:UpdateAlias", KEY_REF, lambda w, c: c["kms"].update_alias(AliasName=KEY_REF, TargetKeyId=w.key_id)),
    ("kms:Encrypt", KEY_REF, lambda w, c: c["kms"].encrypt(KeyId=KEY_REF, Plaintext=b"k" * 32)),
    ("kms:Decrypt", KEY_REF, lambda w, c: c["kms"].decrypt(CiphertextBlob=w.ciphertext)),
    ("kms:ReEncrypt", KEY_REF,
     lambda w, c: c["kms"].re_encrypt(CiphertextBlob=w.ciphertext, DestinationKeyId=KEY_REF)),
    ("kms:GenerateDataKey", KEY_REF, lambda w, c: c["kms"].generate_data_key(KeyId=KEY_REF, KeySpec="AES_256")),
    ("kms:DisableKey", "a key of the class", _disable_class_key),
    ("kms:ScheduleKeyDeletion", "a key of the class", _schedule_class_key_deletion),
    # no role may do these
    ("kms:UntagResource", KEY_REF, lambda w, c: c["kms"].untag_resource(KeyId=w.key_id, TagKeys=[TAG])),
    ("kms:DeleteAlias", f"{KEY_REF}/v1", lambda w, c: c["kms"].delete_alias(AliasName=f"{KEY_REF}/v1")),
    ("kms:PutKeyPolicy", KEY_REF, lambda w, c: c["kms"].put_key_policy(KeyId=w.key_id, PolicyName="default", Policy=(
        '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, '
        '"Action": "kms:*", "Resource": "*"}]}'))),
    ("kms:CreateGrant", KEY_REF, lambda w, c: c["kms"].create_grant(
        KeyId=w.key_id, GranteePrincipal=f"arn:aws:iam::{ACCOUNT}:user/{c['user']}", Operations=["Decrypt"])),
    ("kms:DisableKeyRotation", KEY_REF, lambda w, c: c["kms"].disable_key_rotation(KeyId=w.key_id)),
    ("iam:PutUserPolicy", "itself", lambda w, c: c["iam"].put_user_policy(
        UserName=c["user"], PolicyName="escalate", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))),
    # S3, the dataset prefix
    ("s3:ListBucket", OWN, lambda w, c: c["s3"].list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")),
    ("s3:GetObject", OWN, lambda w, c: c["s3"].get_object(Bucket=BUCKET, Key=MINE)["Body"].read()),
    ("s3:GetObject (head)", OWN, lambda w, c: c["s3"].head_object(Bucket=BUCKET, Key=MINE)),
    ("s3:PutObject", OWN, _put_mine),
    ("s3:DeleteObject", OWN, _delete_mine),
    ("s3:GetObjectTagging", OWN, lambda w, c: c["s3"].get_object_tagging(Bucket=BUCKET, Key=MINE)),
    ("s3:PutObjectTagging", OWN, lambda w, c: c["s3"].put_object_tagging(
        Bucket=BUCKET, Key=MINE, Tagging={"TagSet": [{"Key": "keyrotation", "Value": "2"}]})),
    ("s3:AbortMultipartUpload", OWN, _abort_upload),
    # S3, another prefix of the same bucket (object level; ListBucket there is item 2) and another bucket
    ("s3:GetObject", f"{BUCKET}/{OTHER_PREFIX}", lambda w, c: c["s3"].get_object(Bucket=BUCKET, Key=THEIRS)),
    ("s3:PutObject", f"{BUCKET}/{OTHER_PREFIX}", lambda w, c: c["s3"].put_object(
        Bucket=BUCKET, Key=f"{OTHER_PREFIX}/{w.unique('new')}", Body=b"new")),
    ("s3:DeleteObject", f"{BUCKET}/{OTHER_PREFIX}", lambda w, c: c["s3"].delete_object(Bucket=BUCKET, Key=THEIRS)),
    ("s3:ListBucket", OTHER_BUCKET, lambda w, c: c["s3"].list_objects_v2(Bucket=OTHER_BUCKET, Prefix=f"{PREFIX}/")),
    ("s3:GetObject", OTHER_BUCKET,
     lambda w, c: c["s3"].get_object(Bucket=OTHER_BUCKET, Key=f"{PREFIX}/part-0.parquet")),
]


# -- what each allowed check must return and do, read back with the admin's clients ------------------------------
# A proof gets the world and the call (made with the role's clients); it sets up what the call needs to show an
# effect, makes the call once, and checks the answer and the effect.
Proof = Callable[[World, Callable[[], Any]], None]
SECRET = b"k" * 32


def _key_arn(key_id: str) -> str:
    return f"{KMS_ARN}:key/{key_id}"


def _aliases(w: World) -> dict[str, str | None]:
    return {a["AliasName"]: a.get("TargetKeyId") for a in w.admin["kms"].list_aliases(Limit=1000)["Aliases"]}


def _tags(w: World, key_id: str) -> dict[str, str]:
    return {t["TagKey"]: t["TagValue"] for t in w.admin["kms"].list_resource_tags(KeyId=key_id)["Tags"]}


def _rotations(w: World) -> list[dict[str, Any]]:
    return w.admin["kms"].list_key_rotations(KeyId=w.key_id)["Rotations"]


def _admin_decrypts(w: World, blob: bytes) -> bytes:
    return w.admin["kms"].decrypt(CiphertextBlob=blob)["Plaintext"]


def _prove_describe_key(w: World, call: Callable[[], Any]) -> None:
    meta = call()["KeyMetadata"]
    assert (meta["KeyId"], meta["Arn"], meta["KeyState"]) == (w.key_id, _key_arn(w.key_id), "Enabled")


def _prove_list_aliases(w: World, call: Callable[[], Any]) -> None:
    listed = {a["AliasName"]: a.get("TargetKeyId") for a in call()["Aliases"]}
    assert (listed[KEY_REF], listed[f"{KEY_REF}/v1"], listed["alias/orders"]) == (w.key_id, w.key_id,
                                                                                  w.other_key_id)


def _prove_list_key_rotations(w: World, call: Callable[[], Any]) -> None:
    if not _rotations(w):  # at least one, made by the admin, to be listed
        w.admin["kms"].rotate_key_on_demand(KeyId=w.key_id)
    listed = call()["Rotations"]
    assert listed and listed == _rotations(w) and {r["KeyId"] for r in listed} == {w.key_id}


def _prove_get_key_rotation_status(w: World, call: Callable[[], Any]) -> None:
    answer, admin = call(), w.admin["kms"].get_key_rotation_status(KeyId=w.key_id)
    assert isinstance(answer["KeyRotationEnabled"], bool)
    assert {k: v for k, v in answer.items() if k != "ResponseMetadata"} == \
        {k: v for k, v in admin.items() if k != "ResponseMetadata"}


def _prove_list_resource_tags(w: World, call: Callable[[], Any]) -> None:
    listed = {t["TagKey"]: t["TagValue"] for t in call()["Tags"]}
    assert listed == _tags(w, w.key_id) and listed[TAG] == KEY_CLASS


def _prove_enable_key_rotation(w: World, call: Callable[[], Any]) -> None:
    w.admin["kms"].disable_key_rotation(KeyId=w.key_id)
    assert not w.admin["kms"].get_key_rotation_status(KeyId=w.key_id)["KeyRotationEnabled"]
    call()
    # moto 5.2.5 answers no RotationPeriodInDays (nor does DescribeKey show it): only the switch is read back
    assert w.admin["kms"].get_key_rotation_status(KeyId=w.key_id)["KeyRotationEnabled"] is True


def _prove_rotate_key_on_demand(w: World, call: Callable[[], Any]) -> None:
    before = _rotations(w)
    assert call()["KeyId"] == w.key_id
    after = _rotations(w)
    assert len(after) == len(before) + 1 and after[-1]["RotationType"] == "ON_DEMAND"


def _prove_create_key(w: World, call: Callable[[], Any]) -> None:
    meta = call()["KeyMetadata"]
    assert (meta["KeyState"], meta["KeySpec"], meta["Origin"]) == ("Enabled", "SYMMETRIC_DEFAULT", "AWS_KMS")
    assert meta["KeyId"] != w.key_id and w.admin["kms"].describe_key(KeyId=meta["KeyId"])["KeyMetadata"] == meta
    assert _tags(w, meta["KeyId"]) == {TAG: KEY_CLASS, "keyrotation:version": "2"}


def _prove_tag_resource(w: World, call: Callable[[], Any]) -> None:
    w.admin["kms"].untag_resource(KeyId=w.key_id, TagKeys=[TAG])
    assert TAG not in _tags(w, w.key_id)
    call()
    assert _tags(w, w.key_id)[TAG] == KEY_CLASS


def _prove_create_alias(w: World, call: Callable[[], Any]) -> None:
    name, _ = call()
    assert _aliases(w)[name] == w.key_id


def _prove_update_alias(w: World, call: Callable[[], Any]) -> None:
    elsewhere = w.class_key()
    w.admin["kms"].update_alias(AliasName=KEY_REF, TargetKeyId=elsewhere)
    assert _aliases(w)[KEY_REF] == elsewhere
    call()  # back to the key class's key
    assert _aliases(w)[KEY_REF] == w.key_id


def _prove_encrypt(w: World, call: Callable[[], Any]) -> None:
    answer = call()
    assert answer["KeyId"] == _key_arn(w.key_id) and _admin_decrypts(w, answer["CiphertextBlob"]) == SECRET


def _prove_decrypt(w: World, call: Callable[[], Any]) -> None:
    answer = call()
    assert (answer["KeyId"], answer["Plaintext"]) == (_key_arn(w.key_id), SECRET)


def _prove_re_encrypt(w: World, call: Callable[[], Any]) -> None:
    answer = call()
    assert (answer["SourceKeyId"], answer["KeyId"]) == (_key_arn(w.key_id), _key_arn(w.key_id))
    assert answer["CiphertextBlob"] != w.ciphertext and _admin_decrypts(w, answer["CiphertextBlob"]) == SECRET


def _prove_generate_data_key(w: World, call: Callable[[], Any]) -> None:
    answer = call()
    assert answer["KeyId"] == _key_arn(w.key_id) and len(answer["Plaintext"]) == 32
    assert _admin_decrypts(w, answer["CiphertextBlob"]) == answer["Plaintext"]


def _prove_disable_key(w: World, call: Callable[[], Any]) -> None:
    key, _ = call()
    meta = w.admin["kms"].describe_key(KeyId=key)["KeyMetadata"]
    assert (meta["KeyState"], meta["Enabled"]) == ("Disabled", False)


def _prove_schedule_key_deletion(w: World, call: Callable[[], Any]) -> None:
    asked = datetime.now(UTC)
    key, answer = call()
    meta = w.admin["kms"].describe_key(KeyId=key)["KeyMetadata"]
    assert (answer["KeyId"], meta["KeyState"], meta["DeletionDate"]) == (key, "PendingDeletion", answer["DeletionDate"])
    assert timedelta(days=7) <= answer["DeletionDate"] - asked < timedelta(days=7, minutes=1)


def _prove_list_bucket(w: World, call: Callable[[], Any]) -> None:
    listed = [o["Key"] for o in call()["Contents"]]
    admin = w.admin["s3"].list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    assert listed == [o["Key"] for o in admin["Contents"]]
    assert {MINE, f"{PREFIX}/dt=2024-01-01/_KEY_MATERIAL_FOR_part-0.parquet.json"} <= set(listed)


def _prove_get_object(w: World, call: Callable[[], Any]) -> None:
    assert call() == b"data"


def _prove_head_object(w: World, call: Callable[[], Any]) -> None:
    answer, admin = call(), w.admin["s3"].head_object(Bucket=BUCKET, Key=MINE)
    assert (answer["ContentLength"], answer["ETag"]) == (4, admin["ETag"])


def _prove_put_object(w: World, call: Callable[[], Any]) -> None:
    key, answer = call()
    stored = w.admin["s3"].get_object(Bucket=BUCKET, Key=key)
    assert (stored["Body"].read(), stored["ETag"]) == (b"new", answer["ETag"])


def _prove_delete_object(w: World, call: Callable[[], Any]) -> None:
    key, _ = call()
    with pytest.raises(ClientError) as gone:
        w.admin["s3"].head_object(Bucket=BUCKET, Key=key)
    assert gone.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def _prove_get_object_tagging(w: World, call: Callable[[], Any]) -> None:
    tags = call()["TagSet"]
    assert tags == w.admin["s3"].get_object_tagging(Bucket=BUCKET, Key=MINE)["TagSet"]
    assert [t["Key"] for t in tags] == ["keyrotation"]


def _prove_put_object_tagging(w: World, call: Callable[[], Any]) -> None:
    w.admin["s3"].put_object_tagging(Bucket=BUCKET, Key=MINE,
                                     Tagging={"TagSet": [{"Key": "keyrotation", "Value": "1"}]})
    call()
    tags = w.admin["s3"].get_object_tagging(Bucket=BUCKET, Key=MINE)["TagSet"]
    assert tags == [{"Key": "keyrotation", "Value": "2"}]


def _prove_abort_multipart_upload(w: World, call: Callable[[], Any]) -> None:
    key, upload, answer = call()
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 204
    uploads = w.admin["s3"].list_multipart_uploads(Bucket=BUCKET, Prefix=f"{PREFIX}/").get("Uploads", [])
    assert (key, upload) not in {(u["Key"], u["UploadId"]) for u in uploads}


PROOFS: dict[tuple[str, str], Proof] = {
    ("kms:DescribeKey", KEY_REF): _prove_describe_key,
    ("kms:ListAliases", "*"): _prove_list_aliases,
    ("kms:ListKeyRotations", KEY_REF): _prove_list_key_rotations,
    ("kms:GetKeyRotationStatus", KEY_REF): _prove_get_key_rotation_status,
    ("kms:ListResourceTags", KEY_REF): _prove_list_resource_tags,
    ("kms:EnableKeyRotation", KEY_REF): _prove_enable_key_rotation,
    ("kms:RotateKeyOnDemand", KEY_REF): _prove_rotate_key_on_demand,
    ("kms:CreateKey", "new key"): _prove_create_key,
    ("kms:TagResource", KEY_REF): _prove_tag_resource,
    ("kms:CreateAlias", f"{KEY_REF}/vN"): _prove_create_alias,
    ("kms:UpdateAlias", KEY_REF): _prove_update_alias,
    ("kms:Encrypt", KEY_REF): _prove_encrypt,
    ("kms:Decrypt", KEY_REF): _prove_decrypt,
    ("kms:ReEncrypt", KEY_REF): _prove_re_encrypt,
    ("kms:GenerateDataKey", KEY_REF): _prove_generate_data_key,
    ("kms:DisableKey", "a key of the class"): _prove_disable_key,
    ("kms:ScheduleKeyDeletion", "a key of the class"): _prove_schedule_key_deletion,
    ("s3:ListBucket", OWN): _prove_list_bucket,
    ("s3:GetObject", OWN): _prove_get_object,
    ("s3:GetObject (head)", OWN): _prove_head_object,
    ("s3:PutObject", OWN): _prove_put_object,
    ("s3:DeleteObject", OWN): _prove_delete_object,
    ("s3:GetObjectTagging", OWN): _prove_get_object_tagging,
    ("s3:PutObjectTagging", OWN): _prove_put_object_tagging,
    ("s3:AbortMultipartUpload", OWN): _prove_abort_multipart_upload,
}


def expected_allowed(role: str, action: str, target: str) -> bool:
    if target in (f"{BUCKET}/{OTHER_PREFIX}", OTHER_BUCKET):
        return False
    if action == "kms:ReEncrypt":  # item 3: one call, needing both on AWS
        return {"kms:ReEncryptFrom", "kms:ReEncryptTo"} <= ALLOWED[role]
    return action.removesuffix(" (head)") in ALLOWED[role]


@pytest.mark.parametrize("role", ROLES)
def test_each_role_can_do_its_part_and_is_refused_the_rest(world, role, record_property):
    clients = world.clients(role)
    allowed = denied = 0
    for action, target, call in CHECKS:
        what = f"role {role}: {action} on {target}"
        if expected_allowed(role, action, target):
            PROOFS[action, target](world, lambda call=call: call(world, clients))  # any error fails the test
            allowed += 1
            continue
        with pytest.raises(ClientError) as refused:
            call(world, clients)
            pytest.fail(f"{what} was allowed")
        if action.endswith("(head)"):  # HEAD answers carry no body
            expected = (403, "403", "Forbidden")
        elif action.startswith(("kms:", "iam:")):  # IAM's refusal, as moto words it
            expected = (403, "AccessDenied", f"User: arn:aws:iam::{ACCOUNT}:user/{clients['user']} is not "
                                             f"authorized to perform: {action}")
        else:
            expected = (403, "AccessDenied", "Access Denied")
        assert refusal(refused.value) == expected, f"{what}: {refused.value}"
        denied += 1
    assert (allowed, denied) == (EXPECTED_ALLOWED[role], EXPECTED_DENIED[role])
    record_property("denials", {"backend": "aws_kms", "role": role, "refused": denied, "allowed": allowed})


def test_totals():
    assert len(CHECKS) == 36
    allowed = {role: sum(expected_allowed(role, a, t) for a, t, _ in CHECKS) for role in ROLES}
    assert allowed == EXPECTED_ALLOWED
    assert {role: len(CHECKS) - n for role, n in allowed.items()} == EXPECTED_DENIED
    assert (sum(EXPECTED_ALLOWED.values()), sum(EXPECTED_DENIED.values())) == (41, 103)
    # every check some role is allowed has its proof, and no other
    assert set(PROOFS) == {(a, t) for a, t, _ in CHECKS if any(expected_allowed(r, a, t) for r in ROLES)}


def test_what_moto_does_not_enforce(world):
    """The gaps listed at the top, as moto shows them: if one of these fails, moto enforces more now and
    the check belongs in the role test (and the list at the top gets shorter)."""
    # 1. The exact document, KMS statements scoped to key ARNs: moto refuses even DescribeKey...
    exact = world.credentials(world.add_user("report-exact-document", sample_policy("report")))
    with pytest.raises(ClientError) as refused:
        world.server.client("kms", **exact).describe_key(KeyId=KEY_REF)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    # ... while its S3 statements work as on AWS.
    world.server.client("s3", **exact).get_object(Bucket=BUCKET, Key=MINE)
    # 1 and 2. Another key class's key (aws:ResourceTag not evaluated, resource always "*").
    reencrypt, rotate = world.clients("reencrypt"), world.clients("rotate")
    reencrypt["kms"].encrypt(KeyId="alias/orders", Plaintext=b"x")
    rotate["kms"].describe_key(KeyId=world.other_key_id)
    # 2. aws:RequestTag: rotate creates a key of another class; kms:KeySpec, kms:KeyOrigin: an asymmetric key,
    # a key for imported material; s3:prefix: another prefix is listed.
    rotate["kms"].create_key(Tags=[{"TagKey": TAG, "TagValue": "orders"}])
    class_tags = [{"TagKey": TAG, "TagValue": KEY_CLASS}, {"TagKey": "keyrotation:version", "TagValue": "9"}]
    rotate["kms"].create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT", Tags=class_tags)
    rotate["kms"].create_key(Origin="EXTERNAL", Tags=class_tags)
    listed = reencrypt["s3"].list_objects_v2(Bucket=BUCKET, Prefix=f"{OTHER_PREFIX}/")
    assert [o["Key"] for o in listed["Contents"]] == [THEIRS]
    # 3. ReEncryptFrom + ReEncryptTo, as AWS names them, do not let moto's "kms:ReEncrypt" through.
    split = world.credentials(world.add_user("reencrypt-from-to", {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["kms:ReEncryptFrom", "kms:ReEncryptTo"], "Resource": "*"}]}))
    with pytest.raises(ClientError) as refused:
        world.server.client("kms", **split).re_encrypt(CiphertextBlob=world.ciphertext, DestinationKeyId=KEY_REF)
    status, code, message = refusal(refused.value)
    assert (status, code) == (403, "AccessDenied") and message.endswith("not authorized to perform: kms:ReEncrypt")


# -- the package itself, run as each role ------------------------------------------------------------------------
DATASET = "customers"


@dataclass
class KmsCall:
    """One KMS request a backend sent: the API, its parameters, the HTTP status and the parsed answer."""

    op: str
    params: dict[str, Any]
    status: int
    response: dict[str, Any]

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v!r:.50}" for k, v in self.params.items())
        return f"{self.op}({shown}) -> {self.status}"


def record_kms_calls(client: Any, calls: list[KmsCall]) -> None:
    """Append every request ``client`` makes (refused ones too) to ``calls``."""

    def before(params: dict, model: Any, context: dict, **_: Any) -> None:
        context["keyrotation_params"] = copy.deepcopy(params)

    def after(http_response: Any, parsed: dict, model: Any, context: dict, **_: Any) -> None:
        calls.append(KmsCall(model.name, context.get("keyrotation_params", {}), http_response.status_code, parsed))

    client.meta.events.register("before-parameter-build.kms", before)
    client.meta.events.register("after-call.kms", after)


def create_key_context(params: dict[str, Any]) -> dict[str, str]:
    """The kms: condition keys of a CreateKey request; AWS evaluates a parameter left out at its default."""
    return {"kms:KeySpec": params.get("KeySpec", "SYMMETRIC_DEFAULT"),
            "kms:KeyUsage": params.get("KeyUsage", "ENCRYPT_DECRYPT"), "kms:KeyOrigin": params.get("Origin", "AWS_KMS"),
            "kms:MultiRegion": str(params.get("MultiRegion", False)).lower(),
            "kms:BypassPolicyLockoutSafetyCheck": str(params.get("BypassPolicyLockoutSafetyCheck", False)).lower()}


@dataclass
class KeyClassUnderTest:
    """A key class of its own on the IAM-enforcing server: its four role users (``moto_view`` of the documents
    rendered for it), a runtime per role, and every KMS and S3 request each role sent."""

    world: World
    name: str
    strategy: str
    tmp_path: Path
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: dict[str, dict[str, str]] = field(default_factory=dict)
    kms: dict[str, list[KmsCall]] = field(default_factory=dict)
    s3: dict[str, list[S3Request]] = field(default_factory=dict)
    _backends: dict[str, AwsKmsBackend] = field(default_factory=dict)
    _ledger: Ledger | None = None

    @property
    def key_ref(self) -> str:
        return f"alias/{self.name}"

    @property
    def config(self) -> KeyClassConfig:
        return KeyClassConfig.model_validate({
            "key_class": {"name": self.name, "backend": "aws_kms", "key_ref": self.key_ref, "conn_id": "unused",
                          "aws": {"strategy": self.strategy, "deletion_window_days": 7},
                          "rotation": {"cryptoperiod": "90d"}, "retire": {"grace_period": "0s", "versions_kept": 1}},
            "datasets": [{"name": DATASET, "location": f"s3://{BUCKET}/{self.name}",
                          "encrypted_columns": ["email", "ssn"]}]})

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger(f"sqlite:///{self.tmp_path / 'ledger.db'}")
        return self._ledger

    def backend(self, role: str) -> AwsKmsBackend:
        if role not in self._backends:
            key = self.keys[role]
            client = self.world.server.client("kms", aws_access_key_id=key["AccessKeyId"],
                                              aws_secret_access_key=key["SecretAccessKey"])
            record_kms_calls(client, self.kms.setdefault(role, []))
            self._backends[role] = AwsKmsBackend(
                client, self.key_ref, strategy=self.strategy, key_class=self.name, deletion_window_days=7,
                rotation_period_days=90 if self.strategy == "on_demand" else None)
        return self._backends[role]

    @contextmanager
    def acting(self, role: str) -> Iterator[KeyClassRuntime]:
        """The runtime of ``role``; the S3 requests sent inside the block are recorded as the role's."""
        key = self.keys[role]
        storage = Storage(AwsCredentials(key["AccessKeyId"], key["SecretAccessKey"], region_name=REGION,
                                         endpoint_url=self.world.server.url))
        since = self.world.log_mark()
        try:
            yield KeyClassRuntime(self.config, self.backend(role), self.ledger, storage=lambda _ds: storage)
        finally:
            self.s3.setdefault(role, []).extend(self.world.s3_requests(since))

    def kms_ops(self, role: str, status: int) -> set[str]:
        return {c.op for c in self.kms.get(role, []) if c.status == status}

    # -- replaying the requests against the exact documents ------------------------------------------------------
    def _key(self, ref: str) -> tuple[str, dict[str, str]]:
        """(ARN, aws:ResourceTag context) of the key ``ref`` (an alias, key id or key ARN) names now."""
        admin = self.world.admin["kms"]
        if ref.startswith("alias/"):
            ref = {a["AliasName"]: a.get("TargetKeyId") for a in admin.list_aliases()["Aliases"]}[ref]
        key_id = ref.rsplit("/", 1)[-1]
        tags = admin.list_resource_tags(KeyId=key_id)["Tags"]
        return f"{KMS_ARN}:key/{key_id}", {f"aws:ResourceTag/{t['TagKey']}": t["TagValue"] for t in tags}

    def kms_authorizations(self, call: KmsCall) -> list[tuple[str, str, dict[str, Any]]]:
        """What AWS authorises for ``call``: (IAM action, resource, request context) each."""
        p, r = call.params, call.response
        if call.op == "ListAliases":
            return [("kms:ListAliases", "*", {})]
        if call.op == "CreateKey":
            tags = {t["TagKey"]: t["TagValue"] for t in p.get("Tags", [])}
            context = {"aws:TagKeys": list(tags), **{f"aws:RequestTag/{k}": v for k, v in tags.items()},
                       **create_key_context(p)}
            # Tags given to CreateKey need kms:TagResource as well, on a key that has no tags yet.
            return [("kms:CreateKey", "*", context)] + [("kms:TagResource", f"{KMS_ARN}:key/new", context)] * bool(tags)
        if call.op in ("CreateAlias", "UpdateAlias"):
            return [(f"kms:{call.op}", f"{KMS_ARN}:{p['AliasName']}", {}),
                    (f"kms:{call.op}", *self._key(p["TargetKeyId"]))]
        if call.op == "ReEncrypt":  # the source key is named only in the answer (none if refused)
            return [("kms:ReEncryptTo", *self._key(r.get("KeyId") or p["DestinationKeyId"]))] + (
                [("kms:ReEncryptFrom", *self._key(r["SourceKeyId"]))] if r.get("SourceKeyId") else [])
        key = r.get("KeyId") or r.get("KeyMetadata", {}).get("KeyId") or p["KeyId"]
        arn, context = self._key(key)
        if call.op == "ScheduleKeyDeletion":  # AWS's default waiting period is 30 days
            context["kms:ScheduleKeyDeletionPendingWindowInDays"] = str(p.get("PendingWindowInDays", 30))
        return [(f"kms:{call.op}", arn, context)]

    @staticmethod
    def s3_authorizations(request: S3Request) -> list[tuple[str, str, dict[str, Any]]]:
        """What AWS authorises for ``request`` (a CopyObject shows as the PUT of its destination)."""
        bucket, q = f"arn:aws:s3:::{request.bucket}", request.query
        if not request.key:
            if request.method == "HEAD":  # HeadBucket
                return [("s3:ListBucket", bucket, {})]
            assert request.method == "GET" and set(q) <= {"list-type", "prefix", "delimiter", "max-keys",
                                                          "continuation-token", "encoding-type"}, request
            return [("s3:ListBucket", bucket, {"s3:prefix": q["prefix"][0]} if "prefix" in q else {})]
        target = f"{bucket}/{request.key}"
        if request.method in ("GET", "HEAD"):
            needs = [("s3:GetObjectTagging" if "tagging" in q else "s3:GetObject", target, {})]
            if request.status == 404:  # item 7: "not found" only to who may list the key
                needs.append(("s3:ListBucket", bucket, {"s3:prefix": request.key}))
            return needs
        if request.method == "PUT":
            return [("s3:PutObjectTagging" if "tagging" in q else "s3:PutObject", target, {})]
        if request.method == "POST":  # CreateMultipartUpload (?uploads), CompleteMultipartUpload (?uploadId)
            assert "uploads" in q or "uploadId" in q, request
            return [("s3:PutObject", target, {})]
        assert request.method == "DELETE", request
        return [("s3:AbortMultipartUpload" if "uploadId" in q else "s3:DeleteObject", target, {})]

    def assert_documents_decide_like_moto(self) -> int:
        """Every request the roles sent, judged by the exact documents, gets moto's decision; return how many."""
        judged, wrong = 0, []
        for role, document in self.documents.items():
            replay = [(c, c.status, self.kms_authorizations) for c in self.kms.get(role, [])]
            replay += [(r, r.status, self.s3_authorizations) for r in self.s3.get(role, [])]
            for request, status, authorizations in replay:
                if status == 403 or 200 <= status < 300 or (status == 404 and isinstance(request, S3Request)):
                    needs = authorizations(request)
                    allowed = all(allows(document, *need) for need in needs)
                    if allowed != (status != 403):
                        verdict = "allows" if allowed else "refuses"
                        wrong.append(f"{role}: {request} -> {status}, but the document {verdict} "
                                     f"{[n for n in needs if not allows(document, *n)] or needs}")
                    judged += 1
        assert not wrong, "\n".join(wrong)
        return judged


@pytest.fixture
def key_class(world, tmp_path):
    """A factory of key classes of their own (one per call), with their four role users."""

    def make(strategy: str = "alias") -> KeyClassUnderTest:
        kc = KeyClassUnderTest(world, f"lp{next(world.counter)}", strategy, tmp_path)
        for role in ROLES:
            kc.documents[role] = aws_policy(role, key_class=kc.name, key_ref=kc.key_ref, region=REGION,
                                            account=ACCOUNT, buckets=[f"{BUCKET}/{kc.name}"], deletion_window_days=7)
            kc.keys[role] = world.add_user(f"keyrotation-{kc.name}-{role}", moto_view(kc.documents[role]))
        return kc

    return make


def seed(kc: KeyClassUnderTest, partitions: list[str], rewrap: list[str]) -> dict[str, str]:
    """As the roles would: rotate creates v1, reencrypt writes ``partitions`` under it, rotate makes v2 (and
    records it as the reference), reencrypt rewraps ``rewrap`` to v2. Returns the partitions' digests."""
    kc.backend("rotate").create_key()
    with kc.acting("reencrypt") as rt:
        engine = rt.engine(DATASET)
        digests = {p: engine.write_partition(p, customers(p, rows=5), 1).digest for p in partitions}
    assert kc.backend("rotate").rotate() == 2
    update_reference(kc.name, 2, kc.ledger, RunContext(actor="test"))
    with kc.acting("reencrypt") as rt:
        engine = rt.engine(DATASET)
        assert [engine.process(p, 2, "rewrap").action for p in rewrap] == ["rewrapped"] * len(rewrap)
    return digests


def refused(call: Callable[[], Any], error: type[Exception] = PermissionDenied, match: str | None = None) -> str:
    """``call`` raises ``error`` (the role's IAM policy refused it); the message, for further checks."""
    with pytest.raises(error, match=match) as raised:
        call()
    return str(raised.value)


@pytest.mark.parametrize("strategy", ["alias", "on_demand"])
def test_rotate_role_creates_and_rotates_keys_and_cannot_use_or_retire_them(key_class, strategy):
    kc = key_class(strategy)
    rotate = kc.backend("rotate")
    assert not rotate.key_state().exists
    state = rotate.create_key()
    assert (state.exists, state.latest_version) == (True, 1)
    wrapped = kc.backend("reencrypt").wrap(b"k" * 32)
    assert rotate.rotate() == 2 and rotate.key_id_of(2).startswith(f"{KMS_ARN}:key/")
    for role in ROLES:  # every role reads the key's state
        assert kc.backend(role).key_state().latest_version == 2, role

    assert "kms:Encrypt" in refused(lambda: rotate.wrap(b"k" * 32))
    assert "kms:Decrypt" in refused(lambda: rotate.unwrap(wrapped))
    assert "kms:ReEncrypt" in refused(lambda: rotate.rewrap([wrapped]))
    if strategy == "alias":
        assert "kms:DisableKey" in refused(lambda: rotate.retire_below(2))
    else:  # nothing to refuse: AWS keeps every key material (the backend asks nothing)
        refused(lambda: rotate.retire_below(2), BackendError, "in perpetuity")

    uses = {"alias": {"CreateKey", "CreateAlias", "UpdateAlias", "ListAliases", "DescribeKey"},
            "on_demand": {"CreateKey", "CreateAlias", "DescribeKey", "EnableKeyRotation", "ListKeyRotations",
                          "RotateKeyOnDemand"}}
    assert kc.kms_ops("rotate", 200) == uses[strategy]
    assert kc.kms_ops("rotate", 403) == {"Encrypt", "Decrypt", "ReEncrypt", *["DisableKey"] * (strategy == "alias")}
    assert kc.assert_documents_decide_like_moto() >= 30


@pytest.mark.parametrize("strategy", ["alias", "on_demand"])
def test_reencrypt_role_writes_rewraps_reencrypts_and_validates_parquet_on_s3(key_class, strategy):
    kc = key_class(strategy)
    parts = ["2024-01-01", "2024-01-02", "2024-01-03"]
    digests = seed(kc, parts, rewrap=parts[:1])
    with kc.acting("reencrypt") as rt:
        engine = rt.engine(DATASET)
        assert rt.partitions(DATASET) == parts
        assert rt.census(DATASET).by_version() == {1: 2, 2: 1}
        assert engine.process(parts[1], 2, "rewrap").action == "rewrapped"
        assert engine.process(parts[2], 2, "reencrypt").action == "reencrypted"
        assert engine.process(parts[0], 2, "rewrap").action == "up_to_date"
        assert {p: engine.validate(p, min_version=2).digest for p in parts} == digests
        assert rt.census(DATASET).by_version() == {2: 3}
        assert "kms:" in refused(rt.backend.rotate)
        if strategy == "alias":
            assert "kms:DisableKey" in refused(lambda: rt.backend.retire_below(2))

    assert {"Encrypt", "Decrypt", "ReEncrypt", "DescribeKey"} <= kc.kms_ops("reencrypt", 200)
    assert kc.kms_ops("reencrypt", 403) == {"alias": {"CreateKey", "DisableKey"},
                                            "on_demand": {"RotateKeyOnDemand"}}[strategy]
    s3_calls = {(r.method, r.status) for r in kc.s3["reencrypt"]}
    assert {("HEAD", 200), ("HEAD", 404), ("GET", 200), ("PUT", 200), ("POST", 200), ("DELETE", 204)} <= s3_calls
    assert not {status for _, status in s3_calls} - {200, 204, 206, 404}
    assert kc.assert_documents_decide_like_moto() >= 300


def _writes_refused(rt: KeyClassRuntime, partition: str) -> None:
    """Every way the runtime writes to S3 is refused, and the partition is unchanged."""
    store, engine = rt.store(DATASET), rt.engine(DATASET)
    before = store.read_manifest(partition)
    refused(lambda: engine.write_partition("2024-02-01", customers("2024-02-01", rows=5), 2), OSError, "ACCESS_DENIED")

    def put() -> None:
        with store.fs.open_output_stream(store.path(partition, "stray.parquet")) as stream:
            stream.write(b"x")

    refused(put, OSError, "ACCESS_DENIED")
    refused(lambda: store.fs.move(store.path(partition, MANIFEST), store.path(partition, "moved.json")), OSError,
            "ACCESS_DENIED")
    refused(lambda: store.fs.delete_file(store.path(partition, MANIFEST)), OSError, "ACCESS_DENIED")
    assert store.read_manifest(partition) == before


def test_retire_role_takes_the_census_and_retires_and_cannot_write_or_decrypt(key_class):
    kc = key_class("alias")
    parts = ["2024-01-01", "2024-01-02"]
    seed(kc, parts, rewrap=parts)
    with kc.acting("reencrypt") as rt:  # the gate asks for a validation after each partition's last change
        assert [rt.engine(DATASET).validate(p, min_version=2).partition for p in parts] == parts
    wrapped = kc.backend("reencrypt").wrap(b"k" * 32)
    with kc.acting("retire") as rt:
        census = rt.census(DATASET)
        assert (census.by_version(), census.errors) == ({2: 2}, {})
        plan = rt.retirement_plan()
        assert plan is not None and plan.versions == [1]
        state = retire(rt.backend, rt.config.key_class, plan, rt.censuses(), rt.ledger, RunContext(actor="test"))
        assert (state.min_decryption_version, sorted(state.versions)) == (2, [2])
        assert sorted(rt.backend.deletion_dates()) == [1]
        assert "kms:Encrypt" in refused(lambda: rt.backend.wrap(b"k" * 32))
        assert "kms:Decrypt" in refused(lambda: rt.backend.unwrap(wrapped))
        assert "kms:CreateKey" in refused(rt.backend.rotate)
        _writes_refused(rt, parts[0])
        assert rt.census(DATASET).by_version() == {2: 2}

    assert {"DisableKey", "ScheduleKeyDeletion", "DescribeKey", "ListAliases"} <= kc.kms_ops("retire", 200)
    assert kc.kms_ops("retire", 403) == {"Encrypt", "Decrypt", "CreateKey"}
    assert {(r.method, r.status) for r in kc.s3["retire"] if r.status == 403} == {
        ("HEAD", 403), ("POST", 403), ("PUT", 403), ("DELETE", 403)}  # HeadBucket, upload, copy, delete
    assert kc.assert_documents_decide_like_moto() >= 200


def test_report_role_reads_key_state_and_census_and_cannot_write_or_decrypt(key_class):
    kc = key_class("alias")
    parts = ["2024-01-01", "2024-01-02"]
    seed(kc, parts, rewrap=parts[1:])
    wrapped = kc.backend("reencrypt").wrap(b"k" * 32)
    with kc.acting("report") as rt:
        state = rt.backend.key_state()
        assert (state.latest_version, sorted(state.versions), state.min_decryption_version) == (2, [1, 2], 1)
        assert rt.backend.deletion_dates() == {}
        assert [c.by_version() for c in rt.censuses()] == [{1: 1, 2: 1}]
        backend, engine = rt.backend, rt.engine(DATASET)
        assert "kms:Encrypt" in refused(lambda: backend.wrap(b"k" * 32))
        assert "kms:Decrypt" in refused(lambda: backend.unwrap(wrapped))
        assert "kms:ReEncrypt" in refused(lambda: backend.rewrap([wrapped]))
        assert "kms:CreateKey" in refused(backend.rotate)
        assert "kms:DisableKey" in refused(lambda: backend.retire_below(2))
        assert "kms:Decrypt" in refused(lambda: engine.validate(parts[0]))
        assert "kms:ReEncrypt" in refused(lambda: engine.process(parts[0], 2, "rewrap"))
        _writes_refused(rt, parts[0])
        assert rt.census(DATASET).by_version() == {1: 1, 2: 1}

    assert kc.kms_ops("report", 200) == {"ListAliases", "DescribeKey"}
    assert kc.kms_ops("report", 403) == {"Encrypt", "Decrypt", "ReEncrypt", "CreateKey", "DisableKey"}
    assert kc.assert_documents_decide_like_moto() >= 200


def test_the_iam_reading_used_for_what_moto_does_not_evaluate():
    """``allows()`` on the exact documents: what the replay relies on, shown on requests moto would let through."""
    rotate, reencrypt, report = (sample_policy(r) for r in ("rotate", "reencrypt", "report"))
    ours, theirs = {f"aws:ResourceTag/{TAG}": KEY_CLASS}, {f"aws:ResourceTag/{TAG}": "orders"}
    key, bucket = f"{KMS_ARN}:key/1234", f"arn:aws:s3:::{BUCKET}"
    assert allows(reencrypt, "kms:Encrypt", key, ours) and not allows(reencrypt, "kms:Encrypt", key, theirs)
    assert not allows(reencrypt, "kms:Encrypt", key, {})
    tags = {"aws:TagKeys": [TAG, "keyrotation:version"], f"aws:RequestTag/{TAG}": KEY_CLASS}
    new_key = {**tags, **create_key_context({"KeySpec": "SYMMETRIC_DEFAULT", "KeyUsage": "ENCRYPT_DECRYPT"})}
    assert allows(rotate, "kms:CreateKey", "*", new_key) and allows(rotate, "kms:TagResource", key, new_key)
    assert not allows(rotate, "kms:CreateKey", "*", {**new_key, f"aws:RequestTag/{TAG}": "orders"})
    assert not allows(rotate, "kms:CreateKey", "*", {**new_key, "aws:TagKeys": [TAG, "owner"]})
    # The kind of key: the backend's own request (above) and AWS's defaults pass; any other key spec, usage,
    # origin, a multi-Region key or a skipped lockout check does not (condition keys moto ignores, item 2).
    assert allows(rotate, "kms:CreateKey", "*", {**tags, **create_key_context({})})
    for weaker in ({"KeySpec": "SYMMETRIC_DEFAULT", "KeyUsage": "GENERATE_VERIFY_MAC"}, {"KeySpec": "HMAC_256"},
                   {"KeySpec": "RSA_2048", "KeyUsage": "ENCRYPT_DECRYPT"}, {"Origin": "EXTERNAL"},
                   {"Origin": "AWS_CLOUDHSM"}, {"Origin": "EXTERNAL_KEY_STORE"}, {"MultiRegion": True},
                   {"BypassPolicyLockoutSafetyCheck": True}):
        assert not allows(rotate, "kms:CreateKey", "*", {**tags, **create_key_context(weaker)}), weaker
    # ScheduleKeyDeletion: no waiting period shorter than the key class's.
    retire = sample_policy("retire")
    for days, allowed in ((7, False), (29, False), (30, True)):
        window = {**ours, "kms:ScheduleKeyDeletionPendingWindowInDays": str(days)}
        assert allows(retire, "kms:ScheduleKeyDeletion", key, window) == allowed, days
    assert not allows(retire, "kms:ScheduleKeyDeletion", key, {**theirs,
                                                              "kms:ScheduleKeyDeletionPendingWindowInDays": "30"})
    assert not allows(rotate, "kms:TagResource", key, {**new_key, **theirs})
    assert allows(rotate, "kms:UpdateAlias", f"{KMS_ARN}:alias/customer-pii/v7", {})
    assert not allows(rotate, "kms:UpdateAlias", f"{KMS_ARN}:alias/customer-pii-archive", {})
    for document in (reencrypt, report):
        assert allows(document, "s3:ListBucket", bucket, {"s3:prefix": f"{PREFIX}/dt=2024-01-01/"})
        assert allows(document, "s3:ListBucket", bucket, {"s3:prefix": PREFIX})  # item 7, the dataset root
        assert not allows(document, "s3:ListBucket", bucket, {"s3:prefix": f"{OTHER_PREFIX}/"})
        assert allows(document, "s3:GetObject", f"{bucket}/{PREFIX}", {})
        assert not allows(document, "s3:GetObject", f"{bucket}/{PREFIX}-archive/x", {})
    # HeadBucket (no s3:prefix): only the role that creates partition directories.
    assert allows(reencrypt, "s3:ListBucket", bucket, {}) and not allows(report, "s3:ListBucket", bucket, {})
    assert not allows(reencrypt, "s3:PutObject", f"{bucket}/{PREFIX}", {})


# -- the documents themselves, checked without a server --------------------------------------------------------
@pytest.mark.parametrize("role", ROLES)
def test_documents_are_scoped(role):
    """What moto cannot check (items 1, 2): each statement's resources and conditions, read from the document."""
    document = sample_policy(role)
    assert document["Version"] == "2012-10-17"
    granted = {a for s in document["Statement"] for a in _actions(s)}
    assert granted == ALLOWED[role]
    assert all(s["Effect"] == "Allow" and "*" not in "".join(_actions(s)) for s in document["Statement"])
    of_class = {"StringEquals": {f"aws:ResourceTag/{TAG}": KEY_CLASS}}
    for s in document["Statement"]:
        actions, resources = _actions(s), s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
        if actions == ["kms:ListAliases"]:
            assert resources == ["*"] and "Condition" not in s
        elif actions == ["kms:CreateKey"]:
            assert resources == ["*"]
            assert s["Condition"] == {
                "StringEquals": {f"aws:RequestTag/{TAG}": KEY_CLASS, "kms:KeySpec": "SYMMETRIC_DEFAULT",
                                 "kms:KeyUsage": "ENCRYPT_DECRYPT"},
                "StringEqualsIfExists": {"kms:KeyOrigin": "AWS_KMS"},
                "BoolIfExists": {"kms:MultiRegion": "false", "kms:BypassPolicyLockoutSafetyCheck": "false"},
                "ForAllValues:StringEquals": {"aws:TagKeys": [TAG, "keyrotation:version"]}}
        elif actions == ["kms:ScheduleKeyDeletion"]:
            assert role == "retire" and resources == [f"{KMS_ARN}:key/*"]
            assert s["Condition"] == {**of_class, "NumericGreaterThanEquals": {
                "kms:ScheduleKeyDeletionPendingWindowInDays": str(DELETION_WINDOW_DAYS)}}
        elif actions == ["kms:TagResource"]:
            assert resources == [f"{KMS_ARN}:key/*"]
            assert s["Condition"]["StringEquals"] == {f"aws:RequestTag/{TAG}": KEY_CLASS}
            assert s["Condition"]["StringEqualsIfExists"] == {f"aws:ResourceTag/{TAG}": KEY_CLASS}
        elif all(a.startswith("kms:") for a in actions) and resources[0].startswith(f"{KMS_ARN}:alias/"):
            assert set(actions) == {"kms:CreateAlias", "kms:UpdateAlias"}
            assert resources == [f"{KMS_ARN}:alias/customer-pii", f"{KMS_ARN}:alias/customer-pii/*"]
        elif all(a.startswith("kms:") for a in actions):
            assert resources == [f"{KMS_ARN}:key/*"] and s["Condition"] == of_class
        elif actions == ["s3:ListBucket"] and "Null" in s["Condition"]:  # HeadBucket (item 6): the writer only
            assert role == "reencrypt" and resources == [f"arn:aws:s3:::{BUCKET}"]
            assert s["Condition"] == {"Null": {"s3:prefix": "true"}}
        elif actions == ["s3:ListBucket"]:
            assert resources == [f"arn:aws:s3:::{BUCKET}"]
            assert s["Condition"] == {"StringLike": {"s3:prefix": [PREFIX, f"{PREFIX}/*"]}}
        elif s["Sid"] == "DatasetRoots":  # the one key pyarrow heads at the dataset root
            assert actions == ["s3:GetObject"] and resources == [f"arn:aws:s3:::{BUCKET}/{PREFIX}"]
            assert "Condition" not in s
        else:
            assert all(a.startswith("s3:") and a != "s3:ListBucket" for a in actions)
            assert resources == [f"arn:aws:s3:::{BUCKET}/{PREFIX}/*"] and "Condition" not in s
    sids = [s["Sid"] for s in document["Statement"]]
    assert len(sids) == len(set(sids)) and ("DatasetBucketExists" in sids) == (role == "reencrypt")


def test_documents_in_docs_match_the_module_and_the_cli():
    for role in ROLES:
        written = json.loads((ROOT / "docs" / "aws-iam" / f"{role}.json").read_text())
        assert written == sample_policy(role), f"docs/aws-iam/{role}.json is stale: re-render it with the CLI"
    printed = subprocess.run(
        [sys.executable, "-m", "keyrotation.policies.aws_kms", "--role", "reencrypt", "--key-class", KEY_CLASS,
         "--key-ref", KEY_REF, "--region", REGION, "--account", ACCOUNT, "--bucket", f"{BUCKET}/{PREFIX}"],
        cwd=ROOT / "include", capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(printed.stdout) == sample_policy("reencrypt")
    printed = subprocess.run(
        [sys.executable, "-m", "keyrotation.policies.aws_kms", "--role", "retire", "--key-class", KEY_CLASS,
         "--key-ref", KEY_REF, "--region", REGION, "--account", ACCOUNT, "--bucket", f"{BUCKET}/{PREFIX}",
         "--deletion-window-days", str(DELETION_WINDOW_DAYS)],
        cwd=ROOT / "include", capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(printed.stdout) == sample_policy("retire")
    bad = subprocess.run([sys.executable, "-m", "keyrotation.policies.aws_kms", "--role", "rotate", "--key-class", "k",
                          "--key-ref", "alias/k", "--region", REGION, "--account", "42"],
                         cwd=ROOT / "include", capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not an AWS account id" in bad.stderr
