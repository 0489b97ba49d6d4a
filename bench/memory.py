"""Peak memory of re-encrypting one partition larger than a memory budget.

Each partition (one Parquet PME file of ``factor`` x budget bytes, or more) is written with the other
datasets, then re-encrypted (mode ``reencrypt``) in a worker process of its own, which
reports its peak RSS (``VmHWM`` of /proc/self/status, the kernel's high-water mark of its own memory; not
``ru_maxrss``, which Linux carries over from the parent across fork + execve) and its RSS just before the
partition is read (after imports and the first KMS request). The working set is
their difference; the goal is a working set within the budget.

The engine streams (``batch_rows`` rows at a time, row groups of ``ROW_GROUP_ROWS``), so the working set
should be flat in the partition's size: each factor is measured in the same run to show it. The largest
partition is then re-encrypted once more with ``ARROW_DEFAULT_MEMORY_POOL=jemalloc`` for the worker, to
show how much of the constant is the allocator (pyarrow's default pool, mimalloc, keeps freed pages).
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
FLAT_SLOPE = 0.1  # log-log slope of the working set vs the partition's size under which it counts as flat


def plan(budget_mib: float, factors: list[float], data_dir: Path) -> list[dict]:
    """One single-partition dataset per factor, ``factor`` x the budget in file bytes (or more)."""
    out = []
    for factor in factors:
        name = f"memory_x{factor:g}"
        out.append({"name": name, "location": str(data_dir / name), "partitions": 1, "factor": factor,
                    "rows_per_partition": math.ceil(factor * budget_mib * MIB / BYTES_PER_ROW_GUESS)})
    return out


def _reencrypt(backend: Any, env: dict[str, str], work: Path, ds: dict, timeout: float,
               module_path: bool = True) -> dict:
    target = backend.rotate()
    spec = {"key_ref": backend.key_ref, "name": ds["name"], "location": ds["location"], "module_path": module_path,
            "partition": "2024-01-01", "version": target, "result_path": str(work / "m.json")}
    return run_json([sys.executable, "-m", "bench.worker", "reencrypt", json.dumps(spec)], env,
                    work / "worker.log", work / "m.json", timeout)


def _point(measured: dict, ds: dict, budget: float) -> dict:
    # VmHWM: this process's own high-water mark. Not ru_maxrss: Linux keeps it across fork + execve, so a
    # worker started by a large parent reports the parent's RSS at the fork as its peak.
    peak_kb = measured.get("vm_hwm_kb") or measured["peak_rss_kb"]
    working_set = (peak_kb - measured["rss_before_kb"]) * 1024
    pool_peak = measured.get("arrow_pool_peak_bytes")
    return {
        "path": measured.get("path"), "rows": measured["rows"], "file_bytes": ds["file_bytes"],
        "arrow_bytes": ds["arrow_bytes"], "partition_over_budget": round(ds["file_bytes"] / budget, 2),
        "write_s": ds["write_s"], "reencrypt_s": measured["wall_s"],
        "memory_pool": measured.get("memory_pool"),
        "arrow_pool_peak_mib": None if pool_peak is None else round(pool_peak / MIB, 1),
        "batch_rows": measured.get("batch_rows"), "row_group_rows": measured.get("row_group_rows"),
        "rss_before_mib": round(measured["rss_before_kb"] / 1024, 1),
        "peak_rss_mib": round(peak_kb / 1024, 1), "peak_rss_source": "VmHWM" if measured.get("vm_hwm_kb") else
        "ru_maxrss", "ru_maxrss_mib": round(measured["peak_rss_kb"] / 1024, 1),
        "working_set_mib": round(working_set / MIB, 1),
        "working_set_over_budget": round(working_set / budget, 2),
        "working_set_over_file_bytes": round(working_set / ds["file_bytes"], 2),
        "working_set_over_arrow_bytes": round(working_set / ds["arrow_bytes"], 2),
        "met": working_set <= budget,
    }


def measure(backend: Any, env: dict[str, str], work: Path, budget_mib: float, datasets: list[dict],
            timeout: float, jemalloc: bool = True) -> dict:
    """Re-encrypt each (already written) partition of ``datasets`` in a worker process of its own; then the
    largest once more under pyarrow's jemalloc pool (``jemalloc``)."""
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
        points.append({"factor_target": factor, **_point(_reencrypt(backend, env, work, ds, timeout), ds, budget)})
    largest = max(points, key=lambda p: p["file_bytes"])
    smallest = min(points, key=lambda p: p["file_bytes"])
    # Flat in the partition's size: log-log slope of the working set against the file size (0 = flat, 1 = linear).
    slope = None
    if largest["file_bytes"] > smallest["file_bytes"] and smallest["working_set_mib"] > 0:
        slope = round(math.log(largest["working_set_mib"] / smallest["working_set_mib"])
                      / math.log(largest["file_bytes"] / smallest["file_bytes"]), 3)
    alt = decode = None
    ds = max(datasets, key=lambda d: d["file_bytes"])
    if largest.get("path") == "module":  # the fallback's memory too: decoding, where the module path cannot apply
        decode = {"factor_target": ds["factor"],
                  **_point(_reencrypt(backend, env, work, ds, timeout, module_path=False), ds, budget)}
    if jemalloc:
        measured = _reencrypt(backend, {**env, "ARROW_DEFAULT_MEMORY_POOL": "jemalloc"}, work, ds, timeout,
                              module_path=False)
        alt = {"factor_target": ds["factor"], "env": "ARROW_DEFAULT_MEMORY_POOL=jemalloc",
               **_point(measured, ds, budget)}
    return {"budget_mib": budget_mib, "points": points, "largest": largest, "decode": decode, "jemalloc": alt,
            "working_set_slope": slope,
            "working_set_ratio": round(largest["working_set_mib"] / smallest["working_set_mib"], 2)
            if smallest["working_set_mib"] > 0 else None,
            "file_ratio": round(largest["file_bytes"] / smallest["file_bytes"], 2),
            "met": largest["met"] and largest["partition_over_budget"] >= 10,
            "cause": cause(budget_mib, largest, alt, slope)}


