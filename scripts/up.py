"""`make up`: Airflow (standalone) with these DAGs and an OpenBao server, UI on localhost:8080.

OpenBao runs with integrated storage under var/up/openbao, so keys survive restarts (its unseal key
and root token are in var/up/openbao/init.json, mode 0600: local use only). The Airflow connection
``vault_keyrotation`` is set in the environment. On first start, the demo datasets are written
(30 daily partitions each) under the key classes' first key version, so every DAG has data to work
on. The shipped retire policies apply: a grace period and a human approval in the UI (Browse ->
Required Actions).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("KEYROTATION_UP_HOME", ROOT / "var" / "up")).resolve()
BAO_PORT = int(os.environ.get("KEYROTATION_BAO_PORT", "8200"))


def main() -> int:
    HOME.mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "AIRFLOW_HOME": str(HOME / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__API__HOST": "127.0.0.1",  # the UI on loopback only
        "KEYROTATION_HOME": str(HOME),
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("include", "plugins", "dags")),
        # airflow standalone starts its components as `airflow ...` from PATH.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    })
    from keyrotation.devserver import OpenBaoFileServer

    with OpenBaoFileServer(HOME / "openbao", port=BAO_PORT, log_path=str(HOME / "openbao.log")) as bao:
        os.environ["AIRFLOW_CONN_VAULT_KEYROTATION"] = bao.airflow_connection_uri()
        print(f"OpenBao on {bao.url} (data: {HOME / 'openbao'})", flush=True)
        seed_demo_data(bao)
        print("Starting airflow standalone: UI on http://localhost:8080 (login printed below)", flush=True)
        proc = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), "standalone"])
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            return proc.wait()


def seed_demo_data(bao) -> None:  # noqa: ANN001
    from keyrotation.backends.vault_transit import VaultTransitBackend
    from keyrotation.config import list_key_classes, load_key_class
    from keyrotation.ledger import Ledger, RunContext
    from keyrotation.rotation import update_reference
    from keyrotation.runtime import KeyClassRuntime
    from keyrotation.sample_data import DATASET_WRITERS

    ledger = Ledger()
    ctx = RunContext(actor="make up")
    for name in list_key_classes():
        config = load_key_class(name)
        kc = config.key_class
        rt = KeyClassRuntime(config, VaultTransitBackend(bao.client(), kc.key_ref, kc.mount_point), ledger)
        for ds in config.datasets:
            if Path(ds.location).exists() or ds.name not in DATASET_WRITERS:
                continue
            state = rt.backend.key_state()
            if not state.exists:
                state = rt.backend.create_key()
            update_reference(name, state.latest_version, ledger, ctx)
            engine = rt.engine(ds.name, ctx)
            for partition, table in DATASET_WRITERS[ds.name](30, 1_000):
                engine.write_partition(partition, table, state.latest_version)
            print(f"wrote 30 demo partitions of {ds.name} under {kc.key_ref} v{state.latest_version}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
