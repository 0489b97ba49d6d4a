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
import sqlalchemy as sa

from helpers import PG_URL
from keyrotation.stores.data_keys import DATA_KEYS

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

    # The batched KEK rotation of one chunk (process_many): its partitions' KEKs in one Transit batch request.
    batched = res["rewrap_batched"]
    assert batched["partitions"] == 40 and batched["kms_rewrap_requests"] == 1, batched
    assert batched["kms_requests"] <= 3 and batched["partitions_per_s"] > 0, batched
    assert res["goals"]["kek_rotation_batched"]["kms_requests"] == batched["kms_requests"]

    # 2. Full re-encryption, against the cipher measured in the same run (the SQL path: section 6 below).
    engine = res["reencrypt"]["engine"]
    target = next(d for d in datasets if d["name"] == engine["dataset"])
    assert engine["rows"] == target["rows"] and engine["file_bytes"] > 0
    assert 0 < engine["file_mb_per_cpu_s"] < res["cipher"]["bulk"]["encrypt_mb_s"]
    assert res["cipher"]["bulk"]["encrypt_mb_s"] > 10
    # The module path's shares divide by bulk AES-256-GCM measured beside it, each in-memory repeat by its own.
    modules = res["reencrypt"]["modules"]
    mem = modules["in_memory"]
    assert len(mem["shares"]) == mem["repeats"] and len(modules["bulk_mb_s_calls"]) == 6
    assert mem["share_of_bulk"] == round(sorted(mem["shares"])[mem["repeats"] // 2], 4)
    assert mem["repeats"] % 2 == 1 and math.isclose(
        modules["share_of_bulk"], modules["file_mb_per_cpu_s"] / modules["bulk_mb_s"], rel_tol=1e-3, abs_tol=1e-4)
    assert modules["data_key_bits"] == 128  # pyarrow's default data keys: their own cipher is reported beside
    assert res["goals"]["reencrypt_modules_in_memory"]["share"] == mem["share_of_bulk"]
    assert res["goals"]["reencrypt_modules_file"]["share"] == modules["share_of_bulk"]
    # The engine's page walk is the C one (make install built it); the Python walk is measured beside it.
    assert modules["page_walk"] == "C" and mem["python_walk"]["cpu_s"] > 0
    assert res["cipher"]["per_value_columns"]["encrypt_values_per_s"] > 1000

    # 3. Memory: the partition is at least 10x the budget, measured in a process of its own.
    largest = res["memory"]["largest"]
    assert largest["partition_over_budget"] >= 10
    assert largest["peak_rss_mib"] > largest["rss_before_mib"] > 10
    assert isinstance(res["memory"]["met"], bool)

    # 4. Airflow: the real DAG ran with the default chunking (sized by work) and another, every partition done once.
    af = res["airflow"]
    assert {r["chunk_size"] for r in af["runs"]} >= {None} and len(af["runs"]) >= 2  # None: sized by work
    for run in af["runs"]:
        assert run["state"] == "success" and run["task_states"] == ["success"]
        # Sized by work, tiny partitions of a few milliseconds each make one chunk of the whole sweep.
        chunks = math.ceil(af["partitions"] / run["chunk_size"]) if run["chunk_size"] else 1
        assert run["mapped_chunks"] == chunks and run["task_instances"] == 2 + 2 * chunks
        assert run["ledger_rows"] == 2 * af["partitions"]  # rewrapped + validated, per partition
        assert run["all_partitions_under_target"]
        assert 0 < run["engine_inside_s"] < run["wall_s"]
        assert 0 <= run["overhead_share_inside"] <= 1
        # A mapped task re-wraps its chunk's KEKs in one batch request (at most 250 a request).
        assert run["kms_requests"]["by_operation"]["rewrap"] == chunks

    # 6. The SQL-table path on PostgreSQL: rewrap re-wraps the data-key rows only (one KMS request per partition's
    # data keys, not one table row written); reencrypt rewrites every value, with the database references beside it.
    sql = res["sql_table"]
    assert "skipped" not in sql, sql.get("skipped")
    parts = sql["partitions"]
    assert len({t["rows"] for t in sql["tables"]}) >= 2
    for t in sql["tables"]:
        rw = t["rewrap"]
        assert rw["kms_rewrap_requests"] == rw["data_keys"] == parts, rw
        assert parts <= rw["kms_requests"] <= parts + 2, rw
        assert rw["table_rows_written"] == 0
        assert 0 < rw["census_s"] < rw["wall_s"] and rw["rows_per_s"] > 0
        assert t["write"]["rows"] == t["rows"] and t["write"]["ciphertext_bytes"] > t["write"]["plaintext_bytes"] > 0
    r = sql["reencrypt"]
    assert r["rows"] == sql["reencrypt_rows"] and r["plaintext_unchanged"]
    assert r["kms"]["by_operation"] == {"decrypt": parts, "encrypt": parts}  # one new data key, one old, a partition
    assert r["batches"] >= r["rows"] / sql["batch_size"]
    assert sql["reference_update"]["rows"] == sql["reference_round_trip"]["rows"] == r["rows"]
    assert sql["validate"]["rows"] == sql["validate_after"]["rows"] == r["rows"]
    assert 0 < r["share_of_reference_round_trip"] < 5 and 0 < r["share_of_reference_update"] < 5
    assert 0 < r["database_share"] < 1
    assert 0 < r["plaintext_mb_per_cpu_s"] < res["cipher"]["bulk"]["encrypt_mb_s"]
    assert abs(sum(r["stages_s"].values()) - r["wall_s"]) < 0.01
    assert sql["local_cipher"]["reencrypt_rows_per_s"] > 0
    assert {"sql_kms_calls_o_data_keys", "sql_rewrap_flat_in_r", "sql_reencrypt_bounded_by_db"} <= set(res["goals"])
    assert res["goals"]["sql_kms_calls_o_data_keys"]["met"]
    assert res["summary"]["sql_table"]["reencrypt_rows_per_s"] == r["rows_per_s"]
    db = sa.create_engine(PG_URL)
    try:
        with db.connect() as conn:  # the benchmark's tables and their data keys are gone
            for t in sql["tables"]:
                assert not sa.inspect(conn).has_table(t["table"])
                assert not conn.execute(sa.text(f"SELECT count(*) FROM {DATA_KEYS} WHERE table_name = :t"),
                                        {"t": t["table"]}).scalar()
    finally:
        db.dispose()

    # 4b. The same sweep at the larger size, default configuration only.
    large = res["airflow_large"]
    [run] = large["runs"]
    assert run["chunk_size"] is None and run["state"] == "success" and run["all_partitions_under_target"]
    assert run["ledger_rows"] == 2 * large["partitions"] and large["partitions"] > af["partitions"]
    assert res["goals"]["airflow_overhead_large"]["share"] == run["overhead_share_inside"]
    # With each partition's own duration, the ledger's durations fit in the run.
    assert 0 <= run["overhead_share_ledger"] <= 1 and 0 <= af["runs"][0]["overhead_share_ledger"] <= 1

    # 7. The census at scale: a reused census reads the listing only, then only what changed.
    census = res["census"]
    for store in ("local", "s3"):
        c = census[store]
        assert c["fresh"]["by_version"] == c["reused"]["by_version"] == {"v1": c["partitions"]}
        assert c["reused_after_changes"]["by_version"] == c["fresh_again"]["by_version"] == {
            "v1": c["partitions"] - c["changed"], "v2": c["changed"]}
        assert c["plan"]["partitions"] == c["partitions"] and c["plan"]["chunks"] >= 1  # 99% still under v1
    s3 = census["s3"]
    listing = s3["reused"]["requests"]
    assert set(listing) == {"total", "LIST", "HEAD"} and listing["HEAD"] == 1  # the root, then the listing
    assert s3["fresh"]["requests"]["GET"] == 3 * s3["partitions"]  # manifest, data file head, key material
    assert s3["reused_after_changes"]["requests"]["GET"] == 3 * s3["changed"]
    assert s3["plan"]["requests"] == listing

    for name, goal in res["goals"].items():
        assert isinstance(goal["met"], bool), name
        assert goal["met"] or goal["cause"], f"{name}: not met, but no cause given"

    md = (out / "latest.md").read_text()
    assert res["machine"]["cpu_model"] in md and "this machine" in md
    assert "## 3. SQL tables" in md and "not measured" not in md and "## 7. Census at scale" in md
    assert f"{round(r['rows_per_s']):,} rows/s" in md and "server-side `UPDATE" in md
    assert "load average" in md.lower()
    assert "module by module (`reencrypt`) (C page walk)" in md and "on the Python page walk (for comparison" in md
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
