"""KEK rotation of Parquet PME datasets through the package's engine: ``ParquetEngine.process(p, v, "rewrap")``.

Datasets of R rows in P daily partitions (one data file each), written through the engine
(``write_partition``) in a worker process, then rotated: the Transit key gets a new version and
every partition is re-wrapped to it, ``repeats`` times. Each run's wall time and the HTTP requests
it sent to the KMS (counted under hvac) are recorded.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import ENCRYPTED_COLUMNS, KmsCounter, cpu_seconds

KEY = "bench-rewrap"


def dataset_name(rows: int, partitions: int) -> str:
    return f"r{rows}_p{partitions}"


def plan(rows_values: list[int], partition_values: list[int], r_sweep_at: list[int],
         p_sweep_at: list[int]) -> list[dict]:
    """The datasets: every R at each P of ``r_sweep_at``, every P at each R of ``p_sweep_at``."""
    points = {(r, p) for p in r_sweep_at for r in rows_values} | {(r, p) for r in p_sweep_at for p in partition_values}
    return [{"name": dataset_name(r, p), "rows": r, "partitions": p, "rows_per_partition": r // p}
            for r, p in sorted(points, key=lambda rp: (rp[1], rp[0]))]


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x): 0 = flat, 1 = linear."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((x - mx) ** 2 for x in lx)
    return round(sum((x - mx) * (y - my) for x, y in zip(lx, ly, strict=True)) / den, 3) if den else None


def engine_for(backend: Any, ledger: Any, location: str, dataset: str) -> Any:
    from keyrotation.formats.parquet_pme import ParquetEncryption
    from keyrotation.ledger import RunContext
    from keyrotation.parquet_engine import ParquetEngine
    from keyrotation.stores.partitions import PartitionStore

    return ParquetEngine("bench", dataset, PartitionStore(location), ParquetEncryption(backend, ENCRYPTED_COLUMNS),
                              ledger, RunContext(actor="bench"))


def measure(backend: Any, ledger: Any, counter: KmsCounter, datasets: list[dict], data_dir: Path,
            repeats: int) -> None:
    """Re-wrap every dataset ``repeats`` times (a key rotation before each round); adds ``runs`` to each."""
    from keyrotation_dev.sample_data import daily_partitions

    for ds in datasets:
        ds["runs"] = []
    for _ in range(repeats):
        target = backend.rotate()
        for ds in datasets:
            partitions = daily_partitions(ds["partitions"])
            engine = engine_for(backend, ledger, str(data_dir / ds["name"]), ds["name"])
            counter.reset()
            start, cpu0 = time.perf_counter(), cpu_seconds()
            results = engine.run(partitions, lambda p, e=engine, v=target: e.process(p, v, "rewrap"))
            wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
            actions = {r.action for r in results}
            if actions != {"rewrapped"}:
                errors = [r.error for r in results if r.error][:3]
                raise RuntimeError(f"{ds['name']}: rewrap ended {actions}: {errors}")
            ds["runs"].append({"to_version": target, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
                               "kms": counter.snapshot()})
    for ds in datasets:
        walls = [r["wall_s"] for r in ds["runs"]]
        ds["wall_s"] = round(statistics.median(walls), 4)
        ds["wall_s_min"], ds["wall_s_max"] = min(walls), max(walls)
        ds["cpu_s"] = round(statistics.median(r["cpu_s"] for r in ds["runs"]), 4)
        kms = ds["runs"][-1]["kms"]
        ds["kms_requests"] = kms["total"]
        ds["kms_rewrap_requests"] = kms["by_operation"].get("rewrap", 0)
        ds["kms_seconds"] = kms["seconds"]
        ds["kms_requests_per_partition"] = round(kms["total"] / ds["partitions"], 3)
        ds["seconds_per_partition"] = round(ds["wall_s"] / ds["partitions"], 5)
        ds["rows_per_s"] = round(ds["rows"] / ds["wall_s"], 1)


def measure_batched(backend: Any, ledger: Any, counter: KmsCounter, location: str, partitions: int,
                    rows_per_partition: int) -> dict:
    """The batched KEK rotation a mapped task runs on its chunk (``ParquetEngine.process_many`` in mode rewrap):
    ``partitions`` partitions of ``rows_per_partition`` rows written through the engine (one data file, so one
    KEK, each), the key rotated, then all of them re-wrapped as one chunk; the KMS requests counted as
    :func:`measure` counts them."""
    from keyrotation_dev.sample_data import customers, daily_partitions

    name = f"batched_p{partitions}"
    days = daily_partitions(partitions)
    engine = engine_for(backend, ledger, location, name)
    version = backend.key_state().latest_version
    start = time.perf_counter()
    for partition in days:
        engine.write_partition(partition, customers(partition, rows_per_partition), version)
    write_s = time.perf_counter() - start
    target = backend.rotate()
    engine = engine_for(backend, ledger, location, name)
    counter.reset()
    start, cpu0 = time.perf_counter(), cpu_seconds()
    results = engine.process_many(days, target, "rewrap")
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    kms = counter.snapshot()
    actions = {r.action for r in results}
    if actions != {"rewrapped"} or len(results) != partitions:
        errors = [r.error for r in results if r.error][:3]
        raise RuntimeError(f"{name}: batched rewrap ended {actions}: {errors}")
    return {"partitions": partitions, "rows_per_partition": rows_per_partition, "to_version": target,
            "write_s": round(write_s, 3), "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
            "kms_requests": kms["total"], "kms_rewrap_requests": kms["by_operation"].get("rewrap", 0),
            "kms_seconds": kms["seconds"], "partitions_per_s": round(partitions / wall, 1)}


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.rewrap --partitions N``: :func:`measure_batched` alone, on a fresh OpenBao; prints it."""
    import argparse
    import json
    import tempfile

    from bench.common import setup_path

    setup_path()
    from keyrotation.backends.vault_transit import VaultTransitBackend
    from keyrotation.ledger import Ledger
    from keyrotation_dev.devserver import OpenBaoDevServer

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--partitions", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=10, help="rows per partition")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-rewrap-") as work, \
            OpenBaoDevServer(log_path=str(Path(work) / "openbao.log")) as bao:
        counter = KmsCounter().install()
        backend = VaultTransitBackend(bao.client(), KEY)
        backend.create_key()
        ledger = Ledger(f"sqlite:///{Path(work) / 'ledger.db'}")
        out = measure_batched(backend, ledger, counter, str(Path(work) / "data"), args.partitions, args.rows)
        counter.uninstall()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
