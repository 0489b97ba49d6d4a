"""Least privilege on Google Cloud: the IAM custom roles and bindings each role of a key class needs.

The same four roles as the Vault policies (:mod:`keyrotation.policies.vault_transit`) and the AWS
documents (:mod:`keyrotation.policies.aws_kms`), one service account (and so one Airflow
``google_cloud_platform`` connection) each, every binding on the key class's CryptoKey:

* ``rotate``: read the key and its versions, add versions, make one the primary
  (``cryptoKeys.update``), sync the rotation schedule. Cannot encrypt, decrypt, disable or destroy.
* ``reencrypt``: read the key and its versions; encrypt and decrypt with them (Cloud KMS has no
  server-side re-encrypt). Cannot add, promote, disable or destroy versions.
* ``retire``: read the key and its versions; disable (``cryptoKeyVersions.update``) and destroy
  them. Cannot encrypt, decrypt or add versions.
* ``report``: read the key and its versions (the predefined ``roles/cloudkms.viewer``).

The predefined roles are broader: ``roles/cloudkms.admin`` (which rotate and retire would otherwise
need) can also destroy and change IAM, so each role here is a custom role with exactly its
permissions. Creating the key ring and key (``create_if_missing``) needs a fourth custom role on the
project, for the rotate account only; drop it where keys are made by Terraform or by hand. No role
holds ``cryptoKeyVersions.restore``, ``cryptoKeyVersions.useToEncrypt`` outside reencrypt, or any
``setIamPolicy``, ``importJobs`` or ``ekmConnections`` permission.

What Cloud KMS IAM cannot limit (a permission covers every field of its request, and IAM Conditions
see the resource, not the request): ``cryptoKeys.update``, which promoting a version needs, also sets
the rotation schedule (versions Cloud KMS adds by itself) and the version template (e.g. SOFTWARE
instead of HSM for new versions); ``cryptoKeyVersions.update``, which disabling needs, also re-enables
a disabled version; ``cryptoKeys.create`` takes any purpose, algorithm, protection level and
destroy-scheduled duration. ``retire_below`` reads the key back and fails if a version below the new
minimum is still enabled; organization policies (``constraints/cloudkms.allowedProtectionLevels``,
``constraints/cloudkms.minimumDestroyScheduledDuration``, ``constraints/cloudkms.disableBeforeDestroy``)
cover part of the rest. See ``docs/gcp-iam/README.md``.

GCS permissions (datasets on ``gs://``) go on the bucket, limited to the dataset prefixes with an
IAM condition; CMEK objects also need the bucket's GCS service agent to hold
``roles/cloudkms.cryptoKeyEncrypterDecrypter`` on the key, since GCS itself wraps and unwraps.

``python -m keyrotation.policies KEY_CLASS`` prints the roles and bindings as JSON (:func:`render`).
"""

from __future__ import annotations

import json
from typing import Any

from keyrotation.config import ROLES, KeyClassConfig
from keyrotation.policies.base import check_target

_READ = ["cloudkms.cryptoKeys.get", "cloudkms.cryptoKeyVersions.get", "cloudkms.cryptoKeyVersions.list"]

#: Cloud KMS permissions on the key class's CryptoKey, by role.
KMS_PERMISSIONS: dict[str, list[str]] = {
    "rotate": [*_READ, "cloudkms.cryptoKeyVersions.create", "cloudkms.cryptoKeys.update"],
    "reencrypt": [*_READ, "cloudkms.cryptoKeyVersions.useToEncrypt", "cloudkms.cryptoKeyVersions.useToDecrypt"],
    "retire": [*_READ, "cloudkms.cryptoKeyVersions.update", "cloudkms.cryptoKeyVersions.destroy"],
    "report": list(_READ),
}
#: On the project, for the rotate role of a key class with ``create_if_missing`` only. Cloud KMS takes no
#: IAM binding on a key that does not exist yet, so reading it (NOT_FOUND rather than PERMISSION_DENIED
#: before it exists, its state right after) must be granted above the key too.
CREATE_PERMISSIONS = ["cloudkms.keyRings.get", "cloudkms.keyRings.create", "cloudkms.cryptoKeys.create",
                      *_READ]
