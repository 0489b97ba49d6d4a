"""Benchmark suite of keyrotation: ``python bench/run.py --size full`` (``make bench``) or ``--size tiny``.

In one run, on the same data, against a real OpenBao dev server on loopback:

1. KEK rotation (``rewrap``) of Parquet PME datasets of R rows in P partitions through the engine,
   with the KMS requests counted, against (a) one KMS request per value and (b) batch rewrap of
   per-value ciphertexts, both measured on the same values and extrapolated to R rows;
2. full re-encryption (``reencrypt``) rows/s and MB/s per core, against AES-256-GCM measured here;
3. peak RSS of re-encrypting one partition 10x a memory budget, in a process of its own;
4. Airflow's share of a sweep through the real ``reencrypt__customers`` DAG (``dag.test()``);
5. scaling of 1. with R and P, plotted log-log;
6. the SQL-table path (``SqlTableEngine``, the machine's PostgreSQL): write, KEK rotation (``rewrap``) at
   several row counts with the KMS requests counted, ``validate``, and full re-encryption rows/s and MB/s
   per core against two pure-PostgreSQL references on the same rows (``bench/sql_table.py``).

Writes ``latest.json``, ``latest.md`` and ``scaling.png`` to ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    ROOT,
    KmsCounter,
    child_env,
    fmt_seconds,
    load_average,
    machine,
    now_utc,
    run_json,
    setup_path,
    versions,
)

setup_path()

SIZES: dict[str, dict] = {
    "tiny": {
        "rows": [2_000, 20_000], "partitions": [1, 4], "r_sweep_at": [4], "p_sweep_at": [20_000], "repeats": 1,
        "per_value": 60, "batch_values": 1_000, "aes_buffer_mib": 2, "aes_repeats": 2, "aes_values": 5_000,
        "reencrypt": (20_000, 4), "memory_budget_mib": 0.25, "memory_factors": [10], "batched_partitions": 40,
        "airflow": {"partitions": 6, "rows_per_partition": 10, "chunk_sizes": [None, 2], "warmup": False},
        "airflow_large": {"partitions": 12, "rows_per_partition": 10, "chunk_sizes": [None], "warmup": False,
                          "direct": False},
        "airflow_in_parallel": True,
        "census": {"local": 300, "s3": 60},
        "sql_table": {"rows": [2_000, 6_000], "partitions": 2, "reencrypt_rows": 6_000, "batch_size": 500,
                      "repeats": 2, "cipher_values": 4_000},
    },
    "full": {
        "rows": [10_000, 100_000, 1_000_000, 10_000_000], "partitions": [1, 10, 100, 1_000],
        "r_sweep_at": [10, 1_000], "p_sweep_at": [1_000_000, 10_000_000], "repeats": 3,
        "per_value": 2_000, "batch_values": 50_000, "aes_buffer_mib": 64, "aes_repeats": 5, "aes_values": 200_000,
        "reencrypt": (10_000_000, 10), "memory_budget_mib": 32, "memory_factors": [1, 10],
        # The yardstick for a KEK rotation in batches: 10,000 partitions (one file each) as one chunk.
        "batched_partitions": 10_000,
        "airflow": {"partitions": 1_000, "rows_per_partition": 10, "chunk_sizes": [None, 16, 64, 4], "warmup": True},
        # The same sweep at 10,000 partitions, at the default configuration only (the second size).
        "airflow_large": {"partitions": 10_000, "rows_per_partition": 10, "chunk_sizes": [None], "warmup": True,
                          "direct": False},
        "airflow_in_parallel": False,
        # The census of every partition: 100,000 on the local filesystem; on S3 (moto's server, which answers
        # about 400 requests a second and lists in time proportional to the bucket) 5,000.
        "census": {"local": 100_000, "s3": 5_000},
        # Re-encryption at 300k rows (60 batches: steady state) keeps the whole run under 30 minutes on 2 cores;
        # the rewrap, O(data keys), is measured up to 1M rows.
        "sql_table": {"rows": [100_000, 300_000, 1_000_000], "partitions": 10, "reencrypt_rows": 300_000,
                      "batch_size": 5_000, "repeats": 3, "cipher_values": 200_000},
    },
}
AIRFLOW_DEFAULT_CHUNK = None  # the shipped default: chunks sized by estimated work (reencryption.chunk_target)
GOAL_AIRFLOW_SHARE = 0.20
GOAL_REENCRYPT_SHARE = 0.50
# Issue 21: module-level re-encryption per core per file byte, against bulk AES-GCM (encrypt_into): a file held
# in memory, and file to file through the partition store (a new generation committed as the decode path's).
GOAL_MODULES_IN_MEMORY = 0.25
GOAL_MODULES_FILE = 0.10
# "SQL path bounded by the database": the engine reaches at least this share of the rows/s of its own database
# round trip (the same keyset reads and compare-and-set UPDATEs, no crypto), i.e. crypto and Python add less
# time than the database work they sit between.
GOAL_SQL_DB_SHARE = 0.50
FLAT_SLOPE = 0.1  # log-log slope of wall time vs rows under which rotation time counts as flat in R
# Batched KEK rotation (ParquetEngine.process_many): at most one KMS request per this many partitions (100 for
# 10,000), and at least this many partitions per second.
GOAL_BATCHED_PARTITIONS_PER_REQUEST = 100
GOAL_BATCHED_PARTITIONS_PER_S = 500
BATCHED_ROWS_PER_PARTITION = 10


def airflow_command(cfg: dict, work: Path, name: str = "airflow") -> tuple[list[str], Path]:
    af_work = work / f"{name}_sweep"
    af_work.mkdir(parents=True, exist_ok=True)
    spec = {**cfg[name], "mode": "rewrap", "work": str(af_work), "result_path": str(af_work / "result.json")}
    return [sys.executable, "-m", "bench.airflow_sweep", json.dumps(spec)], af_work


def start_airflow(cfg: dict, work: Path, name: str = "airflow") -> tuple[subprocess.Popen, Path]:
    args, af_work = airflow_command(cfg, work, name)
    log = open(af_work / "sweep.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(args, env=child_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    return proc, af_work


def finish_airflow(proc: subprocess.Popen, af_work: Path, timeout: float) -> dict:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    result = af_work / "result.json"
    if code != 0 or not result.exists():
        tail = (af_work / "sweep.log").read_text(errors="replace")[-4000:]
        raise RuntimeError(f"Airflow sweep failed with exit code {code}:\n{tail}")
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--work", type=Path, help="work folder for data (default: a new temporary folder, removed)")
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="measure nothing: redo the summary, goals, table and plot of an earlier run's JSON")
    args = parser.parse_args(argv)
    cfg = SIZES[args.size]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        res["summary"] = summarise(res)
        res["goals"] = goals(res)
    else:
        work = (args.work or Path(tempfile.mkdtemp(prefix="keyrotation-bench-"))).resolve()
        work.mkdir(parents=True, exist_ok=True)
        try:
            res = run(cfg, args.size, work, argv)
        finally:
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)
    from bench.report import markdown, plot

    (out / "latest.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out / "scaling.png")
    (out / "latest.md").write_text(markdown(res))
    print(f"results: {out / 'latest.md'} ({res['meta']['duration_s']:.0f} s)")
    for name, goal in res["goals"].items():
        print(f"  {name}: {'met' if goal['met'] else 'NOT met'}")
    return 0


def run(cfg: dict, size: str, work: Path, argv: list[str] | None) -> dict:
    from bench import census_scale, cipher, kms_values, memory, reencrypt, rewrap, sql_table
    from keyrotation.backends.vault_transit import VaultTransitBackend
    from keyrotation.ledger import Ledger
    from keyrotation_dev.devserver import OpenBaoDevServer

    started = time.perf_counter()
    command = " ".join(["python bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    meta = {"date": now_utc(), "size": size, "load_1min_start": load_average(), "versions": versions(),
            "command": os.environ.get("BENCH_COMMAND") or command, "section_s": {}, "section_load_1min_end": {}}
    sections = meta["section_s"]

    def section(name: str, since: float) -> float:
        now = time.perf_counter()
        sections[name] = round(now - since, 1)
        meta["section_load_1min_end"][name] = load_average()
        print(f"  {name}: {now - since:.1f} s", flush=True)
        return now

    airflow_proc = start_airflow(cfg, work) if cfg["airflow_in_parallel"] else None
    res: dict = {"machine": machine(), "meta": meta, "config": cfg}
    ledger_url = f"sqlite:///{work / 'ledger.db'}"
    os.environ["KEYROTATION_LEDGER_URL"] = ledger_url
    with OpenBaoDevServer(log_path=str(work / "openbao.log")) as bao:
        t = time.perf_counter()
        counter = KmsCounter().install()
        client = bao.client()
        ledger = Ledger(ledger_url)
        env = memory.env_for(bao.url, bao.token, ledger_url)
        backend = VaultTransitBackend(client, rewrap.KEY)
        backend.create_key()
        datasets = rewrap.plan(cfg["rows"], cfg["partitions"], cfg["r_sweep_at"], cfg["p_sweep_at"])
        for ds in datasets:
            ds["location"] = str(work / "data" / ds["name"])
        memory_datasets = memory.plan(cfg["memory_budget_mib"], cfg["memory_factors"], work / "data")
        spec = {"key_ref": rewrap.KEY, "version": 1, "result_path": str(work / "write.json"),
                "datasets": datasets + memory_datasets}
        written = run_json([sys.executable, "-m", "bench.worker", "write", json.dumps(spec)], env, work / "worker.log",
                           work / "write.json", timeout=3600)
        for ds, w in zip(datasets + memory_datasets, written["datasets"], strict=True):
            ds.update(file_bytes=w["file_bytes"], arrow_bytes=w["arrow_bytes"], write_s=w["write_s"])
        t = section("write datasets (worker, engine.write_partition)", t)

        values = kms_values.column_values(cfg["aes_values"])
        res["cipher"] = cipher.measure(cfg["aes_buffer_mib"], cfg["aes_repeats"], values)
        t = section("local AES-256-GCM", t)
        res["kms_per_value"] = kms_values.measure(client, counter, cfg["per_value"], cfg["batch_values"])
        t = section("KMS per value and batch", t)

        rewrap.measure(backend, ledger, counter, datasets, work / "data", cfg["repeats"])
        res["rewrap"] = {"datasets": [{k: v for k, v in ds.items() if k != "location"} for ds in datasets],
                         "repeats": cfg["repeats"], "r_sweep_at": cfg["r_sweep_at"], "p_sweep_at": cfg["p_sweep_at"]}
        t = section("KEK rotation (rewrap) through the engine", t)

        res["rewrap_batched"] = rewrap.measure_batched(backend, ledger, counter, str(work / "data" / "batched"),
                                                       cfg["batched_partitions"], BATCHED_ROWS_PER_PARTITION)
        t = section("KEK rotation in batches (process_many) of one chunk", t)

        rows, parts = cfg["reencrypt"]
        target = next(ds for ds in datasets if ds["rows"] == rows and ds["partitions"] == parts)
        res["reencrypt"] = {"engine": reencrypt.measure(backend, ledger, counter, target, target["location"]),
                            "plain_parquet": reencrypt.plain_parquet(target["rows_per_partition"])}
        res["reencrypt"]["modules"] = reencrypt.measure_modules(backend, ledger, counter, target, target["location"])
        t = section("full re-encryption (reencrypt) through the engine", t)

        res["memory"] = memory.measure(backend, env, work, cfg["memory_budget_mib"], memory_datasets, timeout=3600)
        t = section("memory (worker processes)", t)

        missing = sql_table.unavailable()
        if missing:
            res["sql_table"] = {"skipped": missing}
        else:
            sql_backend = VaultTransitBackend(client, sql_table.KEY)
            sql_backend.create_key()
            res["sql_table"] = sql_table.measure(sql_backend, ledger, counter, cfg["sql_table"])
        t = section("SQL table path (PostgreSQL: write, rewrap, validate, reencrypt, references)", t)
        counter.uninstall()

        res["census"] = census_scale.measure(client, work, cfg["census"]["local"], cfg["census"]["s3"])
        t = section("census at scale (local filesystem, S3 on moto)", t)

    if airflow_proc is not None:
        res["airflow"] = finish_airflow(*airflow_proc, timeout=600)
    else:
        proc = start_airflow(cfg, work)
        res["airflow"] = finish_airflow(*proc, timeout=3600)
    t = section("Airflow sweep (dag.test)" + (", in parallel with the rest" if airflow_proc else ""), t)
    res["airflow_large"] = finish_airflow(*start_airflow(cfg, work, "airflow_large"), timeout=3600)
    t = section(f"Airflow sweep of {cfg['airflow_large']['partitions']:,} partitions (dag.test)", t)

    meta["load_1min_end"] = load_average()
    meta["duration_s"] = round(time.perf_counter() - started, 1)
    res["summary"] = summarise(res)
    res["goals"] = goals(res)
    return res


def summarise(res: dict) -> dict:
    from bench import kms_values

    datasets = res["rewrap"]["datasets"]
    alt = res["kms_per_value"]
    head = max(datasets, key=lambda d: (d["rows"], d["partitions"]))
    ext = kms_values.extrapolate(alt, head["rows"])
    headline = {
        "rows": head["rows"], "partitions": head["partitions"], "wall_s": head["wall_s"],
        "kms_requests": head["kms_requests"], "kms_rewrap_requests": head["kms_rewrap_requests"],
        "per_value_rewrap_s": ext["per_value_rewrap"]["seconds"], "per_value_requests": ext["per_value_rewrap"][
            "kms_requests"],
        "batch_rewrap_s": ext["batch_rewrap_250"]["seconds"], "batch_requests": ext["batch_rewrap_250"]["kms_requests"],
        "vs_per_value_rewrap": ext["per_value_rewrap"]["seconds"] / head["wall_s"],
        "vs_batch_rewrap": ext["batch_rewrap_250"]["seconds"] / head["wall_s"],
        "vs_per_value_decrypt_encrypt": ext["per_value_decrypt_encrypt"]["seconds"] / head["wall_s"],
    }
    extrapolations = []
    for ds in sorted(datasets, key=lambda d: (d["rows"], d["partitions"])):
        e = kms_values.extrapolate(alt, ds["rows"])
        extrapolations.append({
            "rows": ds["rows"], "partitions": ds["partitions"], "engine_s": ds["wall_s"],
            "engine_requests": ds["kms_requests"],
            "per_value_rewrap_s": e["per_value_rewrap"]["seconds"], "per_value_requests": e["per_value_rewrap"][
                "kms_requests"],
            "batch_rewrap_s": e["batch_rewrap_250"]["seconds"], "batch_requests": e["batch_rewrap_250"]["kms_requests"],
            "vs_per_value_rewrap": e["per_value_rewrap"]["seconds"] / ds["wall_s"],
            "vs_batch_rewrap": e["batch_rewrap_250"]["seconds"] / ds["wall_s"],
        })
    vpr = alt["values_per_row"]
    per_row = {"per_value_rewrap_s": vpr / alt["rewrap_per_value"]["values_per_s"],
               "batch_rewrap_s": vpr / alt["rewrap_batch_250"]["values_per_s"],
               "engine_headline_s": head["wall_s"] / head["rows"],
               "engine_per_partition_s": head["seconds_per_partition"]}
    # Rows per partition under which batch rewrap of per-value ciphertexts would beat the engine.
    per_row["batch_breakeven_rows_per_partition"] = round(head["seconds_per_partition"] / per_row["batch_rewrap_s"])
    out = {"headline": headline, "extrapolations": extrapolations, "per_row": per_row}
    if "reencrypt" in res.get("sql_table", {}):
        out["sql_table"] = sql_summary(res)
    return out


def sql_summary(res: dict) -> dict:
    """The SQL path's figures against the cipher limits and the database references of the same run."""
    sql, bulk = res["sql_table"], res["cipher"]["bulk"]["encrypt_mb_s"]
    r, local = sql["reencrypt"], sql["local_cipher"]
    head = max(sql["tables"], key=lambda t: t["rows"])
    return {
        "reencrypt_rows": r["rows"], "reencrypt_rows_per_s": r["rows_per_s"],
        "reencrypt_plaintext_mb_s": r["plaintext_mb_s"],
        "reencrypt_plaintext_mb_per_cpu_s": r["plaintext_mb_per_cpu_s"],
        "reencrypt_plaintext_mb_per_core_s_with_db": r.get("plaintext_mb_per_core_s_with_db"),
        "share_of_bulk_aes": round(r["plaintext_mb_per_cpu_s"] / bulk, 6),
        "share_of_local_per_value_reencrypt": round(r["rows_per_cpu_s"] / local["reencrypt_rows_per_s"], 4),
        "local_per_value_reencrypt_rows_per_s": local["reencrypt_rows_per_s"],
        "share_of_reference_round_trip": r["share_of_reference_round_trip"],
        "share_of_reference_update": r["share_of_reference_update"],
        "database_share": r["database_share"],
        "rewrap_rows": head["rows"], "rewrap_wall_s": head["rewrap"]["wall_s"],
        "rewrap_kms_requests": head["rewrap"]["kms_requests"], "rewrap_rows_per_s": head["rewrap"]["rows_per_s"],
        "rewrap_census_share": round(head["rewrap"]["census_s"] / head["rewrap"]["wall_s"], 4),
    }


