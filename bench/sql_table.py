"""The SQL-table path (``keyrotation.sql_engine.SqlTableEngine``) against the machine's PostgreSQL.

Fresh tables (unique names, dropped afterwards with their rows in the data-key table) of R rows in P
day partitions with two encrypted columns (``email``, ``ssn`` of the synthetic customers, field-level
envelopes under one data key per partition), primary key ``id`` and an index on ``(day, id)``, the
index an application table swept by day in keyset batches would have. For each table:

* ``write``: ``SqlTableEngine.write_partition`` (seal every value, ``INSERT ... VALUES`` batches);
* ``rewrap`` after a Transit rotation, ``repeats`` times: wall, CPU, KMS requests (counted under hvac
  as the rest of the suite does), rows/s equivalent, the time split between the census the rewrap reads
  (the partition's data keys in the data-key table, before and after: ``SqlTableEngine.data_key_census``)
  and the rest (KMS, the data-key rows' update, ledger, leases), and a check that not one row of the
  table was written; and the census of the retirement gate (``partition_census``: the data key ids of
  the values from the key-id indexes, and the row count) timed once per table, beside it.

On one of the tables (``reencrypt_rows``):

* ``validate`` before and after: decrypt every value, rows/s;
* ``reencrypt`` (new data keys, every value rewritten): rows/s, MB/s of encrypted-column plaintext,
  per CPU second of this process and per CPU second of this process plus its PostgreSQL backends,
  time per batch, and where the time goes (census, keyset reads, decrypt + seal in Python, the
  compare-and-set UPDATEs, KMS, the rest);
* two pure-PostgreSQL references on the same rows, same batch size, no crypto, so that "bounded by
  the database" can be read off: (1) ``UPDATE ... SET email = email, ssn = ssn`` over keyset batches,
  server-side (the least a rewrite of those rows costs), and (2) the engine's own database round trip
  (its keyset ``SELECT`` and its compare-and-set ``UPDATE ... FROM (VALUES ...)``, the same bytes
  written back unchanged). The engine's rows/s is reported as a share of each.

``VACUUM ANALYZE`` runs before every timed rewrite, so each starts from the same table state.
"""

from __future__ import annotations

import os
import secrets
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench import cipher
from bench.common import KmsCounter, Stopwatch, cpu_seconds
from bench.rewrap import slope

