"""A re-encryption run in its own process, for the fault tests to kill with SIGKILL.

Usage: python fault_worker.py CONFIG_FILE VAULT_URL TOKEN LEDGER_URL DATASET TARGET MODE KILL_AT PARTITION...

KILL_AT > 0: the process kills itself with SIGKILL at the KILL_AT-th engine checkpoint (staged,
material_moved, data_moved, committed, cleaned, rewrapped_file, recorded). KILL_AT = 0: no
self-kill (the test kills it from outside after a delay instead).
"""

from __future__ import annotations

import os
import signal
import sys

import hvac

from keyrotation.backends.vault_transit import VaultTransitBackend
from keyrotation.config import load_key_class_file
from keyrotation.ledger import Ledger, RunContext
from keyrotation.runtime import KeyClassRuntime


def main(argv: list[str]) -> int:
    config_file, url, token, ledger_url, dataset, target, mode, kill_at, *partitions = argv
    config = load_key_class_file(config_file)
    backend = VaultTransitBackend(hvac.Client(url=url, token=token), config.key_class.key_ref)
    rt = KeyClassRuntime(config, backend, Ledger(ledger_url))
    calls = 0

    def checkpoint(name: str) -> None:
        nonlocal calls
        calls += 1
        if calls == int(kill_at):
            print(f"killing at checkpoint {calls}: {name}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    engine = rt.engine(dataset, RunContext(task_id="fault_worker"), checkpoint=checkpoint)
    print("started", flush=True)
    engine.run(partitions, lambda p: engine.process(p, int(target), mode))
    print(f"finished after {calls} checkpoints", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