def goals(res: dict) -> dict:
    from bench.rewrap import slope

    datasets = res["rewrap"]["datasets"]
    # KMS requests O(P): exactly one rewrap request per data file, plus a constant (the key read).
    extra = {ds["kms_requests"] - ds["kms_rewrap_requests"] for ds in datasets}
    o_p = all(ds["kms_rewrap_requests"] == ds["partitions"] for ds in datasets) and max(extra) <= 2
    kms_goal = {"met": o_p, "constant": max(extra),
                "detail": "rewrap requests == files (one file per partition) for every (R, P); other requests: "
                          f"{sorted(extra)} (the key's metadata, read once per engine)",
                "cause": None if o_p else "KMS requests are not one per file plus a constant"}
    slopes, ratios, rows_ratio = {}, [], 1.0
    for p in res["rewrap"]["r_sweep_at"]:
        pts = sorted((d for d in datasets if d["partitions"] == p), key=lambda d: d["rows"])
        slopes[p] = slope([d["rows"] for d in pts], [d["wall_s"] for d in pts])
        ratios.append(pts[-1]["wall_s"] / pts[0]["wall_s"])
        rows_ratio = pts[-1]["rows"] / pts[0]["rows"]
    flat = all(v is not None and v <= FLAT_SLOPE for v in slopes.values())
    flat_goal = {"met": flat, "slopes": slopes, "max_ratio": round(max(ratios), 3), "rows_ratio": rows_ratio,
                 "threshold_slope": FLAT_SLOPE,
                 "cause": None if flat else "rotation time grows with R (log-log slope above "
                                            f"{FLAT_SLOPE}); see the per-dataset table"}

    e, bulk = res["reencrypt"]["engine"], res["cipher"]["bulk"]["encrypt_mb_s"]
    plain = res["reencrypt"]["plain_parquet"]["write_read_file_mb_per_cpu_s"]
    share = e["file_mb_per_cpu_s"] / bulk
    stages = sorted(e["stages_s"].items(), key=lambda kv: -kv[1])
    reenc_goal = {"met": share >= GOAL_REENCRYPT_SHARE, "share": round(share, 4), "goal": GOAL_REENCRYPT_SHARE,
                  "plain_parquet_share": round(plain / bulk, 4),
                  "cause": None if share >= GOAL_REENCRYPT_SHARE else (
                      f"Parquet PME re-encryption runs at {e['file_mb_per_cpu_s']} MB/s per core against "
                      f"{bulk} MB/s for bulk AES-GCM; its time goes to "
                      + ", ".join(f"{name} {secs / e['wall_s'] * 100:.0f}%" for name, secs in stages[:3])
                      + f". The cipher is not the limit: even plain Parquet write + read of the same data, without "
                        f"encryption, runs at {plain} MB/s per core ({plain / bulk * 100:.1f}% of bulk AES-GCM), so "
                        "no path that decodes and re-encodes these files reaches 50% on this machine; on top of "
                        "that the engine streams each partition in two passes (the copy: decrypt, digest and "
                        "re-encrypt batch by batch; the read-back check: decrypt and digest the staged file again), "
                        "so it decodes twice and hashes every value twice (the plaintext digest, SHA-256 of "
                        f"canonical Arrow buffers: {_stage_share(e, 'plaintext digest') * 100:.0f}% of its time)")}

    mem = res["memory"]
    big = mem["largest"]
    small = min(mem["points"], key=lambda p: p["file_bytes"])
    also = "" if small is big else (f"; at {small['file_bytes'] / 1024 / 1024:,.0f} MiB "
                                    f"({small['partition_over_budget']}×): {small['working_set_mib']:,.0f} MiB")
    mem_goal = {"met": mem["met"], "budget_mib": mem["budget_mib"], "working_set_mib": big["working_set_mib"],
                "working_set_slope": mem.get("working_set_slope"),
                "jemalloc_working_set_mib": (mem.get("jemalloc") or {}).get("working_set_mib"),
                "cause": None if mem["met"] else (
                    f"a partition of {big['file_bytes'] / 1024 / 1024:,.0f} MiB "
                    f"({big['partition_over_budget']}× the {mem['budget_mib']} MiB budget) needs a "
                    f"working set of {big['working_set_mib']:,.0f} MiB "
                    f"({big['working_set_over_budget']}× the budget, {big['working_set_over_file_bytes']}× its "
                    f"file size{also}): {mem['cause']}")}

    if "modules" in res["reencrypt"]:
        out_modules = modules_goals(res["reencrypt"]["modules"], bulk, e["file_mb_per_cpu_s"])
    else:
        out_modules = {}
    out = {"kms_calls_o_p": kms_goal, "wall_flat_in_r": flat_goal, "reencrypt_vs_aes": reenc_goal,
           "memory_10x_budget": mem_goal, "airflow_overhead": airflow_goal(res["airflow"])}
    if "airflow_large" in res:
        out["airflow_overhead_large"] = airflow_goal(res["airflow_large"])
    out.update(out_modules)
    if "rewrap_batched" in res:
        out["kek_rotation_batched"] = batched_goal(res["rewrap_batched"])
    if "reencrypt" in res.get("sql_table", {}):
        out.update(sql_goals(res["sql_table"]))
    return out