KEY = "bench-sql"
KEY_CLASS = "benchsql"
COLUMNS = ["email", "ssn"]
PG_URL = os.environ.get("KEYROTATION_BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
MB = 1_000_000
APP_NAME = f"keyrotation-bench-{os.getpid()}"


# -- PostgreSQL server CPU of this run's connections ------------------------------------------------

def _pid_cpu(pid: int) -> float | None:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115, PTH123
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerCpu:
    """CPU seconds of the PostgreSQL backends serving this process (``application_name``), from /proc.

    Only when the server runs on this machine and /proc shows its processes; ``None`` otherwise.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._start: dict[int, float] = {}

    def _pids(self) -> list[int]:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.text(
                "SELECT pid FROM pg_stat_activity WHERE application_name = :app"), {"app": APP_NAME})]

    def _now(self) -> dict[int, float]:
        return {pid: cpu for pid in self._pids() if (cpu := _pid_cpu(pid)) is not None}

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> float | None:
        now = self._now()
        if not now:
            return None
        return round(sum(cpu - self._start.get(pid, 0.0) for pid, cpu in now.items()), 3)


# -- tables ----------------------------------------------------------------------------------------

def _autocommit(engine: Any, sql: str) -> None:
    import sqlalchemy as sa

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(sql))


def create_table(engine: Any, rows: int) -> str:
    table = f"bench_sql_r{rows}_{secrets.token_hex(3)}"
    _autocommit(engine, f"CREATE TABLE {table} (id bigint PRIMARY KEY, day date NOT NULL, email bytea, ssn bytea)")
    _autocommit(engine, f"CREATE INDEX {table}_day_id ON {table} (day, id)")
    return table


def drop_tables(engine: Any, tables: list[str]) -> None:
    import sqlalchemy as sa

    from keyrotation.stores.data_keys import DATA_KEYS

    with engine.begin() as conn:
        for table in tables:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
            if sa.inspect(conn).has_table(DATA_KEYS):
                conn.execute(sa.text(f"DELETE FROM {DATA_KEYS} WHERE table_name = :t"), {"t": table})


def vacuum(engine: Any, table: str) -> None:
    _autocommit(engine, f"VACUUM ANALYZE {table}")


def writers(engine: Any, table: str) -> dict[str, int]:
    """Rows per writing transaction (xmin): changes if any row of the table is written."""
    import sqlalchemy as sa

    with engine.connect() as conn:
        return {r[0]: r[1] for r in conn.execute(sa.text(f"SELECT xmin::text, count(*) FROM {table} GROUP BY 1"))}


def data_keys(engine: Any, table: str) -> int:
    import sqlalchemy as sa

    from keyrotation.stores.data_keys import DATA_KEYS

    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {DATA_KEYS} WHERE table_name = :t"),
                                {"t": table}).scalar())


def stored_bytes(engine: Any, table: str) -> dict[str, int]:
    import sqlalchemy as sa

    with engine.connect() as conn:
        row = conn.execute(sa.text(f"SELECT sum(octet_length(email) + octet_length(ssn)), "
                                   f"pg_total_relation_size('{table}') FROM {table}")).one()
    return {"ciphertext_bytes": int(row[0] or 0), "relation_bytes": int(row[1])}


def sql_engine(table: str, db: Any, backend: Any, ledger: Any, batch_size: int) -> Any:
    """A new engine (an empty data-key cache, as in a new task) over ``table``."""
    from keyrotation.config import Dataset
    from keyrotation.ledger import RunContext
    from keyrotation.sql_engine import SqlTableEngine
    from keyrotation.stores.sql_table import SqlTableStore

    dataset = Dataset(name=table, location=PG_URL, format="sql_table", table=table, partition_column="day",
                      encrypted_columns=COLUMNS, batch_size=batch_size)
    return SqlTableEngine(KEY_CLASS, dataset.name, SqlTableStore(db, dataset), backend, ledger,
                          RunContext(actor="bench"))


def frame(partition: str, rows: int, first_id: int) -> Any:
    import numpy as np
    import pandas as pd

    from keyrotation_dev.sample_data import customers

    data = customers(partition, rows)
    return pd.DataFrame({"id": np.arange(first_id, first_id + rows, dtype=np.int64), "day": [partition] * rows,
                         **{c: data.column(c).to_pylist() for c in COLUMNS}})


# -- timing helpers --------------------------------------------------------------------------------

def _wrap_generator(watch: Stopwatch, owner: Any, attribute: str, label: str) -> None:
    """Like ``Stopwatch.wrap``, for a generator method: times each step of the iteration."""
    original = getattr(owner, attribute)

    def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
        it = original(*args, **kwargs)
        while True:
            with watch.time(label):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    timed.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(owner, attribute, timed)


class _Timed:
    """Time the engine's steps while a block runs, then put them back."""

    def __init__(self, backend: Any) -> None:
        self.watch = Stopwatch()
        self.backend = backend

    def __enter__(self) -> Stopwatch:
        from keyrotation.sql_engine import SqlTableEngine
        from keyrotation.stores.data_keys import DataKeyStore
        from keyrotation.stores.sql_table import SqlTableStore

        w = self.watch
        w.wrap(SqlTableEngine, "partition_census", "census")
        w.wrap(SqlTableEngine, "data_key_census", "census")
        w.wrap(SqlTableEngine, "_transform", "transform")
        w.wrap(SqlTableStore, "compare_and_set", "cas")
        _wrap_generator(w, SqlTableStore, "batches", "read")
        w.wrap(DataKeyStore, "rewrap", "data_keys_rewrap")
        w.wrap(self.backend, "wrap", "kms_wrap")
        w.wrap(self.backend, "unwrap", "kms_unwrap")
        w.wrap(self.backend, "rewrap", "kms_rewrap")
        return w

    def __exit__(self, *exc: object) -> None:
        from keyrotation.sql_engine import SqlTableEngine
        from keyrotation.stores.data_keys import DataKeyStore
        from keyrotation.stores.sql_table import SqlTableStore

        for name in ("partition_census", "data_key_census", "_transform"):
            Stopwatch.unwrap(SqlTableEngine, name)
        for name in ("compare_and_set", "batches"):
            Stopwatch.unwrap(SqlTableStore, name)
        Stopwatch.unwrap(DataKeyStore, "rewrap")
        for name in ("wrap", "unwrap", "rewrap"):
            delattr(self.backend, name)  # the instance attribute the wrap set; the class's method shows again


def _run(engine: Any, partitions: list[str], op: Callable[[str], Any], expect: str, what: str) -> list[Any]:
    results = engine.run(partitions, op)
    actions = {r.action for r in results}
    if actions != {expect}:
        raise RuntimeError(f"{what} ended {actions}: {[r.error for r in results if r.error][:3]}")
    return results


# -- the measurements ------------------------------------------------------------------------------

def write(db: Any, backend: Any, ledger: Any, counter: KmsCounter, table: str, rows: int, partitions: list[str],
          batch_size: int, version: int) -> dict:
    per = rows // len(partitions)
    engine = sql_engine(table, db, backend, ledger, batch_size)
    frames = [frame(p, per, i * per) for i, p in enumerate(partitions)]
    plain = sum(len(str(v).encode()) for f in frames for c in COLUMNS for v in f[c])
    server = ServerCpu(db)
    counter.reset()
    server.start()
    cpu0, start = cpu_seconds(), time.perf_counter()
    for p, f in zip(partitions, frames, strict=True):
        engine.write_partition(p, f, version)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    db_cpu = server.stop()
    vacuum(db, table)
    out = {"rows": per * len(partitions), "plaintext_bytes": plain, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
           "db_cpu_s": db_cpu, "rows_per_s": round(per * len(partitions) / wall, 1),
           "plaintext_mb_s": round(plain / MB / wall, 3), "kms": counter.snapshot()}
    out.update(stored_bytes(db, table))
    return out


def rewrap_round(db: Any, backend: Any, ledger: Any, counter: KmsCounter, table: str, partitions: list[str],
                 batch_size: int, target: int, check_rows: bool) -> dict:
    engine = sql_engine(table, db, backend, ledger, batch_size)
    before = writers(db, table) if check_rows else None
    counter.reset()
    with _Timed(backend) as watch:
        cpu0, start = cpu_seconds(), time.perf_counter()
        _run(engine, partitions, lambda p: engine.process(p, target, "rewrap"), "rewrapped", f"{table} rewrap")
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    run = {"to_version": target, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "kms": counter.snapshot(),
           "census_s": round(watch.seconds["census"], 4), "census_calls": watch.calls["census"],
           "data_keys_rewrap_s": round(watch.seconds["data_keys_rewrap"], 4),
           "data_keys_rewrap_calls": watch.calls["data_keys_rewrap"]}
    if check_rows:
        run["table_rows_written"] = sum(n for x, n in writers(db, table).items() if before.get(x) != n)
    return run


def gate_census(db: Any, backend: Any, ledger: Any, table: str, partitions: list[str], batch_size: int) -> dict:
    """The census the planner and the retirement gate read (``partition_census`` of every partition): the data
    key ids of the values (from the key-id indexes, else a scan of every value) and the row count."""
    from keyrotation.census import take_census

    engine = sql_engine(table, db, backend, ledger, batch_size)
    problem = engine.store.ensure_key_id_indexes(KEY_CLASS)
    start = time.perf_counter()
    census = take_census(engine, partitions)
    wall = time.perf_counter() - start
    if census.errors:
        raise RuntimeError(f"{table} census: {census.errors}")
    return {"wall_s": round(wall, 4), "key_id_index": problem is None, "without_index": problem,
            "rows": sum(p.rows or 0 for p in census.partitions.values())}


def reference_update(db: Any, table: str, partitions: list[str], batch_size: int) -> dict:
    """(1) Server-side ``UPDATE ... SET email = email, ssn = ssn`` over keyset batches, one transaction each."""
    import sqlalchemy as sa

    sql = sa.text(f"WITH b AS (SELECT id FROM {table} WHERE day = CAST(:p AS date) AND id > :last ORDER BY id "
                  f"LIMIT :n) UPDATE {table} t SET email = t.email, ssn = t.ssn FROM b WHERE t.id = b.id "
                  "RETURNING t.id")
    vacuum(db, table)
    server = ServerCpu(db)
    server.start()
    rows = batches = 0
    cpu0, start = cpu_seconds(), time.perf_counter()
    for p in partitions:
        last = -1
        while True:
            with db.begin() as conn:
                ids = [r[0] for r in conn.execute(sql, {"p": p, "last": last, "n": batch_size})]
            if not ids:
                break
            rows, batches, last = rows + len(ids), batches + 1, max(ids)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    return {"rows": rows, "batches": batches, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "db_cpu_s": server.stop(), "rows_per_s": round(rows / wall, 1),
            "seconds_per_batch": round(wall / max(batches, 1), 5)}


def reference_round_trip(db: Any, backend: Any, ledger: Any, table: str, partitions: list[str],
                         batch_size: int) -> dict:
    """(2) The engine's database round trip without crypto: its keyset reads and its compare-and-set
    UPDATE, writing every value back as it was read (the same bytes)."""
    engine = sql_engine(table, db, backend, ledger, batch_size)
    vacuum(db, table)
    server = ServerCpu(db)
    watch = Stopwatch()
    server.start()
    rows = batches = 0
    cpu0, start = cpu_seconds(), time.perf_counter()
    for p in partitions:
        it = engine.store.batches(p)
        while True:
            with watch.time("read"):
                batch = next(it, None)
            if batch is None:
                break
            with watch.time("copy"):
                updates = [(pk, *(olds := [None if v is None else bytes(v) for v in values]), *olds)
                           for pk, *values in batch.itertuples(index=False, name=None)]
            with watch.time("cas"):
                lost = engine.store.compare_and_set(updates)
            if lost:
                raise RuntimeError(f"{table}: the reference round trip lost {len(lost)} rows")
            rows, batches = rows + len(updates), batches + 1
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    return {"rows": rows, "batches": batches, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "db_cpu_s": server.stop(), "rows_per_s": round(rows / wall, 1),
            "seconds_per_batch": round(wall / max(batches, 1), 5),
            "read_s": round(watch.seconds["read"], 3), "cas_s": round(watch.seconds["cas"], 3),
            "copy_s": round(watch.seconds["copy"], 3)}


def validate(db: Any, backend: Any, ledger: Any, counter: KmsCounter, table: str, partitions: list[str],
             batch_size: int, plain: int, min_version: int | None = None) -> dict:
    engine = sql_engine(table, db, backend, ledger, batch_size)
    counter.reset()
    cpu0, start = cpu_seconds(), time.perf_counter()
    results = _run(engine, partitions, lambda p: engine.validate(p, min_version), "validated", f"{table} validate")
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    rows = sum(r.rows for r in results)
    return {"rows": rows, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "rows_per_s": round(rows / wall, 1),
            "plaintext_mb_s": round(plain / MB / wall, 3), "kms": counter.snapshot(),
            "digests": {r.partition: r.digest for r in results}}


def reencrypt(db: Any, backend: Any, ledger: Any, counter: KmsCounter, table: str, partitions: list[str],
              batch_size: int, plain: int) -> dict:
    target = backend.rotate()
    engine = sql_engine(table, db, backend, ledger, batch_size)
    vacuum(db, table)
    server = ServerCpu(db)
    counter.reset()
    with _Timed(backend) as w:
        server.start()
        cpu0, start = cpu_seconds(), time.perf_counter()
        results = _run(engine, partitions, lambda p: engine.process(p, target, "reencrypt"), "reencrypted",
                       f"{table} reencrypt")
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
        db_cpu = server.stop()
    rows = sum(r.rows for r in results)
    s = w.seconds
    batches = w.calls["cas"]
    stages = {
        "census (key ids from the key-id index, row count: before, after)": s["census"],
        "keyset reads (SELECT ... LIMIT batch)": s["read"],
        "decrypt + seal every value (Python, AES-GCM)": s["transform"] - s["kms_unwrap"],
        "compare-and-set UPDATE ... FROM (VALUES ...)": s["cas"],
        "KMS (wrap the new data key, unwrap the old)": s["kms_wrap"] + s["kms_unwrap"],
    }
    stages["other (data-key rows, ledger, leases)"] = wall - sum(stages.values())
    database = s["census"] + s["read"] + s["cas"]
    out = {"rows": rows, "partitions": len(partitions), "batch_size": batch_size, "batches": batches,
           "to_version": target, "plaintext_bytes": plain, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
           "db_cpu_s": db_cpu, "rows_per_s": round(rows / wall, 1), "rows_per_cpu_s": round(rows / cpu, 1),
           "plaintext_mb_s": round(plain / MB / wall, 3), "plaintext_mb_per_cpu_s": round(plain / MB / cpu, 3),
           "seconds_per_batch": round(wall / max(batches, 1), 5),
           "per_batch_s": {"read": round(s["read"] / max(batches, 1), 5),
                           "transform": round((s["transform"] - s["kms_unwrap"]) / max(batches, 1), 5),
                           "cas": round(s["cas"] / max(batches, 1), 5)},
           "stages_s": {k: round(v, 3) for k, v in stages.items()}, "database_s": round(database, 3),
           "database_share": round(database / wall, 4), "kms": counter.snapshot()}
    if db_cpu is not None:
        out["plaintext_mb_per_core_s_with_db"] = round(plain / MB / (cpu + db_cpu), 3)
        out["rows_per_core_s_with_db"] = round(rows / (cpu + db_cpu), 1)
    return out


def unavailable() -> str | None:
    """Why PostgreSQL cannot be reached at ``PG_URL``, or ``None`` when it can."""
    import sqlalchemy as sa

    db = sa.create_engine(PG_URL, hide_parameters=True)
    try:
        with db.connect():
            return None
    except sa.exc.OperationalError as exc:
        return f"PostgreSQL at {db.url.render_as_string(hide_password=True)} cannot be reached: {exc.orig}".strip()
    finally:
        db.dispose()


def measure(backend: Any, ledger: Any, counter: KmsCounter, cfg: dict) -> dict:
    """Everything above, for ``cfg``: rows (list), partitions, reencrypt_rows (one of rows), batch_size,
    repeats (of the rewrap), cipher_values (values for the local cipher limit)."""
    import sqlalchemy as sa

    from keyrotation_dev.sample_data import daily_partitions

    partitions = daily_partitions(cfg["partitions"], start="2025-01-01")
    db = sa.create_engine(PG_URL, hide_parameters=True, connect_args={"application_name": APP_NAME})
    tables: dict[int, str] = {}
    version = backend.key_state().latest_version
    res: dict = {"pg_url": db.url.render_as_string(hide_password=True), "columns": COLUMNS,
                 "partitions": cfg["partitions"], "batch_size": cfg["batch_size"], "repeats": cfg["repeats"],
                 "reencrypt_rows": cfg["reencrypt_rows"], "tables": []}
    try:
        with db.connect() as conn:
            res["server_version"] = conn.execute(sa.text("SHOW server_version")).scalar()
            res["server_settings"] = {k: conn.execute(sa.text(f"SHOW {k}")).scalar()
                                      for k in ("shared_buffers", "synchronous_commit", "fsync")}
        for rows in cfg["rows"]:
            tables[rows] = create_table(db, rows)
            w = write(db, backend, ledger, counter, tables[rows], rows, partitions, cfg["batch_size"], version)
            res["tables"].append({"rows": w["rows"], "table": tables[rows], "write": w, "rewrap_runs": []})
        for i in range(cfg["repeats"]):
            target = backend.rotate()
            for t in res["tables"]:
                t["rewrap_runs"].append(rewrap_round(db, backend, ledger, counter, t["table"], partitions,
                                                     cfg["batch_size"], target, check_rows=i == 0))
        for t in res["tables"]:
            runs = t["rewrap_runs"]
            walls = [r["wall_s"] for r in runs]
            median = statistics.median(walls)
            t["rewrap"] = {
                "wall_s": round(median, 4), "wall_s_min": min(walls), "wall_s_max": max(walls),
                "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 4),
                "census_s": round(statistics.median(r["census_s"] for r in runs), 4),
                "data_keys_rewrap_s": round(statistics.median(r["data_keys_rewrap_s"] for r in runs), 4),
                "kms_requests": runs[-1]["kms"]["total"],
                "kms_rewrap_requests": runs[-1]["kms"]["by_operation"].get("rewrap", 0),
                "kms_seconds": runs[-1]["kms"]["seconds"], "data_keys": data_keys(db, t["table"]),
                "partitions_rewrapped": runs[-1]["data_keys_rewrap_calls"],
                "table_rows_written": runs[0]["table_rows_written"],
                "rows_per_s": round(t["rows"] / median, 1), "seconds_per_partition": round(median / len(partitions), 5),
            }
            t["rewrap"]["rest_s"] = round(median - t["rewrap"]["census_s"], 4)
            t["census"] = gate_census(db, backend, ledger, t["table"], partitions, cfg["batch_size"])
        pts = sorted(res["tables"], key=lambda t: t["rows"])
        res["rewrap_slope"] = slope([t["rows"] for t in pts], [t["rewrap"]["wall_s"] for t in pts])
        res["rewrap_slope_without_census"] = slope([t["rows"] for t in pts], [t["rewrap"]["rest_s"] for t in pts])
        res["census_slope"] = slope([t["rows"] for t in pts], [t["census"]["wall_s"] for t in pts])
        res["rewrap_wall_ratio"] = round(pts[-1]["rewrap"]["wall_s"] / pts[0]["rewrap"]["wall_s"], 3)
        res["rewrap_rows_ratio"] = round(pts[-1]["rows"] / pts[0]["rows"], 3)

        target = next(t for t in res["tables"] if t["rows"] == cfg["reencrypt_rows"])
        table, plain = target["table"], target["write"]["plaintext_bytes"]
        before = validate(db, backend, ledger, counter, table, partitions, cfg["batch_size"], plain)
        res["reference_update"] = reference_update(db, table, partitions, cfg["batch_size"])
        res["reference_round_trip"] = reference_round_trip(db, backend, ledger, table, partitions, cfg["batch_size"])
        res["reencrypt"] = reencrypt(db, backend, ledger, counter, table, partitions, cfg["batch_size"], plain)
        vacuum(db, table)
        after = validate(db, backend, ledger, counter, table, partitions, cfg["batch_size"], plain,
                         min_version=res["reencrypt"]["to_version"])
        if after["digests"] != before["digests"]:
            raise RuntimeError(f"{table}: the plaintext changed in the re-encryption")
        res["reencrypt"]["plaintext_unchanged"] = True
        res["validate"] = {k: v for k, v in before.items() if k != "digests"}
        res["validate_after"] = {k: v for k, v in after.items() if k != "digests"}
        r = res["reencrypt"]
        r["share_of_reference_update"] = round(r["rows_per_s"] / res["reference_update"]["rows_per_s"], 4)
        r["share_of_reference_round_trip"] = round(r["rows_per_s"] / res["reference_round_trip"]["rows_per_s"], 4)
        r.update(stored_bytes(db, table))
        # The local cipher limit on this table's own values: AES-256-GCM per value, re-encryption (decrypt,
        # then encrypt under a new key) of each, in a loop without the database or the envelope's header.
        sample = frame(partitions[0], target["rows"] // len(partitions), 0)
        values = [str(v).encode() for row in zip(*(sample[c] for c in COLUMNS), strict=True) for v in row]
        res["local_cipher"] = cipher.per_value(values[:cfg["cipher_values"]])
        res["local_cipher"]["reencrypt_rows_per_s"] = round(res["local_cipher"]["reencrypt_values_per_s"]
                                                           / len(COLUMNS), 1)
    finally:
        drop_tables(db, list(tables.values()))
        db.dispose()
    return res
