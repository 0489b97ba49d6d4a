"""Google Cloud on loopback for the tests and ``make demo BACKEND=gcp``: the Cloud KMS test server
(gRPC over TLS, service-account JWTs, IAM enforced) and GCS (``gcp-storage-emulator`` with CMEK),
in one process so that GCS can ask Cloud KMS for a key's primary version.

:class:`GcpTestServers` runs both in this process; :meth:`GcpTestServers.provision` gives a key
class one service account per role with exactly the bindings of :mod:`keyrotation.policies.gcp_kms`,
and returns the Airflow connections (``AIRFLOW_CONN_*`` values) that reach them.

Run as a program (the demo does), it starts both, provisions every key class of ``--config-dir``,
creates ``--bucket``, writes the connections and the CA path to ``--out`` as JSON, and serves
until it is terminated::

    python tests/gcp_servers.py --config-dir DIR --bucket B --tls-dir T --out servers.json
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "include")]

from gcp_kms_server import CloudKmsTestServer  # noqa: E402
from gcs_server import GcsTestServer  # noqa: E402

from keyrotation.config import KeyClassConfig  # noqa: E402
from keyrotation.policies.gcp_kms import ROLES, custom_roles, gcp_bindings, project_of  # noqa: E402

PROJECT = "keyrotation-test"


class GcpTestServers:
    def __init__(self, tls_dir: str | Path, project: str = PROJECT) -> None:
        self.kms = CloudKmsTestServer(tls_dir=str(tls_dir), project=project)
        self.gcs: GcsTestServer | None = None
        self.project = project
        self._defined: set[str] = set()
        self._keyfiles: dict[str, dict] = {}

    def start(self) -> GcpTestServers:
        self.kms.start()
        self.gcs = GcsTestServer(self._primary_of, self._enabled).start()
        return self

    def stop(self) -> None:
        if self.gcs is not None:
            self.gcs.stop()
        self.kms.stop()

    def __enter__(self) -> GcpTestServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _primary_of(self, key_name: str) -> str | None:
        try:
            return self.kms.primary_version_name(key_name)
        except Exception:  # noqa: BLE001 - no such key: GCS refuses the write
            return None

    def _enabled(self, version_name: str) -> bool:
        try:
            return self.kms.version_state(version_name).name == "ENABLED"
        except Exception:  # noqa: BLE001 - no such version: nothing can unwrap it
            return False

    @property
    def ca_path(self) -> str:
        return self.kms.ca_path

    # -- connections --------------------------------------------------------------------------
    def kms_connection(self, keyfile: dict) -> str:
        """``AIRFLOW_CONN_*`` value: a google_cloud_platform connection with a service account key."""
        return json.dumps({"conn_type": "google_cloud_platform", "extra": {
            "keyfile_dict": json.dumps(keyfile), "project": keyfile["project_id"], "kms_endpoint": self.kms.endpoint}})

    def storage_connection(self) -> str:
        """``AIRFLOW_CONN_*`` value for GCS: anonymous, as the emulator expects, at its endpoint."""
        return json.dumps({"conn_type": "google_cloud_platform", "extra": {
            "project": self.project, "storage_endpoint": self.gcs.url}})

    def owner_connection(self) -> str:
        return self.kms_connection(self.kms.owner_keyfile)

    def service_account(self, name: str, project: str | None = None) -> tuple[str, dict]:
        """The member and keyfile of service account ``name`` (made on first use, then the same key)."""
        email = f"{name}@{project or self.project}.iam.gserviceaccount.com"
        if email not in self._keyfiles:
            self._keyfiles[email] = self.kms.add_service_account(email)
        return f"serviceAccount:{email}", self._keyfiles[email]

    def define_roles(self, project: str) -> None:
        for name, role in custom_roles(project).items():
            if name not in self._defined:
                self.kms.define_role(name, role["includedPermissions"])
                self._defined.add(name)

    def provision(self, config: KeyClassConfig) -> dict[str, str]:
        """A service account per role connection of the key class, bound as :mod:`keyrotation.policies.gcp_kms`
        says; returns ``{conn_id: AIRFLOW_CONN value}`` for its per-role connections and its ``conn_id``
        (which gets the rotate account where it is not itself a role's connection)."""
        kc = config.key_class
        project = project_of(kc.key_ref)
        self.define_roles(project)
        # One service account per connection: key classes that share a role's connection share its account,
        # which is then bound on each of their keys.
        members, keyfiles = {}, {}
        for role in ROLES:
            account = kc.conn_for(role).replace("_", "-")[:30].strip("-")
            members[role], keyfiles[role] = self.service_account(account, project)
        iam = gcp_bindings(config, members)
        self.kms.set_policy(kc.key_ref, {b["role"]: b["members"] for b in iam["key_bindings"] if "note" not in b})
        for binding in iam["project_bindings"]:
            policy = self.kms.get_policy(f"projects/{project}")
            policy[binding["role"]] = sorted({*policy.get(binding["role"], []), *binding["members"]})
            self.kms.set_policy(f"projects/{project}", policy)
        connections = {kc.conn_for(role): self.kms_connection(keyfiles[role]) for role in ROLES}
        connections.setdefault(kc.conn_id, self.kms_connection(keyfiles["rotate"]))
        return connections


def _serve(args: argparse.Namespace) -> int:
    from keyrotation.backends.gcp_kms import GcpKmsBackend
    from keyrotation.config import list_key_classes, load_key_class

    servers = GcpTestServers(args.tls_dir, project=args.project).start()
    connections: dict[str, str] = {}
    for name in list_key_classes(args.config_dir):
        config = load_key_class(name, args.config_dir)
        if issubclass(config.key_class.backend_class, GcpKmsBackend):  # the key classes these servers serve
            connections.update(servers.provision(config))
    for bucket in args.bucket:
        servers.gcs.create_bucket(bucket)
    connections[args.storage_conn_id] = servers.storage_connection()
    out: dict[str, Any] = {"ca_path": servers.ca_path, "kms_endpoint": servers.kms.endpoint,
                           "storage_endpoint": servers.gcs.url, "connections": connections}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(args.out)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    servers.stop()
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-dir", required=True, help="key class files; gcp_kms ones are provisioned")
    p.add_argument("--bucket", action="append", default=[], help="GCS bucket to create (repeatable)")
    p.add_argument("--tls-dir", required=True, help="where the server certificate is written (or reused)")
    p.add_argument("--out", required=True, help="JSON file written once the servers are up")
    p.add_argument("--project", default=PROJECT)
    p.add_argument("--storage-conn-id", default="gcs_keyrotation")
    return _serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

