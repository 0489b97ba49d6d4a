"""Airflow's share of a re-encryption sweep: the real ``reencrypt__customers`` DAG, run by ``dag.test()``.

``python -m bench.airflow_sweep SPEC_JSON``, in a process of its own (Airflow reads its configuration
at import). Set up as ``scripts/demo.py`` does: AIRFLOW_HOME and a SQLite metadata DB under the work
folder, DAGs folder = the repo's ``dags/``, KEYROTATION_CONFIG_DIR with the shipped key classes (the
dataset under the work folder, ``chunk_size`` set per run, ``null``: the default configuration, chunks sized
by estimated work), an OpenBao dev server, and
``AIRFLOW_CONN_VAULT_KEYROTATION``. The metadata DB is migrated in this process (what ``airflow db
migrate`` runs).

For each chunk size: rotate the key, make the new version the reference, then time one sweep
(plan -> reencrypt[chunk] x N -> validate[chunk] x N -> census_after) over ``partitions`` tiny
partitions in ``rewrap`` mode, so the engine's part is small and Airflow's shows. Engine time is
measured three ways: the per-partition durations the engine
records in the ledger; the wall time of every engine call the tasks make (process, validate, census),
timed from inside; and the same calls made directly, without Airflow, on the same partitions.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, KmsCounter, Stopwatch, cpu_seconds, setup_path  # noqa: E402

setup_path()
warnings.filterwarnings("ignore", category=DeprecationWarning)

DATASET = "customers"
KEY_CLASS = "customer_pii"


def configure(work: Path) -> Path:
    """Environment for Airflow and keyrotation, before Airflow is imported; returns the config folder."""
    import yaml

    config_dir = work / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    for src in sorted((ROOT / "include" / "config" / "key_classes").glob("*.yaml")):
        (config_dir / src.name).write_text(src.read_text())
    os.environ.update({
        "AIRFLOW_HOME": str(work / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{work / 'airflow' / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "KEYROTATION_HOME": str(work / "home"),
        "KEYROTATION_CONFIG_DIR": str(config_dir),
    })
    os.environ.pop("KEYROTATION_LEDGER_URL", None)
    (work / "airflow").mkdir(parents=True, exist_ok=True)
    assert yaml  # imported here so a missing PyYAML fails before the server starts
    return config_dir


def set_chunk_size(config_dir: Path, chunk_size: int | None, mode: str) -> None:
    """The shipped key class in ``mode``, with ``chunk_size`` partitions per mapped task; None: the default
    configuration (chunks sized by estimated work, ``reencryption.chunk_target``)."""
    import yaml

    path = config_dir / f"{KEY_CLASS}.yaml"
    doc = yaml.safe_load((ROOT / "include" / "config" / "key_classes" / path.name).read_text())
    shipped = {k: v for k, v in (doc["key_class"].get("reencryption") or {}).items() if k != "chunk_size"}
    doc["key_class"]["reencryption"] = {**shipped, "mode": mode} | (
        {"chunk_size": chunk_size} if chunk_size is not None else {})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def sweep(spec: dict) -> dict:
    work = Path(spec["work"])
    config_dir = configure(work)
    set_chunk_size(config_dir, spec["chunk_sizes"][0], spec["mode"])

    from keyrotation_dev.devserver import OpenBaoDevServer

    with OpenBaoDevServer(log_path=str(work / "openbao.log")) as bao:
        os.environ["AIRFLOW_CONN_VAULT_KEYROTATION"] = bao.airflow_connection_uri()
        started = time.perf_counter()
        from airflow.utils import db  # what `airflow db migrate` runs, without a second Airflow start-up

        db.upgradedb()
        migrate_s = time.perf_counter() - started
        return _measure(spec, config_dir, bao, migrate_s)


def _task_instances(run_id: str) -> dict[str, int]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.settings import Session

    session = Session()
    try:
        tis = session.query(TaskInstance).filter_by(run_id=run_id).all()
        counts: dict[str, int] = {}
        for ti in tis:
            counts[ti.task_id] = counts.get(ti.task_id, 0) + 1
        states = {str(getattr(ti.state, "value", ti.state)) for ti in tis}
        counts["_states"] = sorted(states)  # type: ignore[assignment]
        return counts
    finally:
        session.close()


def _measure(spec: dict, config_dir: Path, bao, migrate_s: float) -> dict:  # noqa: ANN001
    from airflow.dag_processing import dagbag as dagbag_module
    from airflow.dag_processing.dagbag import DagBag

    from keyrotation import ledger as lg
    from keyrotation.backends.registry import open_backend
    from keyrotation.config import load_key_class
    from keyrotation.ledger import Ledger, RunContext
    from keyrotation.parquet_engine import ParquetEngine
    from keyrotation.rotation import update_reference
    from keyrotation.runtime import KeyClassRuntime
    from keyrotation_airflow.operators import base as operators_base
    from keyrotation_dev.sample_data import customers, daily_partitions

    started = time.perf_counter()
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    dag = bag.get_dag(f"reencrypt__{DATASET}")
    parse_s = time.perf_counter() - started

    config = load_key_class(KEY_CLASS)
    backend = open_backend(config.key_class, bao.client())
    ledger = Ledger()
    rt = KeyClassRuntime(config, backend, ledger)
    state = backend.key_state()
    version = (state if state.exists else backend.create_key()).latest_version
    update_reference(rt.name, version, ledger, RunContext(actor="bench"))
    partitions = daily_partitions(spec["partitions"])
    started = time.perf_counter()
    writer = rt.engine(DATASET, RunContext(actor="bench"))
    for partition in partitions:
        writer.write_partition(partition, customers(partition, spec["rows_per_partition"]), version)
    seed_s = time.perf_counter() - started

    watch = Stopwatch()
    kms = KmsCounter().install()
    # Engine calls, timed from inside the tasks (dag.test runs them in this process).
    # The mapped task's chunk (process_many: process one by one, or a rewrap in batches).
    watch.wrap(ParquetEngine, "process_many", "engine.process_many")
    watch.wrap(ParquetEngine, "validate", "engine.validate")
    watch.wrap(KeyClassRuntime, "census", "census")
    # The package's Airflow glue (config load + KMS connection through the Airflow connection) and
    # dag.test()'s own re-parse of the DAG folder on every call: both outside the engine.
    watch.wrap(operators_base, "key_class_runtime", "key_class_runtime (connection lookup)")
    watch.wrap(dagbag_module, "sync_bag_to_db", "dag.test: parse + sync DAG folder")

    warmup_s = None
    if spec.get("warmup"):
        # One dry run first (plan and census only), so that one-off imports and caches of the first
        # dag.test() call are not charged to the first chunk size measured.
        started = time.perf_counter()
        dag.test(run_conf={"scope": "sweep", "mode": spec["mode"], "dry_run": True, "partition_from": None,
                           "partition_to": None})
        warmup_s = time.perf_counter() - started

    runs = []
    for chunk_size in spec["chunk_sizes"]:
        set_chunk_size(config_dir, chunk_size, spec["mode"])
        version = backend.rotate()
        update_reference(rt.name, version, ledger, RunContext(actor="bench"))
        watch.clear()
        kms.reset()
        load = round(os.getloadavg()[0], 2)
        started, cpu0 = time.perf_counter(), cpu_seconds()
        dag_run = dag.test(run_conf={"scope": "sweep", "mode": spec["mode"], "dry_run": False,
                                     "partition_from": None, "partition_to": None})
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu0
        inside = {k: round(v, 4) for k, v in watch.seconds.items()}
        calls = dict(watch.calls)
        engine_keys = ("engine.process_many", "engine.validate", "census")
        engine_inside = sum(watch.seconds[k] for k in engine_keys)
        engine_cpu = sum(watch.cpu[k] for k in engine_keys)
        kms_requests = kms.snapshot()
        state_name = str(getattr(dag_run.state, "value", dag_run.state))
        census = rt.census(DATASET)
        rows = [r for r in ledger.rows(dataset=DATASET, events_in=(lg.PARTITION_REWRAPPED, lg.PARTITION_REENCRYPTED,
                                                                       lg.PARTITION_VALIDATED))
                if r["run_id"] == dag_run.run_id]
        ledger_s = sum(r["duration_s"] or 0.0 for r in rows)
        tis = _task_instances(dag_run.run_id)
        task_count = sum(v for k, v in tis.items() if not k.startswith("_"))
        runs.append({
            "chunk_size": chunk_size, "load_1min": load, "state": state_name, "wall_s": round(wall, 3),
            "task_instances": task_count, "task_instances_by_task": {k: v for k, v in tis.items()
                                                                     if not k.startswith("_")},
            "task_states": tis["_states"],
            "mapped_chunks": tis.get("reencrypt", 0),
            "ledger_rows": len(rows), "engine_ledger_s": round(ledger_s, 3),
            "engine_inside_s": round(engine_inside, 3), "timed_inside": inside,
            "calls": calls,
            "overhead_share_ledger": round(1 - ledger_s / wall, 4),
            "overhead_share_inside": round(1 - engine_inside / wall, 4),
            # Load-robust cross-check: CPU time of this process during the run against the CPU time of the
            # engine calls (thread time): waiting for a busy machine counts in neither.
            "cpu_s": round(cpu, 3), "engine_cpu_s": round(engine_cpu, 3),
            "overhead_share_cpu": round(1 - engine_cpu / cpu, 4) if cpu > 0 else None,
            "overhead_per_task_s": round((wall - engine_inside) / max(task_count, 1), 4),
            "kms_requests": kms_requests,
            "all_partitions_under_target": census.by_version() == {version: len(partitions)},
        })

    # The same engine work without Airflow: census (plan), process_many, validate, census (summary).
    for name in ("process_many", "validate"):
        Stopwatch.unwrap(ParquetEngine, name)
    Stopwatch.unwrap(KeyClassRuntime, "census")
    if not spec.get("direct", True):
        kms.uninstall()
        return {"partitions": len(partitions), "rows_per_partition": spec["rows_per_partition"], "mode": spec["mode"],
                "migrate_s": round(migrate_s, 2), "dagbag_parse_s": round(parse_s, 2), "seed_s": round(seed_s, 2),
                "warmup_dry_run_s": round(warmup_s, 2) if warmup_s is not None else None,
                "direct_engine_s": None, "direct_ok": None,
                "runs": [{**r, "overhead_share_direct": None} for r in runs]}
    version = backend.rotate()
    update_reference(rt.name, version, ledger, RunContext(actor="bench"))
    started = time.perf_counter()
    rt.census(DATASET)
    engine = rt.engine(DATASET, RunContext(actor="bench-direct"))
    processed = engine.process_many(partitions, version, spec["mode"])
    validated = engine.run(partitions, lambda p: engine.validate(p, min_version=version))
    rt.census(DATASET)
    direct_s = time.perf_counter() - started
    ok = all(r.action == "rewrapped" or r.action == "reencrypted" for r in processed) and all(
        r.action == "validated" for r in validated)
    kms.uninstall()
    for run in runs:
        run["overhead_share_direct"] = round(1 - direct_s / run["wall_s"], 4)
    return {"partitions": len(partitions), "rows_per_partition": spec["rows_per_partition"], "mode": spec["mode"],
            "migrate_s": round(migrate_s, 2), "dagbag_parse_s": round(parse_s, 2), "seed_s": round(seed_s, 2),
            "warmup_dry_run_s": round(warmup_s, 2) if warmup_s is not None else None,
            "direct_engine_s": round(direct_s, 3), "direct_ok": ok, "runs": runs}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    result = sweep(spec)
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
