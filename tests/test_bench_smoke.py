"""Smoke test of the benchmark suite: ``bench/run.py --size tiny`` end to end, into a temporary folder.

Runs every part for real (OpenBao, the engine, worker processes, the reencrypt DAG under dag.test())
at a tiny size, and checks that each section of the JSON is there with numbers that make sense. It
never writes into bench/results/.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
pytestmark = [pytest.mark.slow, pytest.mark.airflow]


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.exists() else {}


def test_bench_tiny_writes_every_section_with_sane_numbers(tmp_path):
    out = tmp_path / "results"
    before = _snapshot(RESULTS)
    # The test session's Airflow and keyrotation settings are its own; the benchmark sets up its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "KEYROTATION_"))}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--size", "tiny", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(f"bench tiny: {elapsed:.1f} s")
    assert _snapshot(RESULTS) == before, "the smoke run wrote into bench/results/"

    res = json.loads((out / "latest.json").read_text())
    assert {"machine", "meta", "cipher", "kms_per_value", "rewrap", "reencrypt", "memory", "airflow", "summary",
            "goals"} <= set(res)
    assert res["machine"]["cores"] >= 1 and res["machine"]["ram_gib"] > 0 and res["machine"]["cpu_model"]
    assert res["meta"]["size"] == "tiny"
    assert res["meta"]["load_1min_start"] >= 0 and res["meta"]["load_1min_end"] >= 0

    # 1. KEK rotation: one KMS rewrap request per data file (one per partition), plus a constant; not per row.
    datasets = res["rewrap"]["datasets"]
    assert len({(d["rows"], d["partitions"]) for d in datasets}) >= 3
    for ds in datasets:
        assert ds["kms_rewrap_requests"] == ds["partitions"], ds
        assert ds["partitions"] <= ds["kms_requests"] <= ds["partitions"] + 2, ds
        assert ds["kms_requests"] < ds["rows"]
        assert 0 < ds["wall_s"] < 60
    alt = res["kms_per_value"]
    assert alt["rewrap_per_value"]["kms_requests"] == alt["rewrap_per_value"]["values"]
    assert alt["rewrap_batch_250"]["kms_requests"] == math.ceil(alt["rewrap_batch_250"]["values"] / 250)
    assert alt["rewrap_batch_250"]["values_per_s"] > alt["rewrap_per_value"]["values_per_s"] > 0
    head = res["summary"]["headline"]
    assert head["per_value_requests"] == head["rows"] * alt["values_per_row"]
    assert head["vs_per_value_rewrap"] > 1

    # 2. Full re-encryption, against the cipher measured in the same run; SQL tables are not built yet.
    engine = res["reencrypt"]["engine"]
    target = next(d for d in datasets if d["name"] == engine["dataset"])
    assert engine["rows"] == target["rows"] and engine["file_bytes"] > 0
    assert 0 < engine["file_mb_per_cpu_s"] < res["cipher"]["bulk"]["encrypt_mb_s"]
    assert res["cipher"]["bulk"]["encrypt_mb_s"] > 10
    assert res["cipher"]["per_value_columns"]["encrypt_values_per_s"] > 1000
    assert res["reencrypt"]["sql_tables"].startswith(("not built yet", "built"))  # not measured here

    # 3. Memory: the partition is at least 10x the budget, measured in a process of its own.
    largest = res["memory"]["largest"]
    assert largest["partition_over_budget"] >= 10
    assert largest["peak_rss_mib"] > largest["rss_before_mib"] > 10
    assert isinstance(res["memory"]["met"], bool)

    # 4. Airflow: the real DAG ran with the default chunk size and another, every partition done once.
    af = res["airflow"]
    assert {r["chunk_size"] for r in af["runs"]} >= {16} and len(af["runs"]) >= 2
    for run in af["runs"]:
        assert run["state"] == "success" and run["task_states"] == ["success"]
        chunks = math.ceil(af["partitions"] / run["chunk_size"])
        assert run["mapped_chunks"] == chunks and run["task_instances"] == 2 + 2 * chunks
        assert run["ledger_rows"] == 2 * af["partitions"]  # rewrapped + validated, per partition
        assert run["all_partitions_under_target"]
        assert 0 < run["engine_inside_s"] < run["wall_s"]
        assert 0 <= run["overhead_share_inside"] <= 1
        assert run["kms_requests"]["by_operation"]["rewrap"] == af["partitions"]

    for name, goal in res["goals"].items():
        assert isinstance(goal["met"], bool), name
        assert goal["met"] or goal["cause"], f"{name}: not met, but no cause given"

    md = (out / "latest.md").read_text()
    assert res["machine"]["cpu_model"] in md and "this machine" in md and res["reencrypt"]["sql_tables"] in md
    assert "load average" in md.lower()
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
