"""Least privilege: what each role of a key class may do on its KMS, one module per backend.

Every generator takes the loaded key class (:class:`~keyrotation.config.KeyClassConfig`) and one of
:data:`~keyrotation.config.ROLES`, one Airflow connection (and so one KMS identity) each:

* :mod:`~keyrotation.policies.vault_transit`: the Vault/OpenBao policy (HCL) of each role, and the
  ledger anchor key's two policies (:func:`anchor_policies`);
* :mod:`~keyrotation.policies.aws_kms`: the IAM policy document (needs the AWS account id);
* :mod:`~keyrotation.policies.gcp_kms`: the IAM custom roles and bindings.

``python -m keyrotation.policies KEY_CLASS [--account ID] [--region REGION]`` prints them for a key class,
whatever its backend; ``python -m keyrotation.policies --anchor [KEY]`` prints the anchor key's.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from keyrotation.config import ROLES, KeyClassConfig
from keyrotation.policies.vault_transit import anchor_policies

__all__ = ["BACKENDS", "ROLES", "anchor_policies", "generator", "policies_for", "render"]

#: Backend -> the module that writes its policies: ``role_policy(config, role, **target)`` (one role) and
#: ``render(config, **target)`` (all roles, as the command line prints them). ``target``: where the key class
#: runs, if the key class does not say (``account``, ``region``: AWS). Imported on use, so that
#: ``python -m keyrotation.policies.aws_kms`` does not find its module already imported.
BACKENDS: dict[str, str] = {
    "vault_transit": "keyrotation.policies.vault_transit",
    "aws_kms": "keyrotation.policies.aws_kms",
    "gcp_kms": "keyrotation.policies.gcp_kms",
}


def generator(config: KeyClassConfig) -> ModuleType:
    """The policy module of the key class's backend."""
    return importlib.import_module(BACKENDS[config.key_class.backend])


def policies_for(config: KeyClassConfig, **target: str) -> dict[str, Any]:
    """Each role's policy for the key class, as its backend's :func:`role_policy` writes it."""
    module = generator(config)
    return {role: module.role_policy(config, role, **target) for role in ROLES}


def render(config: KeyClassConfig, **target: str) -> str:
    """Every role's policy for the key class, as ``python -m keyrotation.policies KEY_CLASS`` prints it."""
    return generator(config).render(config, **target)

