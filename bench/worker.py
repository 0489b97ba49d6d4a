"""Benchmark work done in a process of its own, so its memory neither grows the caller nor is hidden by it.

``python -m bench.worker write SPEC_JSON``: write datasets through the engine (``write_partition``).
``python -m bench.worker reencrypt SPEC_JSON``: re-encrypt one partition (mode ``reencrypt``) and report
this process's peak RSS (``VmHWM``; also ``ru_maxrss``, which on Linux includes the parent's RSS at the fork)
and its RSS before the partition was touched,
with the memory pool's name and Arrow's own peak allocation (``MemoryPool.max_memory``).

The KMS is reached through ``BENCH_BAO_URL`` / ``BENCH_BAO_TOKEN``, the ledger through
``KEYROTATION_LEDGER_URL``. The result goes, as JSON, to ``spec["result_path"]``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ENCRYPTED_COLUMNS, setup_path  # noqa: E402

setup_path()


def _vm_kb(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def _engine(key_ref: str, location: str, dataset: str):  # noqa: ANN202 - a ParquetEngine
    import hvac

    from keyrotation.backends.vault_transit import VaultTransitBackend
    from keyrotation.formats.parquet_pme import ParquetEncryption
    from keyrotation.ledger import Ledger, RunContext
    from keyrotation.parquet_engine import ParquetEngine
    from keyrotation.stores.partitions import PartitionStore

    client = hvac.Client(url=os.environ["BENCH_BAO_URL"], token=os.environ["BENCH_BAO_TOKEN"])
    backend = VaultTransitBackend(client, key_ref)
    Path(location).mkdir(parents=True, exist_ok=True)
    store = PartitionStore(location)
    return ParquetEngine("bench", dataset, store, ParquetEncryption(backend, ENCRYPTED_COLUMNS), Ledger(),
                              RunContext(actor="bench"))


def write(spec: dict) -> dict:
    """Write each dataset of ``spec["datasets"]``: ``partitions`` daily partitions of ``rows_per_partition``
    synthetic customer rows (keyrotation_dev.sample_data), under ``version`` of ``key_ref``."""
    from keyrotation_dev.sample_data import customers, daily_partitions

    out = []
    for ds in spec["datasets"]:
        started = time.perf_counter()
        engine = _engine(spec["key_ref"], ds["location"], ds["name"])
        rows = file_bytes = arrow_bytes = 0
        for partition in daily_partitions(ds["partitions"]):
            table = customers(partition, ds["rows_per_partition"])
            arrow_bytes += table.nbytes
            result = engine.write_partition(partition, table, spec["version"])
            rows += result.rows
            file_bytes += result.bytes
            del table
        out.append({"name": ds["name"], "partitions": ds["partitions"], "rows": rows, "file_bytes": file_bytes,
                    "arrow_bytes": arrow_bytes, "write_s": round(time.perf_counter() - started, 3)})
    return {"datasets": out}


def reencrypt(spec: dict) -> dict:
    """Re-encrypt one partition; peak RSS of this process, and its RSS just before the partition is read."""
    import pyarrow as pa

    from keyrotation import ledger as lg
    from keyrotation.formats.parquet_pme import ROW_GROUP_ROWS

    engine = _engine(spec["key_ref"], spec["location"], spec["name"])
    engine.module_path = spec.get("module_path", True)
    engine._known_versions()  # the KMS round trip the engine makes first, so the client is set up
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    current_kb = _vm_kb("VmRSS")
    started = time.perf_counter()
    result = engine.process(spec["partition"], spec["version"], "reencrypt")
    wall = time.perf_counter() - started
    if result.action != "reencrypted":
        raise SystemExit(f"partition {spec['partition']}: {result.action} {result.error or ''}")
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    detail = json.loads(engine.ledger.rows(events_in=(lg.PARTITION_REENCRYPTED,))[-1]["detail"])
    return {"path": detail.get("path"), "rows": result.rows, "file_bytes": result.bytes, "wall_s": round(wall, 3),
            "rss_before_kb": current_kb, "maxrss_before_kb": baseline_kb, "peak_rss_kb": peak_kb,
            "vm_hwm_kb": _vm_kb("VmHWM"), "memory_pool": pa.default_memory_pool().backend_name,
            "arrow_pool_peak_bytes": pa.default_memory_pool().max_memory(), "batch_rows": engine.batch_rows,
            "row_group_rows": ROW_GROUP_ROWS}


def main(argv: list[str]) -> int:
    action, spec = argv[0], json.loads(argv[1])
    result = {"write": write, "reencrypt": reencrypt}[action](spec)
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
