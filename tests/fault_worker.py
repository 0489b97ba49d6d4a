"""A re-encryption run in its own process, for the fault tests to kill with SIGKILL.

Usage: python fault_worker.py CONFIG_FILE VAULT_URL TOKEN LEDGER_URL DATASET TARGET MODE KILL_AT PARTITION...

MODE ``rewrap`` or ``reencrypt`` (one partition after another), or ``rewrap_many`` (the partitions together, as a
mapped task's chunk: ``process_many``).

KILL_AT ``NAME#N``: the process kills itself with SIGKILL at the N-th time the engine reaches its checkpoint
NAME (``tests/test_kill_matrix.py`` lists them from the code); ``0``: no self-kill (the test kills it from
outside). Each checkpoint passed is printed (``checkpoint NAME``), so a test knows where a kill landed.
``$FAULT_STORAGE`` (JSON, optional): ``{"aws": {...AwsCredentials}}`` or ``{"gcp": {...GcpCredentials}}`` for
a dataset in S3 or GCS.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import hvac

from keyrotation.backends.registry import open_backend
from keyrotation.config import load_key_class_file
from keyrotation.ledger import Ledger, RunContext
from keyrotation.runtime import KeyClassRuntime
from keyrotation.stores.filesystems import AwsCredentials, GcpCredentials, Storage


def storage_from_env() -> Storage | None:
    spec = json.loads(os.environ.get("FAULT_STORAGE") or "{}")
    if "aws" in spec:
        return Storage(AwsCredentials(**spec["aws"]))
    if "gcp" in spec:
        return Storage(gcp=GcpCredentials(**spec["gcp"]))
    return None


def main(argv: list[str]) -> int:
    config_file, url, token, ledger_url, dataset, target, mode, kill_at, *partitions = argv
    config = load_key_class_file(config_file)
    backend = open_backend(config.key_class, hvac.Client(url=url, token=token))
    storage = storage_from_env()
    rt = KeyClassRuntime(config, backend, Ledger(ledger_url), **({"storage": lambda _ds: storage} if storage else {}))
    kill_name, _, kill_nth = kill_at.partition("#")
    seen: dict[str, int] = {}

    def checkpoint(name: str) -> None:
        seen[name] = seen.get(name, 0) + 1
        print(f"checkpoint {name}", flush=True)
        if name == kill_name and seen[name] == int(kill_nth):
            print(f"killing at {name}#{kill_nth}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    engine = rt.engine(dataset, RunContext(task_id="fault_worker"), checkpoint=checkpoint)
    print("started", flush=True)
    if mode == "rewrap_many":  # the batched KEK rotation of a mapped task's chunk
        engine.process_many(partitions, int(target), "rewrap")
    else:
        engine.run(partitions, lambda p: engine.process(p, int(target), mode))
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
