"""Load test of the sidecar through a rotation: ``python bench/sidecar_load.py [--duration 30]``.

Against a real OpenBao dev server and the machine's PostgreSQL, all on loopback:

1. a key class with a ``sql_table`` dataset: a table of P partitions x R rows whose ``email`` column is
   encrypted through the client library (one data key per partition, under v1, the ledger's reference);
2. the sidecar (``python -m keyrotation.sidecar``) in a process of its own;
3. a load generator in a third process (this file with ``--role load``): C concurrent keep-alive
   connections for D seconds, each request chosen at random: decrypt a stored value (row bound), encrypt a
   new value into a random partition, or decrypt a value this run encrypted earlier (so values written
   before the rotation are read after it). Every answer is checked (status 200, plaintext equal);
4. at D/3, the rotation as the DAGs do it: a new Transit version, the ledger's reference moved, then the
   ``rewrap`` sweep of every partition through ``SqlTableEngine`` (leases, ledger rows); at 2D/3 the
   retirement of v1 through the one retirement gate (census, grace 0 s), raising the key's minimum versions.

Reports throughput, latency percentiles (overall, per phase, per endpoint), errors and failed decrypts, and
the sidecar's KMS calls against its requests, to ``--out``/sidecar_load.json and .md (default bench/results).
Bounded: the load stops by itself after D seconds (and at most ``--max-requests``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, child_env, load_average, machine, now_utc, setup_path, versions  # noqa: E402

setup_path()

PG_URL = os.environ.get("KEYROTATION_BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
KEY_CLASS = "bench_sidecar"
KEY_CLASS_YAML = """\
key_class:
  name: {name}
  backend: vault_transit
  key_ref: {key_ref}
  conn_id: unused
  rotation: {{schedule: "@daily", cryptoperiod: 90d}}
  reencryption: {{mode: rewrap}}
  retire: {{grace_period: 0s, versions_kept: 1, approval_required: false}}
datasets:
  - name: accounts
    format: sql_table
    location: {pg_url}
    table: {table}
    partition_column: day
    encrypted_columns: [email]
