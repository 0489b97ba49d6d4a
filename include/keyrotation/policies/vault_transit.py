"""Least privilege: the Vault/OpenBao policy each role needs for one key class's Transit key.

Roles, one Airflow connection (and so one token) each:

* ``rotate``: read the key, create it, add versions. Cannot encrypt, decrypt or change its config.
* ``reencrypt``: read the key; rewrap, encrypt and decrypt with it (PME wraps and unwraps KEKs, and
  validation decrypts). Cannot create, rotate, retire, trim or change config.
* ``retire``: read the key; raise its minimum versions; trim. Cannot encrypt, decrypt or rotate.
* ``report``: read the key's metadata. Nothing else.

Every path a role may write to also limits the request's parameters to exactly those
:class:`~keyrotation.backends.vault_transit.VaultTransitBackend` sends (``allowed_parameters``: any
other parameter is refused with 403, whatever its value; ``denied_parameters = {"*" = []}``: none):

* ``transit/keys/<key>`` (rotate): ``type`` = ``aes256-gcm96`` only, so no other key type and no
  ``derived``, ``convergent_encryption``, ``exportable``, ``allow_plaintext_backup`` or
  ``auto_rotate_period``. Transit has no existence check on this path: creating is ``update``.
* ``transit/keys/<key>/rotate`` (rotate): no parameters (e.g. no ``managed_key_name``).
* ``transit/keys/<key>/config`` (retire): ``min_encryption_version`` and ``min_decryption_version``
  only, so never ``exportable``, ``allow_plaintext_backup`` (both irreversible), ``deletion_allowed``
  or ``auto_rotate_period``.
* ``transit/keys/<key>/trim`` (retire): ``min_available_version`` only.

A policy limits which parameters a request carries and which literal values they take, never how a
value compares with the key's current state: it cannot say "only raise the minimum versions". The
retire token can therefore lower them through the API; the retire task never does, and checks it:
``VaultTransitBackend.retire_below`` refuses a minimum below the current one, and reads both back
after the update.

The ledger's anchor key (:mod:`keyrotation.anchoring`), which HMACs the checkpoints of the ledger's
hash-chain head, has two policies of its own (:func:`anchor_policies`), and no key class role reaches it:

* ``anchor-writer``: ``update`` on ``transit/hmac/<key>`` only (``input``, and ``algorithm`` =
  ``sha2-256``). It cannot create the key: ``make up`` creates it with the root token; elsewhere an
  administrator does (``bao write -f transit/keys/<key>``).
* ``anchor-verifier``: read the key; ``update`` on ``transit/verify/<key>`` (``name``, ``input``,
  ``hmac``, ``hash_algorithm`` = ``sha2-256``). An auditor's token needs this one only.

Neither can encrypt, decrypt, rotate, change the config or export. The checkpoint task holds both (it
verifies the latest checkpoint before it writes the next one).

``python -m keyrotation.policies KEY_CLASS`` prints them for a key class (:func:`render`), to load with
``bao policy write keyrotation-<key_class>-<role> -``; ``python -m keyrotation.policies --anchor [KEY]``
prints the anchor key's.
"""

from __future__ import annotations

import json

from keyrotation.backends.vault_transit import KEY_TYPE
from keyrotation.config import KeyClassConfig
from keyrotation.policies.base import check_target

__all__ = ["anchor_policies", "render", "role_policy", "transit_policies"]

#: ``allowed_parameters`` per write path (relative to ``transit/keys/<key>``): name -> allowed values
#: (``[]``: any value). An empty mapping: no parameter at all (``denied_parameters = {"*" = []}``).
KEY_PARAMETERS: dict[str, dict[str, list[str]]] = {
    "": {"type": [KEY_TYPE]},
    "/rotate": {},
    "/config": {"min_encryption_version": [], "min_decryption_version": []},
    "/trim": {"min_available_version": []},
}


def _path(p: str, capabilities: list[str], parameters: dict[str, list[str]] | None = None) -> str:
    """One HCL path block; ``parameters`` as in :data:`KEY_PARAMETERS`, None for no limit (read-only paths
    and the encrypt, decrypt and rewrap paths, which change nothing about the key)."""
    quoted = ", ".join(f'"{c}"' for c in capabilities)
    lines = [f'path "{p}" {{', f"  capabilities = [{quoted}]"]
    if parameters == {}:
        lines.append('  denied_parameters = {\n    "*" = []\n  }')
    elif parameters:
        allowed = "".join(f'    "{name}" = {json.dumps(values)}\n' for name, values in parameters.items())
        lines.append(f"  allowed_parameters = {{\n{allowed}  }}")
    return "\n".join(lines) + "\n}\n"


def transit_policies(key_ref: str, mount_point: str = "transit") -> dict[str, str]:
    """HCL policy per role for the Transit key ``key_ref`` at ``mount_point``."""
    keys = f"{mount_point}/keys/{key_ref}"

    def write(suffix: str) -> str:
        return _path(f"{keys}{suffix}", ["update"], KEY_PARAMETERS[suffix])

    read = _path(keys, ["read"])
    return {
        # One block for the key's path: read, and create (an update, with the type limited).
        "rotate": _path(keys, ["read", "update"], KEY_PARAMETERS[""]) + write("/rotate"),
        "reencrypt": read + "".join(_path(f"{mount_point}/{op}/{key_ref}", ["update"])
                                    for op in ("rewrap", "encrypt", "decrypt")),
        "retire": read + write("/config") + write("/trim"),
        "report": read,
    }


#: ``allowed_parameters`` of the anchor key's two paths, exactly what :class:`~keyrotation.anchoring.TransitAnchor`
#: sends (hvac's ``generate_hmac`` and ``verify_signed_data``).
ANCHOR_PARAMETERS: dict[str, dict[str, list[str]]] = {
    "hmac": {"input": [], "algorithm": ["sha2-256"]},
    "verify": {"name": [], "input": [], "hmac": [], "hash_algorithm": ["sha2-256"]},
}


def anchor_policies(key: str, mount_point: str = "transit") -> dict[str, str]:
    """HCL of ``anchor-writer`` and ``anchor-verifier`` for the ledger's anchor key ``key``."""
    return {
        "anchor-writer": _path(f"{mount_point}/hmac/{key}", ["update"], ANCHOR_PARAMETERS["hmac"]),
        "anchor-verifier": _path(f"{mount_point}/keys/{key}", ["read"])
        + _path(f"{mount_point}/verify/{key}", ["update"], ANCHOR_PARAMETERS["verify"]),
    }


def role_policy(config: KeyClassConfig, role: str, **target: str) -> str:
    """The HCL policy of ``role`` for the key class's Transit key."""
    check_target(config, "vault_transit", target)
    kc = config.key_class
    return transit_policies(kc.key_ref, kc.mount_point)[role]


def render(config: KeyClassConfig, **target: str) -> str:
    """Each role's policy, headed by the name to load it under and the role's Airflow connection."""
    check_target(config, "vault_transit", target)
    kc = config.key_class
    return "".join(f"# keyrotation-{kc.name}-{role}: Airflow connection {kc.conn_for(role)!r}\n{hcl}\n"
                   for role, hcl in transit_policies(kc.key_ref, kc.mount_point).items())
