"""Least privilege on AWS, enforced by moto_server's IAM: each role's IAM user (with the document from
``keyrotation.aws_policies`` attached) can do its part and is refused the rest.

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
   ``test_documents_are_scoped`` checks those statically instead.
2. Condition keys. For identity policies moto evaluates no Condition at all (it passes no request
   context; only trust policies see ``sts:ExternalId``): ``aws:ResourceTag/keyrotation:key-class``,
   ``aws:RequestTag/keyrotation:key-class``, ``aws:TagKeys`` and ``s3:prefix`` are ignored. So moto lets
   a role list **another prefix of the same bucket** (ListBucket) and lets rotate create or tag a key
   with **another class's tag**. Object-level access to another prefix (GetObject, PutObject,
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
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from keyrotation.aws_policies import ROLES, aws_policy
from keyrotation.devserver import MotoServer

ROOT = Path(__file__).resolve().parents[1]
KEY_CLASS, KEY_REF, REGION, ACCOUNT = "customer_pii", "alias/customer-pii", "us-east-1", "123456789012"
BUCKET, PREFIX, OTHER_PREFIX, OTHER_BUCKET = "keyrotation-data", "customers", "orders", "keyrotation-other"
TAG = "keyrotation:key-class"

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


def sample_policy(role: str) -> dict[str, Any]:
    return aws_policy(role, key_class=KEY_CLASS, key_ref=KEY_REF, region=REGION, account=ACCOUNT,
                      buckets=[f"{BUCKET}/{PREFIX}"])


def _actions(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else list(action)


def moto_view(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` as moto can evaluate it (items 1 and 3 at the top); S3 statements stay as they are."""
    view = copy.deepcopy(document)
    for statement in view["Statement"]:
        actions = _actions(statement)
        if all(a.startswith("kms:") for a in actions):
            statement["Resource"] = "*"
            if {"kms:ReEncryptFrom", "kms:ReEncryptTo"} <= set(actions):
                statement["Action"] = [*actions, "kms:ReEncrypt"]
    return view


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


def _abort_upload(w: World, c: dict[str, Any]) -> Any:
    key = f"{PREFIX}/{w.unique('upload')}"
    upload = w.admin["s3"].create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    return c["s3"].abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload)


def _delete_mine(w: World, c: dict[str, Any]) -> Any:
    key = f"{PREFIX}/{w.unique('stale')}.parquet"
    w.admin["s3"].put_object(Bucket=BUCKET, Key=key, Body=b"old")
    return c["s3"].delete_object(Bucket=BUCKET, Key=key)


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
    ("kms:CreateAlias", f"{KEY_REF}/vN",
     lambda w, c: c["kms"].create_alias(AliasName=f"{KEY_REF}/v{w.unique('2')}", TargetKeyId=w.key_id)),
    ("kms:UpdateAlias", KEY_REF, lambda w, c: c["kms"].update_alias(AliasName=KEY_REF, TargetKeyId=w.key_id)),
    ("kms:Encrypt", KEY_REF, lambda w, c: c["kms"].encrypt(KeyId=KEY_REF, Plaintext=b"k" * 32)),
    ("kms:Decrypt", KEY_REF, lambda w, c: c["kms"].decrypt(CiphertextBlob=w.ciphertext)),
    ("kms:ReEncrypt", KEY_REF,
     lambda w, c: c["kms"].re_encrypt(CiphertextBlob=w.ciphertext, DestinationKeyId=KEY_REF)),
    ("kms:GenerateDataKey", KEY_REF, lambda w, c: c["kms"].generate_data_key(KeyId=KEY_REF, KeySpec="AES_256")),
    ("kms:DisableKey", "a key of the class", lambda w, c: c["kms"].disable_key(KeyId=w.class_key())),
    ("kms:ScheduleKeyDeletion", "a key of the class",
     lambda w, c: c["kms"].schedule_key_deletion(KeyId=w.class_key(), PendingWindowInDays=7)),
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
    ("s3:PutObject", OWN, lambda w, c: c["s3"].put_object(Bucket=BUCKET, Key=f"{PREFIX}/{w.unique('new')}",
                                                          Body=b"new")),
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


def expected_allowed(role: str, action: str, target: str) -> bool:
    if target in (f"{BUCKET}/{OTHER_PREFIX}", OTHER_BUCKET):
        return False
    if action == "kms:ReEncrypt":  # item 3: one call, needing both on AWS
        return {"kms:ReEncryptFrom", "kms:ReEncryptTo"} <= ALLOWED[role]
    return action.removesuffix(" (head)") in ALLOWED[role]