"""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# -- the load generator (its own process) ---------------------------------------------------------

class _Http:
    """A lean HTTP/1.1 keep-alive client on asyncio streams: the load generator's CPU goes to sending
    requests, not to a client library (httpx costs several times the sidecar's own CPU per request)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, payload: dict) -> tuple[int, dict]:
        body = json.dumps(payload).encode()
        for attempt in (0, 1):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await self.writer.drain()
                head = await self.reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                data = await self.reader.readexactly(length)
                return int(head[9:12]), json.loads(data)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.writer = None  # the server closed a kept-alive connection: reconnect once
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _load(target: str, work: dict, duration: float, connections: int, max_requests: int,
                mix: tuple[float, float]) -> dict:
    from urllib.parse import urlsplit

    stored = work["stored"]
    days, table = work["days"], work["table"]
    rng = random.Random(7)
    written: list[tuple[int, str, str]] = []  # (pk, plaintext b64, ciphertext b64) encrypted by this run
    records: list[tuple[float, float, str, int, int]] = []  # (start wall, latency, op, status, key_version)
    failures: list[str] = []
    next_pk = [10_000_000]
    sent = [0]
    deadline = time.monotonic() + duration
    url = urlsplit(target)

    async def worker() -> None:
        http = _Http(url.hostname or "127.0.0.1", url.port or 80)
        while time.monotonic() < deadline and sent[0] < max_requests:
            sent[0] += 1
            roll = rng.random()
            version = 0
            if roll < mix[0] or (roll >= mix[0] + mix[1] and not written):
                op = "decrypt"
                pk, day, ciphertext, plaintext = stored[rng.randrange(len(stored))]
                body = {"ciphertext": ciphertext, "context": {"table": table, "column": "email", "pk": pk}}
            elif roll < mix[0] + mix[1]:
                op = "encrypt"
                next_pk[0] += 1
                pk, plaintext = next_pk[0], b64(f"new-{next_pk[0]}@example.test".encode())
                body = {"plaintext": plaintext, "context": {"table": table, "column": "email", "pk": pk,
                                                            "partition": days[pk % len(days)]}}
            else:
                op = "decrypt_own"
                pk, plaintext, ciphertext = written[rng.randrange(len(written))]
                body = {"ciphertext": ciphertext, "context": {"table": table, "column": "email", "pk": pk}}
            wall, start = time.time(), time.perf_counter()
            try:
                status, answer = await http.post("/v1/encrypt" if op == "encrypt" else "/v1/decrypt", body)
            except Exception as exc:  # noqa: BLE001 - a transport error is a failed request, counted
                status, answer = 0, {"error": type(exc).__name__}
                http.close()
                http = _Http(url.hostname or "127.0.0.1", url.port or 80)
            latency = time.perf_counter() - start
            if status != 200:
                failures.append(f"{op} {status} {answer.get('error')}")
            elif op == "encrypt":
                version = int(answer["key_version"])
                written.append((pk, plaintext, answer["ciphertext"]))
            elif answer.get("plaintext") != plaintext:
                status = -1  # answered, but not the value that was encrypted
                failures.append(f"{op}: wrong plaintext")
            records.append((wall, latency, op, status, version))
        http.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return {"records": records, "failures": failures[:50], "failure_count": len(failures),
            "encrypted": len(written)}


def load_main(args: argparse.Namespace) -> int:
    work = json.loads(Path(args.work).read_text())
    cpu0 = time.process_time()
    result = asyncio.run(_load(args.target, work, args.duration, args.connections, args.max_requests,
                               (args.decrypt_share, args.encrypt_share)))
    result["cpu_s"] = time.process_time() - cpu0
    Path(args.result).write_text(json.dumps(result))
    return 0


# -- the orchestrator -----------------------------------------------------------------------------

def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _sum(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k == prefix or k.startswith(prefix + "{"))


def run(args: argparse.Namespace) -> dict:
    import httpx
    import sqlalchemy as sa

    from keyrotation import ledger as lg
    from keyrotation.backends.vault_transit import VaultTransitBackend
    from keyrotation.client import KeyRotationClient
    from keyrotation.config import load_key_class
    from keyrotation.ledger import Ledger, RunContext
    from keyrotation.retirement import plan_retirement, retire
    from keyrotation.rotation import update_reference
    from keyrotation.runtime import KeyClassRuntime
    from keyrotation.stores.data_keys import DATA_KEYS
    from keyrotation_dev.devserver import OpenBaoDevServer, free_port, stop_process

    started_at, load_start = now_utc(), load_average()
    wall0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="keyrotation-sidecar-load-"))
    ctx = RunContext(actor="bench", dag_id="bench_sidecar_load")
    ok = False
    pg = sa.create_engine(PG_URL, hide_parameters=True)
    try:
        with pg.connect():
            pass
    except sa.exc.OperationalError as exc:
        raise SystemExit(f"PostgreSQL at {PG_URL} is needed (set KEYROTATION_BENCH_PG_URL): {exc}") from None
    table = f"bench_sidecar_{secrets.token_hex(3)}"
    bao = OpenBaoDevServer(log_path=str(tmp / "bao.log")).start()
    sidecar = loader = None
    try:
        key_ref = f"bench-sidecar-{secrets.token_hex(3)}"
        (tmp / "config").mkdir()
        (tmp / "config" / f"{KEY_CLASS}.yaml").write_text(KEY_CLASS_YAML.format(
            name=KEY_CLASS, key_ref=key_ref, pg_url=PG_URL, table=table))
        config = load_key_class(KEY_CLASS, tmp / "config")
        backend = VaultTransitBackend(bao.client(), key_ref)
        backend.create_key()
        ledger_url = f"sqlite:///{tmp / 'ledger.db'}"
        ledger = Ledger(ledger_url)
        update_reference(KEY_CLASS, 1, ledger, ctx)

        # 1. the table, encrypted through the library (the same bytes the sidecar and the DAGs use)
        days = [f"2024-07-{d:02d}" if d <= 31 else f"2024-08-{d - 31:02d}" for d in range(1, args.partitions + 1)]
        with pg.begin() as conn:
            conn.execute(sa.text(f"CREATE TABLE {table} (id bigint PRIMARY KEY, day date NOT NULL, email bytea)"))
        library = KeyRotationClient(backend, ledger, KEY_CLASS, db=pg)
        stored, rows = [], []
        for p, day in enumerate(days):
            for i in range(args.rows):
                pk = p * args.rows + i
                plaintext = f"user{pk}@example.test".encode()
                ciphertext = library.encrypt(plaintext, {"table": table, "column": "email", "pk": pk,
                                                         "partition": day})
                rows.append({"id": pk, "day": day, "email": ciphertext})
                stored.append((pk, day, b64(ciphertext), b64(plaintext)))
        with pg.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {table} (id, day, email) VALUES (:id, :day, :email)"), rows)
        library.close()
        (tmp / "work.json").write_text(json.dumps({"stored": stored, "days": days, "table": table}))

        # 2. the sidecar
        port = free_port()
        env = child_env({"VAULT_TOKEN": bao.token, "KEYROTATION_LEDGER_URL": ledger_url, "KEYROTATION_DB_URL": PG_URL})
        sidecar_log = open(tmp / "sidecar.log", "ab")  # noqa: SIM115 - closed below
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "keyrotation.sidecar", "--key-class", KEY_CLASS, "--config-dir",
             str(tmp / "config"), "--vault-url", bao.url, "--port", str(port), "--poll-interval",
             str(args.poll_interval), "--log-level", "warning"],
            env=env, stdout=sidecar_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        target = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=target, timeout=10)
        deadline = time.monotonic() + 60
        while True:
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if sidecar.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sidecar did not start:\n{(tmp / 'sidecar.log').read_text()[-3000:]}")
            time.sleep(0.2)
        metrics_before = _metrics(http.get("/metrics").text)
        cpu_sidecar0 = _cpu_seconds(sidecar.pid)

        # 3. the load, from another process
        load_log = open(tmp / "load.log", "ab")  # noqa: SIM115 - closed below
        loader = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--role", "load", "--target", target, "--work",
             str(tmp / "work.json"), "--result", str(tmp / "load.json"), "--duration", str(args.duration),
             "--connections", str(args.connections), "--max-requests", str(args.max_requests),
             "--decrypt-share", str(args.decrypt_share), "--encrypt-share", str(args.encrypt_share)],
            env=child_env(), stdout=load_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        t_load = time.time()

        # 4. rotation and rewrap sweep at D/3, retirement at 2D/3, while the load runs
        events: dict[str, Any] = {}
        time.sleep(args.duration / 3)
        runtime = KeyClassRuntime(config, backend, ledger)
        events["rotate_start"] = time.time()
        v2 = backend.rotate()
        events["rotated"] = time.time()
        update_reference(KEY_CLASS, v2, ledger, ctx)
        events["reference_updated"] = time.time()
        engine = runtime.engine("accounts", ctx)
        results = engine.run(days, lambda p: engine.process(p, v2, "rewrap"))
        engine.run(days, lambda p: engine.validate(p, min_version=v2))  # the retirement gate's evidence
        events["sweep_done"] = time.time()
        swept = {"partitions": len(results), "actions": sorted({r.action for r in results}),
                 "data_keys": sum(json.loads(r["detail"])["data_keys"] for r in ledger.rows(
                     key_class=KEY_CLASS, events_in=(lg.PARTITION_REWRAPPED,)))}
        time.sleep(max(0.0, t_load + 2 * args.duration / 3 - time.time()))
        events["retire_start"] = time.time()
        plan = plan_retirement(config.key_class, backend.key_state(), ledger.current_version(KEY_CLASS))
        state = retire(backend, config.key_class, plan, runtime.censuses(), ledger, ctx)
        events["retired"] = time.time()
        loader.wait(timeout=args.duration + 120)
        if loader.returncode != 0 or not (tmp / "load.json").exists():
            raise RuntimeError(f"load generator failed:\n{(tmp / 'load.log').read_text()[-3000:]}")
        load = json.loads((tmp / "load.json").read_text())
        cpu_sidecar = (_cpu_seconds(sidecar.pid) or 0) - (cpu_sidecar0 or 0)
        metrics_after = _metrics(http.get("/metrics").text)
        health = http.get("/healthz").json()
        http.close()
        with pg.connect() as conn:
            data_keys = conn.execute(sa.text(f"SELECT count(*) FROM {DATA_KEYS} WHERE table_name = :t"),
                                     {"t": table}).scalar()
        log_text = (tmp / "sidecar.log").read_text(errors="replace")
        ok = True
    finally:
        for proc in (loader, sidecar):
            stop_process(proc)
        bao.stop()
        with pg.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
            if sa.inspect(conn).has_table(DATA_KEYS):
                conn.execute(sa.text(f"DELETE FROM {DATA_KEYS} WHERE table_name = :t"), {"t": table})
        pg.dispose()
    if ok:  # on a failure the folder stays, with the sidecar's, the load generator's and OpenBao's logs
        shutil.rmtree(tmp, ignore_errors=True)

    # -- the figures
    records = load["records"]
    t0 = min(r[0] for r in records)
    t_end = max(r[0] + r[1] for r in records)
    phases = [
        ("before rotation", t0, events["rotate_start"]),
        ("rotation + rewrap sweep", events["rotate_start"], events["sweep_done"]),
        ("after rotation", events["sweep_done"], events["retire_start"]),
        ("retirement of v1 and after", events["retire_start"], t_end),
    ]

    def summary(rs: list, seconds: float | None = None) -> dict:
        lat = [r[1] for r in rs]
        span = seconds if seconds is not None else ((max(r[0] + r[1] for r in rs) - min(r[0] for r in rs))
                                                    if rs else 0.0)
        ms = 1000
        return {"requests": len(rs), "seconds": round(span, 3),
                "throughput_rps": round(len(rs) / span, 1) if span else None,
                "errors": sum(1 for r in rs if r[3] != 200),
                "p50_ms": round(percentile(lat, 50) * ms, 2) if lat else None,
                "p90_ms": round(percentile(lat, 90) * ms, 2) if lat else None,
                "p99_ms": round(percentile(lat, 99) * ms, 2) if lat else None,
                "max_ms": round(max(lat) * ms, 2) if lat else None,
                "mean_ms": round(statistics.fmean(lat) * ms, 2) if lat else None}

    by_phase = {name: summary([r for r in records if start <= r[0] < end], end - start)
                for name, start, end in phases}
    by_op = {op: summary([r for r in records if r[2] == op], t_end - t0)
             for op in ("decrypt", "encrypt", "decrypt_own")}
    after_ref = [r for r in records if r[2] == "encrypt" and r[0] >= events["reference_updated"]]
    first_v2 = min((r[0] + r[1] for r in after_ref if r[4] == v2), default=None)
    kms_ops = {k.split('"')[1]: v - metrics_before.get(k, 0.0) for k, v in metrics_after.items()
               if k.startswith("keyrotation_client_kms_calls_total{")}
    data_path_kms = kms_ops.get("wrap", 0.0) + kms_ops.get("unwrap", 0.0)
    requests = len(records)
    overall = summary(records, t_end - t0)
    hits = _sum(metrics_after, "keyrotation_client_cache_hits_total") - \
        _sum(metrics_before, "keyrotation_client_cache_hits_total")
    misses = _sum(metrics_after, "keyrotation_client_cache_misses_total") - \
        _sum(metrics_before, "keyrotation_client_cache_misses_total")
    failed_decrypts = sum(1 for r in records if r[2] != "encrypt" and r[3] != 200)
    return {
        "benchmark": "sidecar_load",
        "started_at": started_at,
        "wall_s": round(time.monotonic() - wall0, 1),
        "machine": machine(),
        "versions": {**versions(), **{n: _version(n) for n in ("fastapi", "uvicorn", "httpx", "sqlalchemy")}},
        "load_average": {"start": load_start, "end": load_average()},
        "command": os.environ.get("BENCH_COMMAND", " ".join(["python bench/sidecar_load.py", *sys.argv[1:]])),
        "setup": {"partitions": args.partitions, "rows_per_partition": args.rows, "stored_values": len(stored),
                  "connections": args.connections, "duration_s": args.duration, "poll_interval_s": args.poll_interval,
                  "mix": {"decrypt_stored": args.decrypt_share, "encrypt": args.encrypt_share,
                          "decrypt_own": round(1 - args.decrypt_share - args.encrypt_share, 3)},
                  "kms": "OpenBao dev server (Transit) on loopback", "data_keys_db": "PostgreSQL on loopback",
                  "ledger": "SQLite file"},
        "overall": overall,
        "by_phase": by_phase,
        "by_operation": by_op,
        "errors": {"failed_requests": load["failure_count"], "failed_decrypts": failed_decrypts,
                   "examples": load["failures"][:10],
                   "sidecar_errors_total": _sum(metrics_after, "keyrotation_client_errors_total")},
        "kms": {"calls_by_operation": {k: int(v) for k, v in sorted(kms_ops.items())},
                "data_path_calls": int(data_path_kms), "requests": requests,
                "calls_per_1000_requests": round(1000 * data_path_kms / requests, 3) if requests else None,
                "cache_hits": int(hits), "cache_misses": int(misses),
                "cache_hit_ratio": round(hits / (hits + misses), 5) if hits + misses else None},
        "rotation": {"from_version": 1, "to_version": v2,
                     "rotate_s": round(events["rotated"] - events["rotate_start"], 3),
                     "reference_to_first_encrypt_under_new_s":
                         round(first_v2 - events["reference_updated"], 3) if first_v2 else None,
                     "sweep_s": round(events["sweep_done"] - events["reference_updated"], 3), "sweep": swept,
                     "retire_s": round(events["retired"] - events["retire_start"], 3),
                     "min_decryption_version_after": state.min_decryption_version,
                     "at_s_into_load": {k: round(v - t0, 2) for k, v in events.items()},
                     "data_keys_in_table_after": data_keys},
        "cpu": {"sidecar_s": round(cpu_sidecar, 2), "load_generator_s": round(load["cpu_s"], 2),
                "sidecar_requests_per_cpu_s": round(requests / cpu_sidecar, 1) if cpu_sidecar else None},
        "health_after": health,
        "log_lines": len(log_text.splitlines()),
        "plaintext_in_sidecar_log": any(f"user{i}@example.test" in log_text for i in range(0, len(stored), 97)),
    }


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def markdown(res: dict) -> str:
    m, o, k, rot, e = res["machine"], res["overall"], res["kms"], res["rotation"], res["errors"]
    s = res["setup"]
    lines = [
        "# Sidecar under load, through a rotation",
        "",
        f"**Measured {res['started_at']} on this machine:** {m['description']}; {m['cores_usable']} cores usable. "
        f"Run: `{res['command']}`, {res['wall_s']} s in all. Load average (1 min): {res['load_average']['start']} "
        f"at start, {res['load_average']['end']} at end (other work may have shared the machine). "
        "The sidecar, the load generator, OpenBao and PostgreSQL all ran on this machine, on loopback: absolute "
        "figures are this machine's; the KMS calls per request and the errors are what carry over.",
        "",
        f"Setup: a `sql_table` dataset of {s['partitions']} partitions x {s['rows_per_partition']} rows (one data "
        f"key per partition), the sidecar (`python -m keyrotation.sidecar`, poll every {s['poll_interval_s']:g} s, "
        f"default cache) in its own process, and a load generator in a third process: {s['connections']} keep-alive "
        f"connections for {s['duration_s']:g} s, each request at random: decrypt a stored value "
        f"({s['mix']['decrypt_stored']:.0%}), encrypt a new one ({s['mix']['encrypt']:.0%}), or decrypt a value "
        f"encrypted earlier in the run ({s['mix']['decrypt_own']:.0%}); every answer checked. At "
        f"{rot['at_s_into_load']['rotate_start']:.1f} s: a new Transit version (v{rot['to_version']}), the ledger's "
        f"reference moved, and the `rewrap` sweep of every partition through `SqlTableEngine`; at "
        f"{rot['at_s_into_load']['retire_start']:.1f} s: v1 retired through the retirement gate (census, grace 0 s).",
        "",
        "## Headline",
        "",
        "| what | this run |",
        "|---|---|",
        f"| requests | {o['requests']:,} in {o['seconds']:.1f} s = **{o['throughput_rps']:,.0f} req/s** |",
        f"| latency p50 / p90 / p99 / max | {o['p50_ms']} / {o['p90_ms']} / {o['p99_ms']} / {o['max_ms']} ms |",
        f"| errors | **{e['failed_requests']}** failed requests, **{e['failed_decrypts']}** failed decrypts |",
        f"| KMS calls (wrap + unwrap) | **{k['data_path_calls']}** for {k['requests']:,} requests "
        f"({k['calls_per_1000_requests']} per 1,000); by operation: "
        + ", ".join(f"{op} {n}" for op, n in k["calls_by_operation"].items()) + " |",
        f"| data-key cache | {k['cache_hits']:,} hits, {k['cache_misses']} misses (hit ratio {k['cache_hit_ratio']}) |",
        f"| new version used for encryption | {rot['reference_to_first_encrypt_under_new_s']} s after the reference "
        f"moved (poll interval {s['poll_interval_s']:g} s) |",
        f"| rotation | new version {rot['rotate_s']} s; rewrap sweep of {rot['sweep']['partitions']} partitions "
        f"({rot['sweep']['data_keys']} data keys) {rot['sweep_s']} s; retirement {rot['retire_s']} s |",
        f"| sidecar CPU | {res['cpu']['sidecar_s']} s for {o['requests']:,} requests "
        f"({res['cpu']['sidecar_requests_per_cpu_s']} requests per CPU-second); load generator "
        f"{res['cpu']['load_generator_s']} s |",
        "",
        "## By phase",
        "",
        "| phase | requests | seconds | req/s | errors | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in res["by_phase"].items():
        lines.append(f"| {name} | {p['requests']:,} | {p['seconds']:.1f} | {p['throughput_rps']} | {p['errors']} | "
                     f"{p['p50_ms']} | {p['p90_ms']} | {p['p99_ms']} | {p['max_ms']} |")
    lines += ["", "## By operation", "",
              "| operation | requests | errors | p50 ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|---|---|"]
    for name, p in res["by_operation"].items():
        lines.append(f"| {name} | {p['requests']:,} | {p['errors']} | {p['p50_ms']} | {p['p90_ms']} | {p['p99_ms']} "
                     f"| {p['max_ms']} |")
    lines += [
        "",
        "## Notes",
        "",
        "- KMS calls are counted by the sidecar's client (`keyrotation_client_kms_calls_total`), a retried call "
        "once; the `/healthz` probes' `key_state` reads are listed by operation but are not on the data path.",
        "- A miss costs one database read and one KMS call; each partition's data key is unwrapped once per "
        "TTL (300 s), made once per version, and read again after the retirement (the cached entry was read "
        "under v1, so it is dropped and its re-wrapped row read under the new version).",
        "- The load generator is one Python process (asyncio, a minimal HTTP/1.1 keep-alive client) sharing the "
        f"machine with the sidecar, OpenBao and PostgreSQL; it used {res['cpu']['load_generator_s']} CPU-seconds "
        f"against the sidecar's {res['cpu']['sidecar_s']}, so the sidecar (one uvicorn process, a thread pool for "
        "the blocking client) sets the ceiling here.",
        f"- Plaintext in the sidecar's log: {'**yes**' if res['plaintext_in_sidecar_log'] else 'none'} "
        f"({res['log_lines']} lines, level warning). Health after the run: `{res['health_after']['status']}`, "
        f"current v{res['health_after']['current_version']}, minimum v{res['health_after']['min_decryption_version']}.",
        "- Versions: " + ", ".join(f"{n} {v}" for n, v in res["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=["run", "load"], default="run", help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    p.add_argument("--connections", type=int, default=16, help="concurrent connections (default 16)")
    p.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests")
    p.add_argument("--partitions", type=int, default=32, help="partitions of the table (default 32)")
    p.add_argument("--rows", type=int, default=50, help="rows per partition (default 50)")
    p.add_argument("--poll-interval", type=float, default=2.0, help="sidecar's ledger poll interval (default 2 s)")
    p.add_argument("--decrypt-share", type=float, default=0.7)
    p.add_argument("--encrypt-share", type=float, default=0.2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for sidecar_load.json and .md")
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "load":
        return load_main(args)
    if not 0 < args.duration <= 600:
        raise SystemExit("--duration must be within (0, 600] seconds")
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sidecar_load.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "sidecar_load.md").write_text(markdown(res))
    o, k, e = res["overall"], res["kms"], res["errors"]
    print(f"{o['requests']:,} requests in {o['seconds']:.1f} s ({o['throughput_rps']:,.0f} req/s), "
          f"p50 {o['p50_ms']} ms, p99 {o['p99_ms']} ms; {e['failed_requests']} failed, "
          f"{e['failed_decrypts']} failed decrypts; "
          f"{k['data_path_calls']} KMS calls; written to {out}/sidecar_load.md")
    return 1 if e["failed_requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