#: GCS permissions on the dataset buckets (condition: the dataset prefixes), by role.
STORAGE_PERMISSIONS: dict[str, list[str]] = {
    "rotate": [],
    "reencrypt": ["storage.objects.list", "storage.objects.get", "storage.objects.create", "storage.objects.delete"],
    "retire": ["storage.objects.list", "storage.objects.get"],
    "report": ["storage.objects.list", "storage.objects.get"],
}
#: What GCS's service agent needs on the key to encrypt CMEK objects (GCS wraps and unwraps itself).
SERVICE_AGENT_ROLE = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
_ROLE_IDS = {"rotate": "Rotator", "reencrypt": "Reencryptor", "retire": "Retirer", "report": "Reporter"}


def role_name(project: str, role: str) -> str:
    """The custom role resource name of ``role`` (e.g. ``projects/P/roles/keyrotationRotator``)."""
    return f"projects/{project}/roles/keyrotation{_ROLE_IDS[role]}"


def creator_role_name(project: str) -> str:
    return f"projects/{project}/roles/keyrotationKeyCreator"


def project_of(key_ref: str) -> str:
    return key_ref.split("/")[1]


def custom_roles(project: str) -> dict[str, dict[str, Any]]:
    """The custom roles, as ``projects.roles.create`` takes them (``includedPermissions``)."""
    roles = {role_name(project, r): {"title": f"keyrotation {r}", "stage": "GA",
                                     "includedPermissions": sorted(KMS_PERMISSIONS[r])} for r in ROLES}
    roles[creator_role_name(project)] = {"title": "keyrotation key creator", "stage": "GA",
                                         "includedPermissions": sorted(CREATE_PERMISSIONS)}
    return roles


def _prefix_condition(role: str, datasets: list[tuple[str, str]]) -> dict[str, str]:
    expr = " || ".join(f'resource.name.startsWith("projects/_/buckets/{b}/objects/{p}")' for b, p in datasets)
    return {"title": f"keyrotation {role}: dataset prefixes", "expression": expr}


def gcp_bindings(config: KeyClassConfig, members: dict[str, str]) -> dict[str, Any]:
    """Custom roles and every binding of a key class, ``members`` being ``{role: "serviceAccount:..."}``."""
    kc = config.key_class
    project = project_of(kc.key_ref)
    key_bindings = [{"role": role_name(project, r), "members": [members[r]]} for r in ROLES if r in members]
    project_bindings = []
    if kc.create_if_missing and "rotate" in members:
        project_bindings.append({"role": creator_role_name(project), "members": [members["rotate"]]})
    buckets: dict[str, list[tuple[str, str]]] = {}
    cmek = False
    for ds in config.datasets:
        if ds.location.startswith("gs://"):
            bucket, _, prefix = ds.location[len("gs://"):].partition("/")
            buckets.setdefault(bucket, []).append((bucket, prefix.strip("/") + "/" if prefix else ""))
            cmek = cmek or ds.format == "gcs_cmek_objects"
    bucket_bindings = {
        bucket: [{"permissions": STORAGE_PERMISSIONS[r], "members": [members[r]],
                  "condition": _prefix_condition(r, prefixes)}
                 for r in ROLES if r in members and STORAGE_PERMISSIONS[r]]
        for bucket, prefixes in buckets.items()
    }
    if cmek:
        key_bindings.append({"role": SERVICE_AGENT_ROLE,
                             "members": ["serviceAccount:service-PROJECT_NUMBER@gs-project-accounts.iam."
                                         "gserviceaccount.com"],
                             "note": "GCS's service agent of the bucket's project, for CMEK objects"})
    return {"custom_roles": custom_roles(project), "key": kc.key_ref, "key_bindings": key_bindings,
            "project_bindings": project_bindings, "bucket_bindings": bucket_bindings}


def default_member(config: KeyClassConfig, role: str) -> str:
    """The service account ``keyrotation-<key class>-<role>@<project>`` of ``role``."""
    kc = config.key_class
    return (f"serviceAccount:keyrotation-{kc.name.replace('_', '-')}-{role}@{project_of(kc.key_ref)}."
            "iam.gserviceaccount.com")


def role_policy(config: KeyClassConfig, role: str, **target: str) -> dict[str, Any]:
    """The custom roles and the bindings of ``role`` alone, for its :func:`default_member`."""
    check_target(config, "gcp_kms", target)
    return gcp_bindings(config, {role: default_member(config, role)})


def render(config: KeyClassConfig, **target: str) -> str:
    """The custom roles and every role's bindings, for the :func:`default_member` of each, as JSON."""
    check_target(config, "gcp_kms", target)
    return json.dumps(gcp_bindings(config, {r: default_member(config, r) for r in ROLES}), indent=2) + "\n"