def modules_goals(m: dict, bulk: float, decode_mb_per_cpu_s: float) -> dict:
    """Issue 21: module-level re-encryption per core per file byte, against bulk AES-GCM (``encrypt_into``)."""
    # Bulk AES-256-GCM measured beside the module path where the run has it (runs before it divided by the cipher
    # section's figure, taken minutes earlier).
    mem = m["in_memory"].get("share_of_bulk", m["in_memory"]["file_mb_per_cpu_s"] / bulk)
    whole = m.get("share_of_bulk", m["file_mb_per_cpu_s"] / bulk)
    mem_bulk, file_bulk = m["in_memory"].get("bulk_mb_s", bulk), m.get("bulk_mb_s", bulk)
    bits = m.get("data_key_bits")
    data_key = (f" (against bulk AES-{bits}-GCM, the data keys' own cipher: {{:.1%}})" if bits and bits != 256
                else "")
    stages = sorted(m["stages_s"].items(), key=lambda kv: -kv[1])
    why = ("; its time goes to " + ", ".join(f"{n} {v / m['wall_s'] * 100:.0f}%" for n, v in stages[:3]))
    return {
        "reencrypt_modules_in_memory": {
            "met": mem >= GOAL_MODULES_IN_MEMORY, "share": round(mem, 4), "goal": GOAL_MODULES_IN_MEMORY,
            "cause": None if mem >= GOAL_MODULES_IN_MEMORY else (
                f"module-level re-encryption of a file held in memory runs at {m['in_memory']['file_mb_per_cpu_s']} "
                f"MB/s per core against {mem_bulk} MB/s for bulk AES-256-GCM (encrypt_into)"
                + data_key.format(m["in_memory"].get("share_of_bulk_data_key_cipher", 0)) + ": each module is "
                "decrypted, encrypted and decrypted again to verify (three AES passes over the encrypted bytes), plus "
                f"the {m.get('page_walk', 'Python')} page walk's work per module and the footer's Thrift")},
        "reencrypt_modules_file": {
            "met": whole >= GOAL_MODULES_FILE, "share": round(whole, 4), "goal": GOAL_MODULES_FILE,
            "vs_decode_path": round(m["file_mb_per_cpu_s"] / decode_mb_per_cpu_s, 1),
            "cause": None if whole >= GOAL_MODULES_FILE else (
                f"module-level re-encryption through the partition store runs at {m['file_mb_per_cpu_s']} MB/s per "
                f"core against {file_bulk} MB/s for bulk AES-256-GCM"
                + data_key.format(m.get("share_of_bulk_data_key_cipher", 0)) + why)},
    }


