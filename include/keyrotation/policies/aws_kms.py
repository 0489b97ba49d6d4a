"""Least privilege on AWS: the IAM policy document each role needs for one key class.

The same four roles as the Vault policies in :mod:`keyrotation.policies.vault_transit`, one IAM principal (and so
one Airflow ``aws`` connection) each:

* ``rotate``: read the key class's KMS keys, create new ones (tagged with the key class), turn on and
  trigger rotation, point the class's aliases at them. Cannot encrypt, decrypt, disable or delete.
* ``reencrypt``: read the keys; encrypt, decrypt, re-encrypt and generate data keys with them; read and
  rewrite the objects under the key class's dataset prefixes. Cannot create, rotate, move aliases,
  disable or delete keys.
* ``retire``: read the keys; disable them and schedule their deletion; list and read (never write) the
  dataset objects, for the census. Cannot encrypt, decrypt or create.
* ``report``: read the keys' metadata, rotations and tags; list and read the dataset objects.

KMS keys are scoped by their ``keyrotation:key-class`` tag (``aws:ResourceTag``; new keys must carry
it, ``aws:RequestTag``), aliases by name (``alias/<name>`` and ``alias/<name>/*``), objects by
prefix. The documents are allow-lists: ``PutKeyPolicy``, ``CreateGrant``, ``ImportKeyMaterial``,
``ReplicateKey``, ``EnableKey``, ``CancelKeyDeletion``, ``DisableKeyRotation`` and every other action
not named are refused. Where a KMS condition key can limit a request's parameters, it does:
``CreateKey`` only for a symmetric ``ENCRYPT_DECRYPT`` key whose material KMS generates in one region
(:data:`NEW_KEY_CONDITIONS`), and, given ``deletion_window_days``, ``ScheduleKeyDeletion`` with no
shorter waiting period. What IAM cannot limit is listed in ``docs/aws-iam/README.md``.

``python -m keyrotation.policies KEY_CLASS --account ID [--region REGION]`` prints every role's document
for a key class file (:func:`render`); ``python -m keyrotation.policies.aws_kms --role R --key-class K
--key-ref alias/x --region REGION --account ID --bucket bucket/prefix [--deletion-window-days N]`` prints
one document from arguments alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from keyrotation.config import ROLES, KeyClassConfig
from keyrotation.policies.base import check_target

TAG_KEY_CLASS = "keyrotation:key-class"
#: The tags the AWS KMS backend puts on a key it creates.
KEY_TAGS = (TAG_KEY_CLASS, "keyrotation:version")

#: KMS actions on the key class's keys (resource: a key, so the tag condition applies), by role.
KEY_ACTIONS = {
    "rotate": ["kms:DescribeKey", "kms:GetKeyRotationStatus", "kms:ListKeyRotations", "kms:RotateKeyOnDemand",
               "kms:EnableKeyRotation", "kms:CreateAlias", "kms:UpdateAlias"],
    "reencrypt": ["kms:DescribeKey", "kms:ListKeyRotations", "kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom",
                  "kms:ReEncryptTo", "kms:GenerateDataKey"],
    "retire": ["kms:DescribeKey", "kms:ListKeyRotations", "kms:DisableKey", "kms:ScheduleKeyDeletion"],
    "report": ["kms:DescribeKey", "kms:ListKeyRotations", "kms:GetKeyRotationStatus", "kms:ListResourceTags"],
}
#: What CreateKey may ask for: the key the AWS KMS backend creates. AWS evaluates these keys with the
#: parameter's default when a request leaves it out; the backend sends KeySpec and KeyUsage, not the rest
#: (hence IfExists, which still refuses any other value that is sent). Not expressible: the key policy a
#: request may pass (``Policy``), for which KMS has no condition key.
NEW_KEY_CONDITIONS: dict[str, dict[str, str]] = {
    "StringEquals": {"kms:KeySpec": "SYMMETRIC_DEFAULT", "kms:KeyUsage": "ENCRYPT_DECRYPT"},
    "StringEqualsIfExists": {"kms:KeyOrigin": "AWS_KMS"},
    "BoolIfExists": {"kms:MultiRegion": "false", "kms:BypassPolicyLockoutSafetyCheck": "false"},
}
#: S3 object actions on the dataset prefixes, by role; these roles also list the prefixes (rotate has no S3).
OBJECT_ACTIONS = {
    "reencrypt": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:GetObjectTagging", "s3:PutObjectTagging",
                  "s3:AbortMultipartUpload"],
    "retire": ["s3:GetObject"],
    "report": ["s3:GetObject"],
}

_ACCOUNT = re.compile(r"^\d{12}$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def split_bucket(location: str) -> tuple[str, str]:
    """``"bucket/prefix"`` (or ``s3://bucket/prefix``) -> ``("bucket", "prefix")``; no prefix -> ``""``."""
    path = location.removeprefix("s3://").strip("/")
    bucket, _, prefix = path.partition("/")
    if not _BUCKET.match(bucket):
        raise ValueError(f"not an S3 bucket/prefix location: {location!r}")
    return bucket, prefix.strip("/")


def _s3_statements(role: str, buckets: list[str], arn: str) -> list[dict[str, Any]]:
    by_bucket: dict[str, list[str]] = {}
    for location in buckets:
        bucket, prefix = split_bucket(location)
        prefixes = by_bucket.setdefault(bucket, [])
        if prefix not in prefixes:
            prefixes.append(prefix)
    statements: list[dict[str, Any]] = []
    objects: list[str] = []
    roots: list[str] = []
    scoped_buckets: list[str] = []
    for i, (bucket, prefixes) in enumerate(by_bucket.items(), 1):
        list_bucket: dict[str, Any] = {"Sid": f"ListDatasetPrefixes{i}", "Effect": "Allow",
                                       "Action": ["s3:ListBucket"], "Resource": f"{arn}:s3:::{bucket}"}
        if "" not in prefixes:  # a whole-bucket dataset lists without a prefix condition
            # "<prefix>" itself too: S3 answers a missing key with 404 (not 403) only to a caller that may
            # list it, with the key as s3:prefix, and pyarrow heads the dataset root "<prefix>" (below).
            list_bucket["Condition"] = {"StringLike": {"s3:prefix": [x for p in prefixes for x in (p, f"{p}/*")]}}
            scoped_buckets.append(f"{arn}:s3:::{bucket}")
        statements.append(list_bucket)
        objects += [f"{arn}:s3:::{bucket}/{p}/*" if p else f"{arn}:s3:::{bucket}/*" for p in prefixes]
        roots += [f"{arn}:s3:::{bucket}/{p}" for p in prefixes if p]
    if objects:
        statements.append({"Sid": "DatasetObjects", "Effect": "Allow", "Action": list(OBJECT_ACTIONS[role]),
                           "Resource": objects})
    if roots:
        # pyarrow's get_file_info on the dataset root "bucket/prefix" first heads the object "prefix"
        # (expecting 404) before listing "prefix/": reading that one key, which never exists, is needed.
        statements.append({"Sid": "DatasetRoots", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": roots})
    if scoped_buckets and "s3:PutObject" in OBJECT_ACTIONS[role]:
        # pyarrow's create_dir(recursive=True), which writing a new partition calls, sends HeadBucket
        # (apache/arrow#49949). S3 authorises it as s3:ListBucket with no s3:prefix, which the prefix
        # condition above refuses. The price: a listing without a prefix passes too (object names of
        # the whole bucket, never their contents).
        statements.append({"Sid": "DatasetBucketExists", "Effect": "Allow", "Action": ["s3:ListBucket"],
                           "Resource": scoped_buckets, "Condition": {"Null": {"s3:prefix": "true"}}})
    return statements


def aws_policy(role: str, *, key_class: str, key_ref: str, region: str, account: str,
               buckets: list[str], deletion_window_days: int | None = None) -> dict[str, Any]:
    """The IAM policy document of ``role`` for the key class ``key_class``.

    ``key_ref`` is the class's KMS alias (``alias/<name>``; a key id or ARN gets no alias
    permissions); ``buckets`` are the ``bucket/prefix`` locations of its datasets on S3;
    ``deletion_window_days`` (the key class's ``aws.deletion_window_days``), if given, is the shortest
    waiting period the retire role may ask ``ScheduleKeyDeletion`` for.
    """
    if deletion_window_days is not None and not 7 <= deletion_window_days <= 30:
        raise ValueError(f"deletion_window_days must be 7-30 (AWS's range): {deletion_window_days}")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    if not key_class:
        raise ValueError("key_class must not be empty")
    if not _ACCOUNT.match(account):
        raise ValueError(f"not an AWS account id (12 digits): {account!r}")
    if not _REGION.match(region):
        raise ValueError(f"not an AWS region: {region!r}")
    arn = f"arn:{_partition(region)}"
    kms = f"{arn}:kms:{region}:{account}"
    of_class = {"StringEquals": {f"aws:ResourceTag/{TAG_KEY_CLASS}": key_class}}
    key_actions = list(KEY_ACTIONS[role])
    alias = key_ref.removeprefix("alias/") if key_ref.startswith("alias/") else None
    if not alias:
        key_actions = [a for a in key_actions if a not in ("kms:CreateAlias", "kms:UpdateAlias")]
    schedule_deletion = role == "retire" and deletion_window_days is not None
    if schedule_deletion:
        key_actions.remove("kms:ScheduleKeyDeletion")

    statements: list[dict[str, Any]] = [
        {"Sid": "KeyClassKeys", "Effect": "Allow", "Action": key_actions, "Resource": f"{kms}:key/*",
         "Condition": of_class},
        # ListAliases has no resource-level permissions: "*" is the only resource it accepts.
        {"Sid": "ListAliases", "Effect": "Allow", "Action": ["kms:ListAliases"], "Resource": "*"},
    ]
    if schedule_deletion:
        # A shorter waiting period leaves less time to cancel a deletion (CancelKeyDeletion) found wrong.
        statements.append({"Sid": "ScheduleDeletionOfClassKeys", "Effect": "Allow",
                           "Action": ["kms:ScheduleKeyDeletion"], "Resource": f"{kms}:key/*",
                           "Condition": {**of_class, "NumericGreaterThanEquals": {
                               "kms:ScheduleKeyDeletionPendingWindowInDays": str(deletion_window_days)}}})
    if role == "rotate":
        new_key_tags = {f"aws:RequestTag/{TAG_KEY_CLASS}": key_class}
        statements += [
            # CreateKey has no resource; the request must tag the new key with this class and no other tags,
            # and ask for the kind of key the backend creates (NEW_KEY_CONDITIONS).
            {"Sid": "CreateKeysOfClass", "Effect": "Allow", "Action": ["kms:CreateKey"], "Resource": "*",
             "Condition": {"StringEquals": {**new_key_tags, **NEW_KEY_CONDITIONS["StringEquals"]},
                           "StringEqualsIfExists": dict(NEW_KEY_CONDITIONS["StringEqualsIfExists"]),
                           "BoolIfExists": dict(NEW_KEY_CONDITIONS["BoolIfExists"]),
                           "ForAllValues:StringEquals": {"aws:TagKeys": list(KEY_TAGS)}}},
            # Tags given to CreateKey need kms:TagResource on every key of the account and region; the
            # request must set this class, and a key already of another class cannot be re-tagged.
            {"Sid": "TagKeysOfClass", "Effect": "Allow", "Action": ["kms:TagResource"], "Resource": f"{kms}:key/*",
             "Condition": {"StringEquals": new_key_tags,
                           "StringEqualsIfExists": {f"aws:ResourceTag/{TAG_KEY_CLASS}": key_class},
                           "ForAllValues:StringEquals": {"aws:TagKeys": list(KEY_TAGS)}}},
        ]
        if alias:
            # CreateAlias/UpdateAlias need the permission on the alias (here) and on the key(s) (KeyClassKeys).
            statements.append({"Sid": "KeyClassAliases", "Effect": "Allow",
                               "Action": ["kms:CreateAlias", "kms:UpdateAlias"],
                               "Resource": [f"{kms}:alias/{alias}", f"{kms}:alias/{alias}/*"]})
    if role in OBJECT_ACTIONS:
        statements += _s3_statements(role, buckets, arn)
    return {"Version": "2012-10-17", "Statement": statements}


def role_policy(config: KeyClassConfig, role: str, **target: str) -> dict[str, Any]:
    """:func:`aws_policy` of ``role`` for the key class: its name, alias, S3 datasets and deletion window.

    ``target``: ``account`` (required: the key class does not name it) and ``region`` (default: the key
    class's ``aws.region_name``).
    """
    check_target(config, "aws_kms", target, accepted=("account", "region"))
    kc = config.key_class
    account = target.get("account")
    region = target.get("region") or kc.aws_options.region_name
    if not account:
        raise ValueError(f"key class {kc.name!r} (aws_kms): the AWS account id is needed (--account)")
    if not region:
        raise ValueError(f"key class {kc.name!r} (aws_kms): no aws.region_name; the region is needed (--region)")
    return aws_policy(role, key_class=kc.name, key_ref=kc.key_ref, region=region, account=account,
                      buckets=[d.location for d in config.datasets if d.location.startswith("s3://")],
                      deletion_window_days=kc.aws_options.deletion_window_days)


def render(config: KeyClassConfig, **target: str) -> str:
    """Every role's document as one JSON object, role -> document."""
    return json.dumps({role: role_policy(config, role, **target) for role in ROLES}, indent=2) + "\n"


def main(argv: list[str]) -> int:
    """One role's document from command-line arguments alone (no key class file)."""
    parser = argparse.ArgumentParser(prog="python -m keyrotation.policies.aws_kms",
                                     description="Print the IAM policy document of one keyrotation role.")
    parser.add_argument("--role", required=True, choices=ROLES)
    parser.add_argument("--key-class", required=True, help="key class name (the keyrotation:key-class tag value)")
    parser.add_argument("--key-ref", required=True, help="the key class's KMS alias, alias/<name>")
    parser.add_argument("--region", required=True)
    parser.add_argument("--account", required=True, help="12-digit AWS account id")
    parser.add_argument("--bucket", action="append", default=[], metavar="BUCKET/PREFIX",
                        help="S3 location of one of the key class's datasets (repeat for each)")
    parser.add_argument("--deletion-window-days", type=int, metavar="N",
                        help="retire: refuse ScheduleKeyDeletion with a waiting period under N days (the key "
                             "class's aws.deletion_window_days)")
    args = parser.parse_args(argv)
    try:
        document = aws_policy(args.role, key_class=args.key_class, key_ref=args.key_ref, region=args.region,
                              account=args.account, buckets=args.bucket,
                              deletion_window_days=args.deletion_window_days)
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