@pytest.mark.parametrize("role", ROLES)
def test_each_role_can_do_its_part_and_is_refused_the_rest(world, role):
    clients = world.clients(role)
    allowed = denied = 0
    for action, target, call in CHECKS:
        what = f"role {role}: {action} on {target}"
        if expected_allowed(role, action, target):
            call(world, clients)  # any error fails the test
            allowed += 1
            continue
        with pytest.raises(ClientError) as refused:
            call(world, clients)
            pytest.fail(f"{what} was allowed")
        status, code, message = refusal(refused.value)
        assert status == 403, f"{what}: {refused.value}"
        if action.endswith("(head)"):
            assert code == "403", what  # HEAD answers carry no body
        else:
            assert code in ("AccessDenied", "AccessDeniedException"), f"{what}: {refused.value}"
        if action.startswith(("kms:", "iam:")):
            assert f"not authorized to perform: {action}" in message, f"{what}: {message}"
        denied += 1
    assert (allowed, denied) == (EXPECTED_ALLOWED[role], EXPECTED_DENIED[role])


def test_totals():
    assert len(CHECKS) == 36
    allowed = {role: sum(expected_allowed(role, a, t) for a, t, _ in CHECKS) for role in ROLES}
    assert allowed == EXPECTED_ALLOWED
    assert {role: len(CHECKS) - n for role, n in allowed.items()} == EXPECTED_DENIED
    assert (sum(EXPECTED_ALLOWED.values()), sum(EXPECTED_DENIED.values())) == (41, 103)


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
    # 2. aws:RequestTag: rotate creates a key of another class; s3:prefix: another prefix is listed.
    rotate["kms"].create_key(Tags=[{"TagKey": TAG, "TagValue": "orders"}])
    listed = reencrypt["s3"].list_objects_v2(Bucket=BUCKET, Prefix=f"{OTHER_PREFIX}/")
    assert [o["Key"] for o in listed["Contents"]] == [THEIRS]
    # 3. ReEncryptFrom + ReEncryptTo, as AWS names them, do not let moto's "kms:ReEncrypt" through.
    split = world.credentials(world.add_user("reencrypt-from-to", {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["kms:ReEncryptFrom", "kms:ReEncryptTo"], "Resource": "*"}]}))
    with pytest.raises(ClientError) as refused:
        world.server.client("kms", **split).re_encrypt(CiphertextBlob=world.ciphertext, DestinationKeyId=KEY_REF)
    status, code, message = refusal(refused.value)
    assert (status, code) == (403, "AccessDenied") and message.endswith("not authorized to perform: kms:ReEncrypt")


# -- the documents themselves, checked without a server --------------------------------------------------------
KMS_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}"


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
            assert s["Condition"]["StringEquals"] == {f"aws:RequestTag/{TAG}": KEY_CLASS}
            assert s["Condition"]["ForAllValues:StringEquals"] == {"aws:TagKeys": [TAG, "keyrotation:version"]}
        elif actions == ["kms:TagResource"]:
            assert resources == [f"{KMS_ARN}:key/*"]
            assert s["Condition"]["StringEquals"] == {f"aws:RequestTag/{TAG}": KEY_CLASS}
            assert s["Condition"]["StringEqualsIfExists"] == {f"aws:ResourceTag/{TAG}": KEY_CLASS}
        elif all(a.startswith("kms:") for a in actions) and resources[0].startswith(f"{KMS_ARN}:alias/"):
            assert set(actions) == {"kms:CreateAlias", "kms:UpdateAlias"}
            assert resources == [f"{KMS_ARN}:alias/customer-pii", f"{KMS_ARN}:alias/customer-pii/*"]
        elif all(a.startswith("kms:") for a in actions):
            assert resources == [f"{KMS_ARN}:key/*"] and s["Condition"] == of_class
        elif actions == ["s3:ListBucket"]:
            assert resources == [f"arn:aws:s3:::{BUCKET}"]
            assert s["Condition"] == {"StringLike": {"s3:prefix": [f"{PREFIX}/*"]}}
        else:
            assert all(a.startswith("s3:") and a != "s3:ListBucket" for a in actions)
            assert resources == [f"arn:aws:s3:::{BUCKET}/{PREFIX}/*"] and "Condition" not in s


def test_documents_in_docs_match_the_module_and_the_cli():
    for role in ROLES:
        written = json.loads((ROOT / "docs" / "aws-iam" / f"{role}.json").read_text())
        assert written == sample_policy(role), f"docs/aws-iam/{role}.json is stale: re-render it with the CLI"
    printed = subprocess.run(
        [sys.executable, "-m", "keyrotation.aws_policies", "--role", "reencrypt", "--key-class", KEY_CLASS,
         "--key-ref", KEY_REF, "--region", REGION, "--account", ACCOUNT, "--bucket", f"{BUCKET}/{PREFIX}"],
        cwd=ROOT / "include", capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(printed.stdout) == sample_policy("reencrypt")
    bad = subprocess.run([sys.executable, "-m", "keyrotation.aws_policies", "--role", "rotate", "--key-class", "k",
                          "--key-ref", "alias/k", "--region", REGION, "--account", "42"],
                         cwd=ROOT / "include", capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not an AWS account id" in bad.stderr
