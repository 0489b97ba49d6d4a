"""latest.md (Markdown tables) and scaling.png (log-log plots) from the results JSON."""

from __future__ import annotations

from pathlib import Path

from bench.census_scale import CHANGED_SHARE
from bench.common import fmt_int, fmt_seconds

MIB = 1024 * 1024



def _chunking(chunk_size: int | None) -> str:
    return "default chunks (sized by work)" if chunk_size is None else f"chunk {chunk_size}"

def _yes(value: bool | None) -> str:
    return "n/a" if value is None else ("**met**" if value else "**not met**")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _x(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}×" if value >= 10 else f"{value:.2f}×"


def markdown(res: dict) -> str:
    m, meta, s, g = res["machine"], res["meta"], res["summary"], res["goals"]
    rw, alt, re_, mem, af = res["rewrap"], res["kms_per_value"], res["reencrypt"], res["memory"], res["airflow"]
    cipher = res["cipher"]
    head = s["headline"]
    out = [
        "# keyrotation benchmarks",
        "",
        f"**Measured {meta['date']} on this machine:** {m['description']}; {m['cores_usable']} cores usable. "
        f"Run: `{meta['command']}` (size `{meta['size']}`), {fmt_seconds(meta['duration_s'])} in all. "
        f"Load average (1 min): {meta['load_1min_start']} at start, {meta['load_1min_end']} at end "
        "(other work may have shared the machine).",
        "",
        *[line for name, r in meta.get("remeasured", {}).items()
          for line in (f"**Re-measured afterwards:** section {name}, {r['date']}, same machine ({r['why']}).", "")],
        "All absolute times below are **this machine's** and noisy; the ratios, measured in this one run on "
        "the same data, are what carry over. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        "## Headline",
        "",
        "| what | goal | this machine, this run | goal met? |",
        "|---|---|---|---|",
        f"| KEK rotation of {fmt_int(head['rows'])} rows in {fmt_int(head['partitions'])} partitions "
        f"(engine `rewrap`) | KMS requests O(P) | {fmt_int(head['kms_requests'])} KMS requests "
        f"({fmt_int(head['kms_rewrap_requests'])} rewrap = 1 per file, + {g['kms_calls_o_p']['constant']} "
        f"key read), i.e. {head['kms_requests'] / head['rows']:.6f} per row | {_yes(g['kms_calls_o_p']['met'])} |",
        f"| same, wall time | flat in R | {fmt_seconds(head['wall_s'])}; log-log slope of wall time vs R: "
        + ", ".join(f"{v} at P={p}" for p, v in g["wall_flat_in_r"]["slopes"].items())
        + f" (0 = flat); {_x(g['wall_flat_in_r']['max_ratio'])} wall for "
        f"{_x(g['wall_flat_in_r']['rows_ratio'])} rows | {_yes(g['wall_flat_in_r']['met'])} |",
        *_batched_headline(g),
        f"| vs (a) one KMS request per value (rewrap) | | {_x(head['vs_per_value_rewrap'])} faster "
        f"(extrapolated: {fmt_seconds(head['per_value_rewrap_s'])}, "
        f"{fmt_int(head['per_value_requests'])} requests) | |",
        f"| vs (b) batch rewrap, 250 per request | | {_x(head['vs_batch_rewrap'])} faster "
        f"(extrapolated: {fmt_seconds(head['batch_rewrap_s'])}, {fmt_int(head['batch_requests'])} requests) | |",
        *_modules_headline(res),
        f"| full re-encryption, Parquet PME, decode path (`reencrypt` where the module path does not apply) | ≥ 50% "
        f"of bulk AES-256-GCM MB/s per core | "
        f"{re_['engine']['file_mb_per_cpu_s']} MB/s per core = {_pct(g['reencrypt_vs_aes']['share'])} of "
        f"{cipher['bulk']['encrypt_mb_s']} MB/s | {_yes(g['reencrypt_vs_aes']['met'])} |",
        *_sql_headline(res),
        f"| memory, partition {mem['largest']['partition_over_budget']}× a {mem['budget_mib']} MiB budget | "
        f"working set ≤ budget | {mem['largest']['working_set_mib']} MiB "
        f"({_x(mem['largest']['working_set_over_budget'])} the budget){_memory_flat(mem)} | {_yes(mem['met'])} |",
        f"| Airflow overhead, {af['partitions']} partitions, {_chunking(g['airflow_overhead']['chunk_size'])} | ≤ 20% "
        f"of wall time | {_pct(g['airflow_overhead']['share'])} (engine timed inside the tasks); "
        f"{_pct(g['airflow_overhead']['share_ledger'])} by the ledger's durations | "
        f"{_yes(g['airflow_overhead']['met'])} |",
        *_airflow_large_headline(res),
        *_census_headline(res),
        "",
        "Causes where a goal is not met:",
        "",
    ]
    causes = [f"- {v['cause']}" for v in g.values() if v.get("met") is False and v.get("cause")]
    out += causes or ["- none"]
    out += ["", "## 1. KEK rotation (`rewrap`) through the engine, against a real OpenBao", "",
            "`ParquetEngine.process(partition, v, \"rewrap\")` over every partition (`engine.run`), after a "
            "Transit key rotation; each partition is one Parquet PME file of synthetic customers "
            f"(encrypted columns {', '.join(alt['columns'])}). KMS requests = HTTP requests counted under hvac. "
            f"Wall time: median of {rw['repeats']} rotations (min–max).", "",
            "| rows R | partitions P | wall (median) | min–max | CPU of this process | per partition | "
            "KMS requests (rewrap / total) | time in KMS | rows/s |", "|---|---|---|---|---|---|---|---|---|"]
    for ds in rw["datasets"]:
        out.append(f"| {fmt_int(ds['rows'])} | {fmt_int(ds['partitions'])} | {fmt_seconds(ds['wall_s'])} | "
                   f"{fmt_seconds(ds['wall_s_min'])}–{fmt_seconds(ds['wall_s_max'])} | "
                   f"{fmt_seconds(ds.get('cpu_s'))} | "
                   f"{fmt_seconds(ds['seconds_per_partition'])} | {fmt_int(ds['kms_rewrap_requests'])} / "
                   f"{fmt_int(ds['kms_requests'])} | {fmt_seconds(ds['kms_seconds'])} | {fmt_int(ds['rows_per_s'])} |")
    out += ["", f"The alternatives, measured on the same column values (mean {alt['mean_value_bytes']} bytes, "
            f"{alt['values_per_row']} per row) against the same server:", "",
            "| approach | measured on | values/s | KMS requests per value |", "|---|---|---|---|"]
    for key, label in (("encrypt_per_value", "Transit encrypt, one request per value"),
                       ("rewrap_per_value", "(a) Transit rewrap, one request per value"),
                       ("decrypt_per_value", "Transit decrypt, one request per value"),
                       ("encrypt_batch_250", "Transit encrypt, batch of 250"),
                       ("rewrap_batch_250", "(b) Transit rewrap, batch of 250")):
        row = alt[key]
        out.append(f"| {label} | {fmt_int(row['values'])} values | {fmt_int(row['values_per_s'])} | "
                   f"{row['kms_requests'] / row['values']:.3g} |")
    out += ["", "Extrapolated to R rows at those rates, against the engine measured at the same R:", "",
            "| rows R | engine (measured), P | (a) per-value rewrap | (b) batch rewrap | (a) / engine | "
            "(b) / engine | KMS requests engine / (a) / (b) |", "|---|---|---|---|---|---|---|"]
    for row in s["extrapolations"]:
        out.append(f"| {fmt_int(row['rows'])} | {fmt_seconds(row['engine_s'])}, P={fmt_int(row['partitions'])} | "
                   f"{fmt_seconds(row['per_value_rewrap_s'])} | {fmt_seconds(row['batch_rewrap_s'])} | "
                   f"{_x(row['vs_per_value_rewrap'])} | {_x(row['vs_batch_rewrap'])} | "
                   f"{fmt_int(row['engine_requests'])} / {fmt_int(row['per_value_requests'])} / "
                   f"{fmt_int(row['batch_requests'])} |")
    per_row = s["per_row"]
    out += ["", f"Per row: (a) {fmt_seconds(per_row['per_value_rewrap_s'])}, (b) "
            f"{fmt_seconds(per_row['batch_rewrap_s'])}, whatever R; the engine "
            f"{fmt_seconds(per_row['engine_headline_s'])} per row at R={fmt_int(head['rows'])}, "
            f"P={fmt_int(head['partitions'])} (its cost is per partition: "
            f"{fmt_seconds(per_row['engine_per_partition_s'])}), falling as partitions grow. Batch rewrap of "
            f"per-value ciphertexts would only be faster for partitions under about "
            f"{fmt_int(per_row['batch_breakeven_rows_per_partition'])} rows.", ""]

    e = re_["engine"]
    out += ["## 2. Full re-encryption (`reencrypt`, new data keys)", "",
            f"`ParquetEngine.process(partition, v, \"reencrypt\")` over dataset `{e['dataset']}` (the same data "
            "as above), streamed in two passes of "
            + (f"{fmt_int(e['batch_rows'])} rows" if e.get("batch_rows") else "`batch_rows` rows")
            + " at a time: the copy (decrypt + decode a batch, add it to the plaintext digest, encode + encrypt "
            "it into the new generation under new data keys through `pq.ParquetWriter`"
            + (f", row groups of {fmt_int(e['row_group_rows'])} rows" if e.get("row_group_rows") else "")
            + "), then the read-back check (the staged file decrypted batch by batch and digested again), then "
            "the commit. Per core = per CPU second of the process (all its threads).", "",
            "| path | rows | file MB | wall | CPU s | cores used | rows/s | MB/s (file bytes) | MB/s per core | "
            "vs bulk AES-GCM |", "|---|---|---|---|---|---|---|---|---|---|",
            *_modules_rows(res),
            f"| Parquet PME, engine, decode path | {fmt_int(e['rows'])} | {e['file_bytes'] / 1e6:,.1f} | "
            f"{fmt_seconds(e['wall_s'])} "
            f"| {e['cpu_s']} | {e['cores_used']} | {fmt_int(e['rows_per_s'])} | {e['file_mb_s']} | "
            f"{e['file_mb_per_cpu_s']} | {_pct(g['reencrypt_vs_aes']['share'])} |",
            _sql_reencrypt_row(res),
            f"| AES-256-GCM, one {cipher['bulk']['buffer_bytes'] // MIB} MiB buffer (`cryptography`, "
            f"`encrypt_into`) | | | | | 1 | | "
            f"{cipher['bulk']['encrypt_mb_s']} (decrypt {cipher['bulk']['decrypt_mb_s']}) | "
            f"{cipher['bulk']['encrypt_mb_s']} | 100% |",
            *([f"| the same through the allocating `encrypt` | | | | | 1 | | "
               f"{cipher['bulk']['encrypt_alloc_mb_s']} (decrypt {cipher['bulk']['decrypt_alloc_mb_s']}) | "
               f"{cipher['bulk']['encrypt_alloc_mb_s']} | "
               f"{_pct(cipher['bulk']['encrypt_alloc_mb_s'] / cipher['bulk']['encrypt_mb_s'])} |"]
              if "encrypt_alloc_mb_s" in cipher["bulk"] else []),
            f"| AES-256-GCM per value, the columns' values ({cipher['per_value_columns']['mean_value_bytes']} B) | | | "
            f"| | 1 | {fmt_int(cipher['per_value_columns']['encrypt_values_per_s'])} values/s | "
            f"{cipher['per_value_columns']['encrypt_mb_s']} | {cipher['per_value_columns']['encrypt_mb_s']} | "
            f"{_pct(cipher['per_value_columns']['encrypt_mb_s'] / cipher['bulk']['encrypt_mb_s'])} |",
            f"| AES-256-GCM per value, 100 B | | | | | 1 | "
            f"{fmt_int(cipher['per_value_100_bytes']['encrypt_values_per_s'])} values/s | "
            f"{cipher['per_value_100_bytes']['encrypt_mb_s']} | {cipher['per_value_100_bytes']['encrypt_mb_s']} | "
            f"{_pct(cipher['per_value_100_bytes']['encrypt_mb_s'] / cipher['bulk']['encrypt_mb_s'])} |",
            f"| plain Parquet write + read, no encryption, {fmt_int(re_['plain_parquet']['rows'])} rows | | | | | | | "
            f"| {re_['plain_parquet']['write_read_file_mb_per_cpu_s']} | |",
            "", f"Arrow (decoded) bytes: {e['arrow_mb_per_cpu_s']} MB per CPU second. Per-value envelope "
            f"re-encryption (decrypt + encrypt each value locally): "
            f"{fmt_int(cipher['per_value_columns']['reencrypt_values_per_s'])} values/s.", "",
            "Where the engine's time goes (wall seconds, summed over partitions):", "",
            "| step | seconds | share |", "|---|---|---|"]
    for name, secs in e["stages_s"].items():
        out.append(f"| {name} | {secs} | {_pct(secs / e['wall_s'])} |")
    out += _modules_stages(res)
    if e.get("passes_s"):
        out += ["", "The same time by pass (wall seconds, summed over partitions; the copy pass includes the "
                "file moves and the manifest):", "", "| pass | seconds | share |", "|---|---|---|"]
        for name, secs in e["passes_s"].items():
            out.append(f"| {name} | {secs} | {_pct(secs / e['wall_s'])} |")
    pp = re_["plain_parquet"]
    out += ["", f"For comparison, on one partition ({fmt_int(pp['rows'])} rows) without encryption: Parquet write "
            f"{fmt_seconds(pp['write_s'])}, read {fmt_seconds(pp['read_s'])}, digest {fmt_seconds(pp['digest_s'])}.",
            ""]

    out += _sql_section(res)

    out += _memory_section(mem)

    out += ["## 5. Airflow overhead of a sweep (dynamic task mapping, chunks)", "",
            f"The real `reencrypt__customers` DAG (repo `dags/`, shipped key class with its dataset in a work folder) "
            f"run by `dag.test()` on a SQLite metadata DB against its own OpenBao: {fmt_int(af['partitions'])} "
            f"partitions of {af['rows_per_partition']} rows (tiny, so the engine's part is small), mode "
            f"`{af['mode']}`, plan → reencrypt[chunk] × N → validate[chunk] × N → census_after. `dag.test()` runs "
            "the tasks one after another in one process; a deployment adds a process start per task. Engine "
            "time = the wall time of the engine calls the tasks make (`process`, `validate`, `census`), timed "
            "inside the tasks. Also shown, narrower: the per-partition durations the engine records in the ledger, "
            "which leave out its partition lease and its own ledger write (on SQLite, a few committed "
            "transactions per partition: most of the engine's time on 10-row partitions), and the same share "
            "in CPU time (this process's CPU during the run against the engine calls' thread CPU time), which "
            "waiting for a busy machine does not move. One-off set-up, not "
            f"counted: `airflow db migrate` {fmt_seconds(af['migrate_s'])}, first DAG-folder parse "
            f"{fmt_seconds(af['dagbag_parse_s'])}"
            + (f", a warm-up dry run {fmt_seconds(af['warmup_dry_run_s'])}" if af.get("warmup_dry_run_s") else "")
            + ".", "",
            "| chunk size | load (1 min) at start | mapped chunks | task instances | wall | engine (inside) | "
            "overhead share (inside) | by ledger durations | by CPU time | overhead per task | KMS requests |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    out += _airflow_rows(af)
    ao = g["airflow_overhead"]
    out += ["", f"{ao['note']}", "",
            f"The same engine calls made directly, without Airflow, after the DAG runs: "
            f"{fmt_seconds(af['direct_engine_s'])}. The runs were made one after another on a shared machine "
            f"(load {meta['load_1min_start']} → {meta['load_1min_end']}), so the engine's own time moves from run "
            "to run; compare the shares, each measured within one run, rather than wall times across runs.", ""]
    out += _airflow_large_section(res)
    out += ["## 6. Scaling", "", "![KEK rotation time vs rows and partitions, log-log](scaling.png)", "",
            "Left: rotation wall time vs R at fixed P, with the two alternatives extrapolated from their measured "
            "rates (markers: where they were measured), and the SQL table's rewrap (section 3). Middle: wall time "
            "vs P at fixed R. Right: KMS requests vs R.", ""]
    out += _census_section(res)
    out += ["## Sizes and timings of this run", "",
            "| part | seconds | load (1 min) at its end |", "|---|---|---|"]
    loads = meta.get("section_load_1min_end", {})
    for name, secs in meta["section_s"].items():
        out.append(f"| {name} | {secs} | {loads.get(name, 'n/a')} |")
    out.append("")
    return "\n".join(out)


def _modules_headline(res: dict) -> list[str]:
    m = res["reencrypt"].get("modules")
    if not m:
        return []
    g, bulk = res["goals"], res["cipher"]["bulk"]["encrypt_mb_s"]
    mem, whole = g["reencrypt_modules_in_memory"], g["reencrypt_modules_file"]
    bits = m.get("data_key_bits")

    def own(share: float | None) -> str:
        return f"; {_pct(share)} of bulk AES-{bits}-GCM, the data keys' own cipher" if bits and bits != 256 \
            and share is not None else ""

    beside = (", measured beside it (just before each repeat in memory, around the engine run file to file)"
              if "bulk_mb_s" in m else "")
    walk = f" ({m['page_walk']} page walk)" if "page_walk" in m else ""
    return [f"| full re-encryption, Parquet PME, module by module (`reencrypt`){walk}, a file held in memory, "
            f"verification included | ≥ {_pct(mem['goal'])} of bulk AES-256-GCM (`encrypt_into`){beside}, per core "
            f"per file byte | {m['in_memory']['file_mb_per_cpu_s']} MB/s per core = {_pct(mem['share'])} of "
            f"{m['in_memory'].get('bulk_mb_s', bulk)} MB/s (median of {m['in_memory']['repeats']} paired repeats)"
            f"{own(m['in_memory'].get('share_of_bulk_data_key_cipher'))} | {_yes(mem['met'])} |",
            f"| same, file to file through the partition store (a new generation per partition, committed), "
            f"{m['partitions']} partitions | ≥ {_pct(whole['goal'])} | {m['file_mb_per_cpu_s']} MB/s per core = "
            f"{_pct(whole['share'])} of {m.get('bulk_mb_s', bulk)} MB/s{own(m.get('share_of_bulk_data_key_cipher'))}"
            f"; {_x(whole['vs_decode_path'])} the decode path | {_yes(whole['met'])} |"]


def _modules_rows(res: dict) -> list[str]:
    m = res["reencrypt"].get("modules")
    if not m:
        return []
    g, im = res["goals"], m["in_memory"]
    return [f"| Parquet PME, engine, module by module (file to file, new generations) | | "
            f"{m['file_bytes'] / 1e6:,.1f} | {fmt_seconds(m['wall_s'])} | {m['cpu_s']} | {m['cores_used']} | | "
            f"{m['file_mb_s']} | {m['file_mb_per_cpu_s']} | {_pct(g['reencrypt_modules_file']['share'])} |",
            f"| Parquet PME, module by module, one file in memory ({im['modules']:,} modules; median of "
            f"{im['repeats']}) | | {im['file_bytes'] / 1e6:,.1f} | {fmt_seconds(im['seconds'])} | {im['cpu_s']} | 1 | "
            f"| | {im['file_mb_per_cpu_s']} | {_pct(g['reencrypt_modules_in_memory']['share'])} |"] + (
        [f"| the same file on the Python page walk (for comparison; median of {im['repeats']}) | | "
         f"{im['file_bytes'] / 1e6:,.1f} | | {py['cpu_s']} | 1 | | | {py['file_mb_per_cpu_s']} | "
         f"{_pct(py['share_of_bulk'])} |"] if (py := im.get("python_walk")) else [])


def _modules_stages(res: dict) -> list[str]:
    m = res["reencrypt"].get("modules")
    if not m:
        return []
    out = ["", "The module path (the same partitions, after a further rotation): every encrypted module of each file "
           "(footer, column metadata, page headers, pages, dictionary pages, indexes) decrypted with the old data key, "
           "encrypted under a new one with its exact associated data, decrypted again and compared, into a new "
           "generation; the encoded bytes and every offset unchanged. Its time (wall seconds, summed over "
           "partitions):", "", "| step | seconds | share |", "|---|---|---|"]
    for name, secs in m["stages_s"].items():
        out.append(f"| {name} | {secs} | {_pct(secs / m['wall_s'])} |")
    return out + [""]


def _airflow_rows(af: dict) -> list[str]:
    out = []
    for r in af["runs"]:
        label = "sized by work (default)" if r["chunk_size"] is None else str(r["chunk_size"])
        out.append(f"| {label} | {r.get('load_1min', 'n/a')} | {r['mapped_chunks']} | "
                   f"{r['task_instances']} | "
                   f"{fmt_seconds(r['wall_s'])} | {fmt_seconds(r['engine_inside_s'])} | "
                   f"{_pct(r['overhead_share_inside'])} | {_pct(r['overhead_share_ledger'])} | "
                   f"{_pct(r.get('overhead_share_cpu'))} | {fmt_seconds(r['overhead_per_task_s'])} | "
                   f"{fmt_int(r['kms_requests']['total'])} |")
    return out


def _airflow_large_headline(res: dict) -> list[str]:
    if "airflow_large" not in res:
        return []
    af, ao = res["airflow_large"], res["goals"]["airflow_overhead_large"]
    return [f"| Airflow overhead, {fmt_int(af['partitions'])} partitions, {_chunking(ao['chunk_size'])} | ≤ 20% "
            f"of wall time | {_pct(ao['share'])} (engine timed inside the tasks); {_pct(ao['share_ledger'])} by "
            f"the ledger's durations | {_yes(ao['met'])} |"]


def _airflow_large_section(res: dict) -> list[str]:
    if "airflow_large" not in res:
        return []
    af, ao = res["airflow_large"], res["goals"]["airflow_overhead_large"]
    return [f"The same DAG over {fmt_int(af['partitions'])} partitions of {af['rows_per_partition']} rows, at the "
            f"default configuration only, in a process of its own (set-up not counted: `airflow db migrate` "
            f"{fmt_seconds(af['migrate_s'])}, writing the partitions {fmt_seconds(af['seed_s'])}"
            + (f", a warm-up dry run {fmt_seconds(af['warmup_dry_run_s'])}" if af.get("warmup_dry_run_s") else "")
            + "):", "",
            "| chunk size | load (1 min) at start | mapped chunks | task instances | wall | engine (inside) | "
            "overhead share (inside) | by ledger durations | by CPU time | overhead per task | KMS requests |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *_airflow_rows(af), "", ao["note"], ""]


def _requests(r: dict | None) -> str:
    if not r:
        return "n/a"
    kinds = ", ".join(f"{k} {fmt_int(v)}" for k, v in r.items() if k != "total")
    return f"{fmt_int(r['total'])} ({kinds})"


def _census_headline(res: dict) -> list[str]:
    if "census" not in res:
        return []
    c = res["census"]
    lo, s3 = c["local"], c["s3"]
    return [f"| census of {fmt_int(lo['partitions'])} partitions (local) / {fmt_int(s3['partitions'])} (S3 on "
            f"moto): fresh, and reused by the plan and the inventory page | responsive at 100,000 | local: fresh "
            f"{fmt_seconds(lo['fresh']['seconds'])}, reused {fmt_seconds(lo['reused']['seconds'])}, plan "
            f"{fmt_seconds(lo['plan']['seconds'])}; S3: fresh {fmt_seconds(s3['fresh']['seconds'])} "
            f"({s3['fresh']['requests']['total'] / s3['partitions']:.2f} requests a partition), reused "
            f"{fmt_seconds(s3['reused']['seconds'])} ({fmt_int(s3['reused']['requests']['total'])} requests) | |"]


def _census_section(res: dict) -> list[str]:
    if "census" not in res:
        return []
    c = res["census"]
    out = ["## 7. Census at scale", "",
           "`KeyClassRuntime.census` of the shipped key class's dataset, as the DAGs take it: **fresh** (every "
           "partition read: its manifest, the first bytes of its data file, its key material; what the retirement "
           "gate, the census after a sweep and the reports take; it keeps each partition's census), **reused** (one "
           "listing of the dataset, then only the partitions whose fingerprint changed are read: what the plan and "
           f"the key inventory page take), the same after a rewrap of {_pct(CHANGED_SHARE)} of the partitions (a "
           "key rotation between: the kept censuses still hold), and the **plan** as `PlanReencryptionOperator` "
           "makes it (reused census, the ledger's evidence, selection, chunks sized by work, estimate). The "
           "partitions are copies of one partition the engine wrote (the census reads labels, footers and "
           "manifests, never data). S3: moto's server in this process (objects put into its backend directly), "
           "reached over HTTP; requests = HTTP requests it answered, by kind (pyarrow asks HEAD before each GET).",
           "", "| store | partitions | fresh | requests | reused | requests | after 1% changed | requests | plan | "
           "fresh again |", "|---|---|---|---|---|---|---|---|---|---|"]
    for store in ("local", "s3"):
        r = c[store]
        out.append(f"| {'local filesystem' if store == 'local' else 'S3 (moto)'} | {fmt_int(r['partitions'])} | "
                   f"{fmt_seconds(r['fresh']['seconds'])} | {_requests(r['fresh'].get('requests'))} | "
                   f"{fmt_seconds(r['reused']['seconds'])} | {_requests(r['reused'].get('requests'))} | "
                   f"{fmt_seconds(r['reused_after_changes']['seconds'])} | "
                   f"{_requests(r['reused_after_changes'].get('requests'))} | {fmt_seconds(r['plan']['seconds'])} | "
                   f"{fmt_seconds(r['fresh_again']['seconds'])} |")
    s3 = c["s3"]
    per = s3["fresh"]["requests"]["total"] / s3["partitions"]
    listing = s3["reused"]["requests"]["total"]
    out += ["", f"On S3 a fresh census asks {per:.2f} requests a partition; at 100,000 partitions that is "
            f"{fmt_int(round(per * 100_000))} requests (at moto's rate here, "
            f"{fmt_seconds(s3['fresh']['seconds'] / s3['partitions'] * 100_000)}; S3 itself answers such reads "
            "in parallel, 16 at a time here), while a reused census asks only the listing: "
            f"{fmt_int(listing)} requests for {fmt_int(s3['objects'])} objects, about "
            f"{fmt_int(round(listing / s3['objects'] * 300_000))} for the 300,000 objects of 100,000 partitions. "
            "Plan steps (local): " + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in c["local"]["plan"]["steps"].items())
            + ".", ""]
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rw = res["rewrap"]
    alt = res["kms_per_value"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    by_p: dict[int, list[dict]] = {}
    by_r: dict[int, list[dict]] = {}
    for ds in rw["datasets"]:
        by_p.setdefault(ds["partitions"], []).append(ds)
        by_r.setdefault(ds["rows"], []).append(ds)
    rows_axis = sorted({ds["rows"] for ds in rw["datasets"]})
    vpr = alt["values_per_row"]
    ax = axes[0]
    for p in rw["r_sweep_at"]:
        pts = sorted(by_p[p], key=lambda d: d["rows"])
        ax.plot([d["rows"] for d in pts], [d["wall_s"] for d in pts], "o-", label=f"engine rewrap, P={p:,}")
    for key, label, marker in (("rewrap_per_value", "(a) per-value rewrap", "s"),
                               ("rewrap_batch_250", "(b) batch rewrap 250", "^")):
        rate = alt[key]["values_per_s"]
        measured_rows = alt[key]["values"] / vpr
        span = [min(measured_rows, rows_axis[0]), rows_axis[-1]]
        line = ax.plot(span, [r * vpr / rate for r in span], "--", label=f"{label}: extrapolated")[0]
        ax.plot([measured_rows], [measured_rows * vpr / rate], marker, color=line.get_color(),
                label=f"{label}: measured ({alt[key]['values']:,} values)")
    sql = _sql(res)
    if sql is not None:
        sql_pts = sorted(sql["tables"], key=lambda t: t["rows"])
        ax.plot([t["rows"] for t in sql_pts], [t["rewrap"]["wall_s"] for t in sql_pts], "D-",
                label=f"SQL table rewrap, P={sql['partitions']} (PostgreSQL)")
        ax.plot([t["rows"] for t in sql_pts], [t["rewrap"]["rest_s"] for t in sql_pts], "d:",
                label="SQL table rewrap without its data-key census")
    ax.set(xscale="log", yscale="log", xlabel="rows R", ylabel="wall time (s)", title="KEK rotation time vs rows")
    ax.legend(fontsize=8)
    ax = axes[1]
    for r in rw["p_sweep_at"]:
        pts = sorted(by_r[r], key=lambda d: d["partitions"])
        ax.plot([d["partitions"] for d in pts], [d["wall_s"] for d in pts], "o-", label=f"engine rewrap, R={r:,}")
    ref = sorted(rw["datasets"], key=lambda d: (d["partitions"], d["rows"]))
    base = next((d for d in ref if d["partitions"] >= 10), ref[0])
    p_axis = sorted({d["partitions"] for d in rw["datasets"]})
    ax.plot(p_axis, [base["wall_s"] * p / base["partitions"] for p in p_axis], ":", color="grey",
            label="∝ P (reference)")
    ax.set(xscale="log", yscale="log", xlabel="partitions P", ylabel="wall time (s)", title="KEK rotation time vs "
           "partitions")
    ax.legend(fontsize=8)
    ax = axes[2]
    for p in rw["r_sweep_at"]:
        pts = sorted(by_p[p], key=lambda d: d["rows"])
        ax.plot([d["rows"] for d in pts], [d["kms_requests"] for d in pts], "o-", label=f"engine rewrap, P={p:,}")
    if sql is not None:
        ax.plot([t["rows"] for t in sql_pts], [t["rewrap"]["kms_requests"] for t in sql_pts], "D-",
                label=f"SQL table rewrap, P={sql['partitions']}")
    ax.plot(rows_axis, [r * vpr for r in rows_axis], "--", label="(a) per-value rewrap")
    ax.plot(rows_axis, [max(1, -(-r * vpr // 250)) for r in rows_axis], "--", label="(b) batch rewrap 250")
    ax.set(xscale="log", yscale="log", xlabel="rows R", ylabel="KMS requests", title="KMS requests vs rows")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    m = res["machine"]
    fig.suptitle(f"keyrotation KEK rotation scaling, this machine: {m['cpu_model']}, {m['cores']} cores, "
                 f"{m['ram_gib']} GiB; {res['meta']['date']} (size {res['meta']['size']}, load "
                 f"{res['meta']['load_1min_start']}→{res['meta']['load_1min_end']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory_flat(mem: dict) -> str:
    small = min(mem["points"], key=lambda p: p["file_bytes"])
    out = ""
    if small is not mem["largest"]:
        out += (f"; {small['working_set_mib']} MiB at {small['partition_over_budget']}× (log-log slope "
                f"{mem.get('working_set_slope')} vs partition size)")
    if mem.get("decode"):
        out += f"; {mem['decode']['working_set_mib']} MiB decoding"
    if mem.get("jemalloc"):
        out += f"; {mem['jemalloc']['working_set_mib']} MiB decoding with jemalloc"
    return out


def _memory_section(mem: dict) -> list[str]:
    big = mem["largest"]
    out = ["## 4. Memory: one partition larger than the budget", "",
           f"Budget: {mem['budget_mib']} MiB of working set (peak RSS minus the RSS of the worker just before it "
           "reads the partition, after imports and its first KMS request). Each partition is one PME file, "
           "re-encrypted (`reencrypt`) in a process of its own; peak RSS = its `VmHWM` (/proc/self/status), not "
           "`getrusage().ru_maxrss`, which Linux carries over from the parent across fork + exec (so a worker "
           "started by the large benchmark process would report the parent's RSS as its peak). "
           "The engine re-encrypts the partition module by module where it can (path `module`: one module at a "
           "time) and otherwise decodes it, streaming"
           + (f" ({fmt_int(big['batch_rows'])} rows at a time, row groups of {fmt_int(big['row_group_rows'])} "
              "rows)" if big.get("batch_rows") else "")
           + " (path `decode`), so the working set should not grow with it: each size is measured in the same run "
           "on the engine's default path"
           + (", the largest once more on the decode path" if mem.get("decode") else "")
           + (", and the largest once more with pyarrow's jemalloc pool (`ARROW_DEFAULT_MEMORY_POOL=jemalloc` "
              "for the worker) instead of its default, decoding" if mem.get("jemalloc") else "")
           + ". Arrow pool peak = `MemoryPool.max_memory()`, the most Arrow itself had allocated at once.", "",
           "| partition file | path | × budget | rows | Arrow MiB | memory pool | RSS before | peak RSS | "
           "working set | Arrow pool peak | × budget | × file size | re-encrypt | goal |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = list(mem["points"]) + [p for p in (mem.get("decode"), mem.get("jemalloc")) if p]
    for p in rows:
        pool_peak = "n/a" if p.get("arrow_pool_peak_mib") is None else f"{p['arrow_pool_peak_mib']} MiB"
        out.append(f"| {p['file_bytes'] / MIB:,.1f} MiB | {p.get('path') or 'decode'} | {p['partition_over_budget']} | "
                   f"{fmt_int(p['rows'])} | "
                   f"{p['arrow_bytes'] / MIB:,.0f} | {p.get('memory_pool') or 'n/a'}"
                   f"{' (env)' if p.get('env') else ''} | {p['rss_before_mib']} MiB | {p['peak_rss_mib']} MiB | "
                   f"{p['working_set_mib']} MiB | {pool_peak} | {p['working_set_over_budget']} | "
                   f"{p['working_set_over_file_bytes']} | {fmt_seconds(p['reencrypt_s'])} | {_yes(p['met'])} |")
    out.append("")
    if mem.get("working_set_slope") is not None:
        out += [f"Working set against partition size: {_x(mem['working_set_ratio'])} the working set for "
                f"{_x(mem['file_ratio'])} the file bytes (log-log slope {mem['working_set_slope']}; 0 = flat, "
                "1 = proportional).", ""]
    out += [f"{'Met.' if mem['met'] else 'Not met.'} Cause: {mem['cause']}. Gap at the largest partition: "
            f"{max(big['working_set_mib'] - mem['budget_mib'], 0):,.1f} MiB over the budget"
            + (f" ({max(mem['jemalloc']['working_set_mib'] - mem['budget_mib'], 0):,.1f} MiB with jemalloc)"
               if mem.get("jemalloc") else "") + ".", ""]
    return out


def _sql(res: dict) -> dict | None:
    sql = res.get("sql_table")
    return sql if sql and "reencrypt" in sql else None


def _sql_missing(res: dict) -> str:
    sql = res.get("sql_table")
    return f"not measured in this run: {sql['skipped']}" if sql and sql.get("skipped") else \
        "not measured in this run (results from before the suite measured the SQL-table path)"


def _batched_headline(g: dict) -> list[str]:
    """The batched KEK rotation's row (runs from before it was measured have none)."""
    b = g.get("kek_rotation_batched")
    if b is None:
        return []
    return [f"| KEK rotation in batches of {fmt_int(b['partitions'])} partitions, one chunk (`process_many`) | "
            f"≤ {fmt_int(b['allowed_requests'])} KMS requests, ≥ {b['goal_partitions_per_s']} partitions/s | "
            f"{fmt_int(b['kms_requests'])} KMS requests, {fmt_int(round(b['partitions_per_s']))} partitions/s | "
            f"{_yes(b['met'])} |"]


def _sql_headline(res: dict) -> list[str]:
    sql, g = _sql(res), res.get("goals", {})
    if sql is None:
        return [f"| SQL tables (`SqlTableEngine`, PostgreSQL) | | {_sql_missing(res)} | n/a |"]
    head = max(sql["tables"], key=lambda t: t["rows"])
    rw, r, ss = head["rewrap"], sql["reencrypt"], res["summary"]["sql_table"]
    fl, kms, bd = g["sql_rewrap_flat_in_r"], g["sql_kms_calls_o_data_keys"], g["sql_reencrypt_bounded_by_db"]
    with_db = r.get("plaintext_mb_per_core_s_with_db")
    return [
        f"| KEK rotation of a SQL table of {fmt_int(head['rows'])} rows in {sql['partitions']} day partitions "
        f"(`SqlTableEngine` `rewrap`) | KMS requests O(data keys) | {fmt_int(rw['kms_requests'])} KMS requests "
        f"({fmt_int(rw['kms_rewrap_requests'])} rewrap = 1 per partition, for {rw['data_keys']} data keys, "
        f"+ {kms['constant']}); {rw['table_rows_written']} rows of the table written | {_yes(kms['met'])} |",
        f"| same, wall time | flat in R | {fmt_seconds(rw['wall_s'])} ({fmt_int(rw['rows_per_s'])} rows/s "
        f"equivalent); log-log slope vs R {fl['slope']}, {fl['slope_without_census']} without its data-key "
        f"census; {_x(fl['max_ratio'])} wall for {_x(fl['rows_ratio'])} rows | {_yes(fl['met'])} |",
        f"| full re-encryption, SQL table (`reencrypt`), {fmt_int(r['rows'])} rows | bounded by the database, "
        f"rows/s (≥ {bd['goal'] * 100:.0f}% of the rows/s of its own database round trip without crypto) | "
        f"{fmt_int(r['rows_per_s'])} rows/s = {_pct(bd['share'])} of that round trip, "
        f"{_pct(bd['share_of_reference_update'])} of a server-side `UPDATE` of the same rows; "
        f"{_pct(r['database_share'])} of its time in PostgreSQL statements. Plaintext {r['plaintext_mb_s']} MB/s, "
        f"{r['plaintext_mb_per_cpu_s']} MB/s per core of this process"
        + (f", {with_db} per core with its PostgreSQL backends" if with_db is not None else "")
        + f" ({ss['share_of_bulk_aes'] * 100:.3f}% of bulk AES-GCM) | {_yes(bd['met'])} |",
    ]


def _sql_reencrypt_row(res: dict) -> str:
    sql = _sql(res)
    if sql is None:
        return f"| SQL tables | {_sql_missing(res)} | | | | | | | | |"
    r, bulk = sql["reencrypt"], res["cipher"]["bulk"]["encrypt_mb_s"]
    return (f"| SQL table, engine (section 3; MB = plaintext of the encrypted columns) | {fmt_int(r['rows'])} | "
            f"{r['plaintext_bytes'] / 1e6:,.1f} | {fmt_seconds(r['wall_s'])} | {r['cpu_s']} | "
            f"{round(r['cpu_s'] / r['wall_s'], 2)} | {fmt_int(r['rows_per_s'])} | {r['plaintext_mb_s']} | "
            f"{r['plaintext_mb_per_cpu_s']} | {r['plaintext_mb_per_cpu_s'] / bulk * 100:.3f}% |")


def _gate_census(table: dict) -> str:
    """The gate's census of one SQL table: its time, and how it read the data key ids (older runs: n/a)."""
    census = table.get("census")
    if census is None:
        return "n/a"
    return f"{fmt_seconds(census['wall_s'])} ({'key-id index' if census['key_id_index'] else 'scan of every value'})"


def _sql_section(res: dict) -> list[str]:
    sql = _sql(res)
    out = ["## 3. SQL tables (`SqlTableEngine`, PostgreSQL): write, KEK rotation, full re-encryption", ""]
    if sql is None:
        return [*out, _sql_missing(res) + ".", ""]
    r, up, rt = sql["reencrypt"], sql["reference_update"], sql["reference_round_trip"]
    v, va, lc, g = sql["validate"], sql["validate_after"], sql["local_cipher"], res["goals"]
    cols = ", ".join(f"`{c}`" for c in sql["columns"])
    settings = ", ".join(f"{k} {v_}" for k, v_ in sql["server_settings"].items())
    out += [
        f"Fresh tables on the machine's PostgreSQL {sql['server_version'].split()[0]} (`{sql['pg_url']}`; {settings}) "
        f"of R rows in {sql['partitions']} day partitions, two encrypted columns ({cols} of the synthetic "
        "customers, `bytea` envelopes under one data key per partition, the data keys in `keyrotation_data_keys`), "
        "primary key `id` and an index on `(day, id)`; each dropped afterwards with its data keys. Every "
        "operation runs through a new `SqlTableEngine` (an empty data-key cache, as a new task has) over all "
        f"partitions (`engine.run`), batch size {fmt_int(sql['batch_size'])} rows, against the same OpenBao "
        f"(its own Transit key). KMS requests counted under hvac. Rewrap: median of {sql['repeats']} rotations "
        "(min–max); `census` = what the rewrap reads before and after (`data_key_census`: the partition's rows in "
        "the data-key table); `rest` = KMS, the data-key rows' update, ledger and leases. Rows written = rows of the "
        "table whose writing transaction (`xmin`) changed during the first rewrap. `gate census` = the census the "
        "planner and the retirement gate read (`partition_census` of every partition: the values' data key ids "
        "from the key-id index, and a `count(*)` of the rows), once.", "",
        "| rows R | ciphertext MB stored | write (`write_partition`) | write rows/s | rewrap (median) | min–max | "
        "census | rest | KMS requests (rewrap / total) | data keys | rows of the table written | rows/s equivalent | "
        "gate census |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in sorted(sql["tables"], key=lambda t: t["rows"]):
        w, rw = t["write"], t["rewrap"]
        out.append(f"| {fmt_int(t['rows'])} | {w['ciphertext_bytes'] / 1e6:,.1f} | {fmt_seconds(w['wall_s'])} | "
                   f"{fmt_int(w['rows_per_s'])} | {fmt_seconds(rw['wall_s'])} | {fmt_seconds(rw['wall_s_min'])}–"
                   f"{fmt_seconds(rw['wall_s_max'])} | {fmt_seconds(rw['census_s'])} | {fmt_seconds(rw['rest_s'])} | "
                   f"{fmt_int(rw['kms_rewrap_requests'])} / {fmt_int(rw['kms_requests'])} | {rw['data_keys']} | "
                   f"{fmt_int(rw['table_rows_written'])} | {fmt_int(rw['rows_per_s'])} | {_gate_census(t)} |")
    fl = g["sql_rewrap_flat_in_r"]
    out += ["", f"Rewrap: log-log slope of wall time vs R {fl['slope']} ({_x(fl['max_ratio'])} the time for "
            f"{_x(fl['rows_ratio'])} the rows); without the census {fl['slope_without_census']}. "
            + (fl["cause"][0].upper() + fl["cause"][1:] + "." if fl["cause"] else "Flat in R."), ""]

    def db_cpu(x: dict) -> str:
        return "n/a" if x.get("db_cpu_s") is None else f"{x['db_cpu_s']}"

    def per_core(rows: int, x: dict) -> str:
        return "n/a" if x.get("db_cpu_s") is None else fmt_int(rows / (x["cpu_s"] + x["db_cpu_s"]))

    plain = r["plaintext_bytes"]
    out += [f"Full re-encryption (`reencrypt`, new data keys, every value rewritten with compare-and-set) of the "
            f"{fmt_int(r['rows'])}-row table ({plain / 1e6:,.1f} MB of plaintext in the encrypted columns, "
            f"{r['ciphertext_bytes'] / 1e6:,.1f} MB stored), against the database alone on the same rows, same "
            "batches, no crypto: (1) `UPDATE t SET email = email, ssn = ssn` over keyset batches, server-side, one "
            "transaction a batch (the least a rewrite of those rows costs); (2) the engine's own round trip: its "
            "keyset `SELECT` into pandas and its compare-and-set `UPDATE ... FROM (VALUES ...)`, every value "
            "written back as read. `VACUUM ANALYZE` before each. CPU: this process (all threads), and its "
            "PostgreSQL backends (from /proc); per core = rows per CPU second of both.", "",
            "| path | rows | wall | rows/s | plaintext MB/s | CPU s, this process | CPU s, PostgreSQL | "
            "rows per core-second (both) | per batch | engine's rows/s as a share |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| engine `reencrypt` | {fmt_int(r['rows'])} | {fmt_seconds(r['wall_s'])} | {fmt_int(r['rows_per_s'])} | "
            f"{r['plaintext_mb_s']} | {r['cpu_s']} | {db_cpu(r)} | {per_core(r['rows'], r)} | "
            f"{fmt_seconds(r['seconds_per_batch'])} | 100% |",
            f"| (2) its database round trip, no crypto | {fmt_int(rt['rows'])} | {fmt_seconds(rt['wall_s'])} | "
            f"{fmt_int(rt['rows_per_s'])} | {plain / 1e6 / rt['wall_s']:.3f} | {rt['cpu_s']} | {db_cpu(rt)} | "
            f"{per_core(rt['rows'], rt)} | {fmt_seconds(rt['seconds_per_batch'])} | "
            f"{_pct(r['share_of_reference_round_trip'])} |",
            f"| (1) server-side `UPDATE ... SET col = col` | {fmt_int(up['rows'])} | {fmt_seconds(up['wall_s'])} | "
            f"{fmt_int(up['rows_per_s'])} | {plain / 1e6 / up['wall_s']:.3f} | {up['cpu_s']} | {db_cpu(up)} | "
            f"{per_core(up['rows'], up)} | {fmt_seconds(up['seconds_per_batch'])} | "
            f"{_pct(r['share_of_reference_update'])} |",
            f"| engine `validate` (decrypt every value), before / after | {fmt_int(v['rows'])} | "
            f"{fmt_seconds(v['wall_s'])} / {fmt_seconds(va['wall_s'])} | {fmt_int(v['rows_per_s'])} / "
            f"{fmt_int(va['rows_per_s'])} | {v['plaintext_mb_s']} / {va['plaintext_mb_s']} | {v['cpu_s']} / "
            f"{va['cpu_s']} | | | | |",
            f"| local limit: AES-256-GCM per value, decrypt + encrypt under a new key, these values "
            f"({lc['mean_value_bytes']} B mean), one core | {fmt_int(lc['values'] // len(sql['columns']))} | | "
            f"{fmt_int(lc['reencrypt_rows_per_s'])} | {lc['reencrypt_mb_s']} | | | "
            f"{fmt_int(lc['reencrypt_rows_per_s'])} | | "
            f"{_pct(r['rows_per_cpu_s'] / lc['reencrypt_rows_per_s'])} (per CPU second of this process) |",
            f"| local limit: bulk AES-256-GCM, one buffer, one core | | | | {res['cipher']['bulk']['encrypt_mb_s']} "
            f"| | | | | {r['plaintext_mb_per_cpu_s'] / res['cipher']['bulk']['encrypt_mb_s'] * 100:.3f}% "
            "(MB/s per core) |",
            "", f"Where the engine's re-encryption time goes ({fmt_int(r['batches'])} batches of up to "
            f"{fmt_int(r['batch_size'])} rows; per batch: keyset read {fmt_seconds(r['per_batch_s']['read'])}, "
            f"decrypt + seal {fmt_seconds(r['per_batch_s']['transform'])}, compare-and-set UPDATE "
            f"{fmt_seconds(r['per_batch_s']['cas'])}; KMS requests {r['kms']['total']}: "
            + ", ".join(f"{k} {n}" for k, n in r["kms"]["by_operation"].items()) + ", i.e. per partition):", "",
            "| step | seconds | share |", "|---|---|---|"]
    for name, secs in r["stages_s"].items():
        out.append(f"| {name} | {secs} | {_pct(secs / r['wall_s'])} |")
    transform = r["stages_s"]["decrypt + seal every value (Python, AES-GCM)"]
    bd = g["sql_reencrypt_bounded_by_db"]
    out += ["", f"**Bounded by the database: {'yes' if bd['met'] else 'no'}.** "
            f"{_pct(r['database_share'])} of the engine's time is PostgreSQL statements (census, keyset reads, "
            f"compare-and-set UPDATEs, as seen from the client: driver and server), and it runs at "
            f"{_pct(r['share_of_reference_round_trip'])} of the rows/s of that same round trip without crypto: "
            f"decrypting and sealing {fmt_int(r['rows'] * len(sql['columns']))} values in Python adds "
            f"{fmt_seconds(transform)} ({_pct(transform / r['wall_s'])}). Causes of the gaps: "
            f"(a) to the server-side UPDATE ({_pct(r['share_of_reference_update'])}): the round trip itself runs at "
            f"{_pct(rt['rows_per_s'] / up['rows_per_s'])} of it, because every value travels to the client and "
            f"back (keyset reads into pandas: {fmt_seconds(rt['read_s'])}; the compare-and-set UPDATE with a "
            f"{fmt_int(sql['batch_size'])}-row VALUES list of old and new `bytea` values sent as text by "
            f"psycopg2's `execute_values`, parsed and compared by the server: {fmt_seconds(rt['cas_s'])}), and the "
            "client and the server take turns, about one core in all; (b) to the cipher: these values are short "
            f"({lc['mean_value_bytes']} B), so the per-value cost (nonce, header, associated data, a Python call "
            f"each) is the limit, not AES: per-value AES-GCM re-encryption on one core reaches "
            f"{fmt_int(lc['reencrypt_rows_per_s'])} rows/s ({lc['reencrypt_mb_s']} MB/s, "
            f"{lc['reencrypt_mb_s'] / res['cipher']['bulk']['encrypt_mb_s'] * 100:.2f}% of bulk AES-GCM), and the "
            "envelope's parse, associated data and row binding in Python cost more again; MB/s per core is "
            "therefore not the measure of this path, rows/s against the database is.", ""]
    return out