def airflow_goal(af: dict) -> dict:
    """Airflow's share of a sweep of ``af`` (a run of bench.airflow_sweep) at the default configuration."""
    runs = {r["chunk_size"]: r for r in af["runs"]}
    default = runs.get(AIRFLOW_DEFAULT_CHUNK) or af["runs"][0]
    best = min(af["runs"], key=lambda r: r["overhead_share_inside"])
    ok = default["overhead_share_inside"] <= GOAL_AIRFLOW_SHARE and default["state"] == "success"
    per_partition_overhead = (default["wall_s"] - default["engine_inside_s"]) / af["partitions"]
    engine_per_partition = default["engine_inside_s"] / af["partitions"]
    needed = per_partition_overhead * (1 - GOAL_AIRFLOW_SHARE) / GOAL_AIRFLOW_SHARE
    note = (f"With {chunk_label(default)}, Airflow (dag.test) costs "
            f"{default['overhead_per_task_s'] * 1000:.0f} ms per task instance, "
            f"{per_partition_overhead * 1000:.1f} ms per partition, against {engine_per_partition * 1000:.1f} ms of "
            f"engine work per partition here (tiny partitions). The share falls to 20% once the engine's work "
            f"per partition reaches about {needed * 1000:.0f} ms (larger partitions, or `reencrypt` mode). "
            f"Overhead share by chunk size: {_share_line(af['runs'])}.")
    if not af.get("warmup_dry_run_s"):
        note += (" No warm-up run in this mode: the first run measured carries dag.test()'s one-off start-up "
                 "(imports, caches).")
    if af["partitions"] < 1000:
        note += f" {af['partitions']} partitions (not 1,000): the size chosen for this mode."
    af_goal = {"met": ok, "chunk_size": default["chunk_size"], "share": default["overhead_share_inside"],
               "share_ledger": default["overhead_share_ledger"], "share_direct": default["overhead_share_direct"],
               "best_chunk_size": best["chunk_size"], "note": note,
               "cause": None if ok else (
                   f"with tiny partitions ({af['rows_per_partition']} rows) Airflow's cost per task instance "
                   f"({default['overhead_per_task_s'] * 1000:.0f} ms in dag.test: task start and finish, state "
                   f"updates in the metadata DB, XCom, connection lookup, DAG re-parse) is large next to the "
                   f"engine's {engine_per_partition * 1000:.1f} ms per partition: {chunk_label(default)} "
                   f"gives {default['task_instances']} task instances for {af['partitions']} partitions, "
                   f"{per_partition_overhead * 1000:.1f} ms of Airflow per partition; {chunk_label(best)} "
                   f"brings the share to {best['overhead_share_inside'] * 100:.0f}%")}
    return af_goal


