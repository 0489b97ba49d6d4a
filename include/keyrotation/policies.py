"""Least privilege: the Vault/OpenBao policy each role needs for one key class's Transit key.

Roles, one Airflow connection (and so one token) each:

* ``rotate``: read the key, create it, add versions. Cannot encrypt, decrypt or change its config.
* ``reencrypt``: read the key; rewrap, encrypt and decrypt with it (PME wraps and unwraps KEKs, and
  validation decrypts). Cannot rotate, retire, trim or change config.
* ``retire``: read the key; raise its minimum versions; trim. Cannot encrypt, decrypt or rotate.
* ``report``: read the key's metadata. Nothing else.

``python -m keyrotation.policies KEY_CLASS`` prints them for a key class, to load with
``bao policy write keyrotation-<key_class>-<role> -``.
"""

from __future__ import annotations

import sys

from keyrotation.config import KeyClass, load_key_class

ROLES = ("rotate", "reencrypt", "retire", "report")


def transit_policies(key_ref: str, mount_point: str = "transit") -> dict[str, str]:
    """HCL policy per role for the Transit key ``key_ref`` at ``mount_point``."""
    keys = f"{mount_point}/keys/{key_ref}"

    def path(p: str, *capabilities: str) -> str:
        quoted = ", ".join(f'"{c}"' for c in capabilities)
        return f'path "{p}" {{\n  capabilities = [{quoted}]\n}}\n'

    read = path(keys, "read")
    return {
        "rotate": path(keys, "read", "create", "update") + path(f"{keys}/rotate", "update"),
        "reencrypt": read + path(f"{mount_point}/rewrap/{key_ref}", "update")
        + path(f"{mount_point}/encrypt/{key_ref}", "update") + path(f"{mount_point}/decrypt/{key_ref}", "update"),
        "retire": read + path(f"{keys}/config", "update") + path(f"{keys}/trim", "update"),
        "report": read,
    }


def policies_for(kc: KeyClass) -> dict[str, str]:
    if kc.backend != "vault_transit":
        raise ValueError(f"key class {kc.name!r}: no policy template for backend {kc.backend!r}")
    return transit_policies(kc.key_ref, kc.mount_point)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m keyrotation.policies KEY_CLASS", file=sys.stderr)
        return 2
    kc = load_key_class(argv[0]).key_class
    for role, hcl in policies_for(kc).items():
        print(f"# keyrotation-{kc.name}-{role}: Airflow connection {kc.conn_for(role)!r}\n{hcl}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