def cause(budget_mib: float, largest: dict, alt: dict | None, slope: float | None) -> str:
    """Why the working set is what it is (the engine streams, so it should be a constant, not the partition)."""
    flat = slope is not None and abs(slope) <= FLAT_SLOPE
    if largest.get("path") == "module":
        return ("the engine re-encrypts these partitions module by module: it holds one module at a time (a page, "
                "a header, the footer) in buffers it reuses, and writes the new file in pieces of at most 2 MiB, "
                "so the working set does not depend on the partition's size"
                + ("" if slope is None else f" (log-log slope {slope} against the file size)")
                + "; what it holds beyond that is the libraries' first-use allocations and pyarrow's read of the "
                "encrypted columns of two row groups (the independent reader's check)"
                + ("" if largest["met"] else f", {largest['working_set_mib'] - budget_mib:,.0f} MiB above the "
                   f"{budget_mib:g} MiB budget"))
    text = (f"the engine streams the partition ({largest['batch_rows']:,} rows decrypted, hashed "
            f"and re-encrypted at a time, row groups of {largest['row_group_rows']:,} rows, "
            "read through pyarrow.dataset fragments without pre-buffering or read-ahead, then the staged file "
            "read back the same way for the digest check), so "
            + ("the working set should be flat in the partition's size (one size measured here, so that is not "
               "shown)" if slope is None else
               f"the working set is flat in the partition's size (log-log slope {slope} against the file size)"
               if flat else
               f"the working set should be flat in the partition's size, but its log-log slope against the "
               f"file size is {slope}")
            + "; what it holds is a constant: the pages the memory pool keeps after freeing them (pyarrow's default "
            f"{largest['memory_pool']} pool), one decoded batch and the digest's canonical copy of a column, "
            "one row group being encoded and encrypted, and the libraries' first-use allocations (dataset scanner, "
            "Parquet encryption)")
    if largest.get("arrow_pool_peak_mib") is not None:
        text += (f"; Arrow's own allocations peak at {largest['arrow_pool_peak_mib']:,.0f} MiB of the "
                 f"{largest['working_set_mib']:,.0f} MiB")
    if alt is not None:
        text += (f"; with ARROW_DEFAULT_MEMORY_POOL=jemalloc the same partition needs "
                 f"{alt['working_set_mib']:,.0f} MiB")
    if not largest["met"]:
        text += (f". That constant is {largest['working_set_mib'] - budget_mib:,.0f} MiB above the {budget_mib:g} MiB "
                 "budget: meeting it would likely take smaller batches and row groups than the 65,536-row "
                 "defaults, and an allocator that gives freed memory back")
    return text


def env_for(bao_url: str, token: str, ledger_url: str) -> dict[str, str]:
    return child_env({"BENCH_BAO_URL": bao_url, "BENCH_BAO_TOKEN": token, "KEYROTATION_LEDGER_URL": ledger_url})
