"""Peak memory of re-encrypting one partition larger than a memory budget.

Each partition (one Parquet PME file of ``factor`` x budget bytes, or more) is written with the other
datasets, then re-encrypted (mode ``reencrypt``) in a worker process of its own, which
reports its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's high-water mark) and its RSS
just before the partition is read (after imports and the first KMS request). The working set is
their difference; the goal is a working set within the budget.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.common import child_env, run_json

MIB = 1024 * 1024
# Parquet PME bytes per row of the synthetic customers (measured: ~31 at 160k rows a file, ~28 at 1M):
# a low guess, so the partition comes out at least as large as aimed at.
BYTES_PER_ROW_GUESS = 26.0


def plan(budget_mib: float, factors: list[float], data_dir: Path) -> list[dict]:
    """One single-partition dataset per factor, ``factor`` x the budget in file bytes (or more)."""
    out = []
    for factor in factors:
        name = f"memory_x{factor:g}"
        out.append({"name": name, "location": str(data_dir / name), "partitions": 1, "factor": factor,
                    "rows_per_partition": math.ceil(factor * budget_mib * MIB / BYTES_PER_ROW_GUESS)})
    return out


def measure(backend: Any, env: dict[str, str], work: Path, budget_mib: float, datasets: list[dict],
            timeout: float) -> dict:
    """Re-encrypt each (already written) partition of ``datasets`` in a worker process of its own."""
    budget = budget_mib * MIB
    points = []
    for ds in datasets:
        factor, rows = ds["factor"], ds["rows_per_partition"]
        for _ in range(3):  # compressed smaller than guessed: write it again, larger
            if ds["file_bytes"] >= factor * budget:
                break
            rows = math.ceil(rows * factor * budget * 1.05 / ds["file_bytes"])
            shutil.rmtree(ds["location"])
            spec = {"key_ref": backend.key_ref, "version": backend.key_state().latest_version,
                    "result_path": str(work / "w.json"), "datasets": [{**ds, "rows_per_partition": rows}]}
            ds.update(run_json([sys.executable, "-m", "bench.worker", "write", json.dumps(spec)], env,
                               work / "worker.log", work / "w.json", timeout)["datasets"][0])
        target = backend.rotate()
        spec = {"key_ref": backend.key_ref, "name": ds["name"], "location": ds["location"],
                "partition": "2024-01-01", "version": target, "result_path": str(work / "m.json")}
        measured = run_json([sys.executable, "-m", "bench.worker", "reencrypt", json.dumps(spec)], env,
                            work / "worker.log", work / "m.json", timeout)
        working_set = (measured["peak_rss_kb"] - measured["rss_before_kb"]) * 1024
        points.append({
            "factor_target": factor, "rows": measured["rows"], "file_bytes": ds["file_bytes"],
            "arrow_bytes": ds["arrow_bytes"], "partition_over_budget": round(ds["file_bytes"] / budget, 2),
            "write_s": ds["write_s"], "reencrypt_s": measured["wall_s"],
            "rss_before_mib": round(measured["rss_before_kb"] / 1024, 1),
            "peak_rss_mib": round(measured["peak_rss_kb"] / 1024, 1),
            "working_set_mib": round(working_set / MIB, 1),
            "working_set_over_budget": round(working_set / budget, 2),
            "working_set_over_file_bytes": round(working_set / ds["file_bytes"], 2),
            "working_set_over_arrow_bytes": round(working_set / ds["arrow_bytes"], 2),
            "met": working_set <= budget,
        })
    largest = max(points, key=lambda p: p["file_bytes"])
    return {"budget_mib": budget_mib, "points": points, "largest": largest,
            "met": largest["met"] and largest["partition_over_budget"] >= 10,
            "cause": "the engine reads the whole partition into one pyarrow table (engine._read -> pme.read -> "
                     "pq.read_table), hashes it through pandas, writes it, then reads the new file back whole "
                     "for the digest check: memory grows with the partition, not with a row group"}


def env_for(bao_url: str, token: str, ledger_url: str) -> dict[str, str]:
    return child_env({"BENCH_BAO_URL": bao_url, "BENCH_BAO_TOKEN": token, "KEYROTATION_LEDGER_URL": ledger_url})