def batched_goal(b: dict) -> dict:
    """At most one KMS request per GOAL_BATCHED_PARTITIONS_PER_REQUEST partitions (a constant of 3 for small runs)
    and GOAL_BATCHED_PARTITIONS_PER_S partitions/s."""
    allowed = max(-(-b["partitions"] // GOAL_BATCHED_PARTITIONS_PER_REQUEST), 3)
    few = b["kms_requests"] <= allowed
    fast = b["partitions_per_s"] >= GOAL_BATCHED_PARTITIONS_PER_S
    causes = []
    if not few:
        causes.append(f"{b['kms_requests']} KMS requests for {b['partitions']} partitions, more than {allowed}")
    if not fast:
        causes.append(f"{b['partitions_per_s']} partitions/s, under {GOAL_BATCHED_PARTITIONS_PER_S} (the machine's "
                      "load shows in the meta section)")
    return {"met": few and fast, "partitions": b["partitions"], "kms_requests": b["kms_requests"],
            "allowed_requests": allowed, "partitions_per_s": b["partitions_per_s"],
            "goal_partitions_per_s": GOAL_BATCHED_PARTITIONS_PER_S, "cause": "; ".join(causes) or None}


def sql_goals(sql: dict) -> dict:
    tables = sorted(sql["tables"], key=lambda t: t["rows"])
    p = sql["partitions"]
    extra = {t["rewrap"]["kms_requests"] - t["rewrap"]["kms_rewrap_requests"] for t in tables}
    ok = (all(t["rewrap"]["kms_rewrap_requests"] == t["rewrap"]["partitions_rewrapped"] == p == t["rewrap"]["data_keys"]
              for t in tables) and max(extra) <= 2 and all(t["rewrap"]["table_rows_written"] == 0 for t in tables))
    kms = {"met": ok, "constant": max(extra),
           "detail": f"one batch rewrap request per partition ({p} data keys, one per partition) at "
                     + ", ".join(f"{t['rows']:,}" for t in tables) + " rows; rows of the table written: "
                     + ", ".join(str(t["rewrap"]["table_rows_written"]) for t in tables),
           "cause": None if ok else "KMS requests are not one per partition's data keys, or table rows were written"}
    head, low = tables[-1]["rewrap"], tables[0]["rewrap"]
    flat = sql["rewrap_slope"] is not None and sql["rewrap_slope"] <= FLAT_SLOPE
    flat_goal = {
        "met": flat, "slope": sql["rewrap_slope"], "slope_without_census": sql["rewrap_slope_without_census"],
        "max_ratio": sql["rewrap_wall_ratio"], "rows_ratio": sql["rewrap_rows_ratio"], "threshold_slope": FLAT_SLOPE,
        "cause": None if flat else (
            f"the rewrap's wall time grows with the rows (log-log slope {sql['rewrap_slope']}) although it reads "
            "only the data-key table (SqlTableEngine.data_key_census before and after: "
            f"{fmt_seconds(head['census_s'])} of {fmt_seconds(head['wall_s'])} at {tables[-1]['rows']:,} rows) and "
            f"re-wraps the data keys (KMS, data-key rows, ledger, leases: {fmt_seconds(low['rest_s'])} at "
            f"{tables[0]['rows']:,} rows, {fmt_seconds(head['rest_s'])} at {tables[-1]['rows']:,}; log-log slope "
            f"{sql['rewrap_slope_without_census']}): the growth is not the table's (the machine's load, or the "
            "database's caches); not one row of the table is read or written")}
    r = sql["reencrypt"]
    share = r["share_of_reference_round_trip"]
    stages = sorted(r["stages_s"].items(), key=lambda kv: -kv[1])
    bounded = {"met": share >= GOAL_SQL_DB_SHARE, "share": share, "goal": GOAL_SQL_DB_SHARE,
               "share_of_reference_update": r["share_of_reference_update"], "database_share": r["database_share"],
               "cause": None if share >= GOAL_SQL_DB_SHARE else (
                   f"the engine runs at {share * 100:.0f}% of the rows/s of the same database round trip without "
                   "crypto; its time goes to " + ", ".join(f"{n} {v / r['wall_s'] * 100:.0f}%" for n, v in stages[:3]))}
    return {"sql_kms_calls_o_data_keys": kms, "sql_rewrap_flat_in_r": flat_goal, "sql_reencrypt_bounded_by_db": bounded}


def _stage_share(e: dict, prefix: str) -> float:
    """Share of the engine's wall time in the stages whose name starts with ``prefix``."""
    return sum(v for k, v in e["stages_s"].items() if k.startswith(prefix)) / e["wall_s"]


def chunk_label(run: dict) -> str:
    """How a sweep was chunked, in words: a fixed chunk size, or the default (sized by estimated work)."""
    if run["chunk_size"] is None:
        return f"the default (sized by work: {run['mapped_chunks']} chunks)"
    return f"chunk {run['chunk_size']}"


def _share_line(runs: list[dict]) -> str:
    return ", ".join(f"{chunk_label(r)}: {r['overhead_share_inside'] * 100:.0f}%"
                     for r in sorted(runs, key=lambda r: r["chunk_size"] or 0))


if __name__ == "__main__":
    sys.exit(main())
