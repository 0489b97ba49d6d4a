"""`airflow backfill create` over a date range, run by a real scheduler and API server.

The way an operator backfills: the scheduler (LocalExecutor) runs the backfill's DAG runs, whose
tasks talk to the API server's Execution API, against the real OpenBao. Each run's partition is its
data interval; exactly the partitions in the range must be re-encrypted.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONN_ID, DAG_STUB, KEY_CLASS_YAML

from helpers import days, runtime, seed
from keyrotation import ledger as lg
from keyrotation.devserver import free_port
from keyrotation.ledger import RunContext
from keyrotation.rotation import update_reference

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW = str(Path(sys.executable).parent / "airflow")
pytestmark = [pytest.mark.airflow, pytest.mark.slow]


def _runs(db: Path, dag_id: str) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT run_type, state, logical_date FROM dag_run WHERE dag_id = ? ORDER BY logical_date", (dag_id,)
        ).fetchall()


def test_backfill_reencrypts_exactly_the_partitions_of_its_range(tmp_path, openbao, vault):
    home, dags, config = tmp_path / "airflow", tmp_path / "dags", tmp_path / "config"
    for d in (home, dags, config):
        d.mkdir()
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    text = KEY_CLASS_YAML.format(name="bf", key_ref=f"bf-{os.getpid()}-{time.time_ns()}", conn_id=CONN_ID,
                                 mode="rewrap", chunk_size=4, grace="0s", dataset="bf_customers",
                                 location=tmp_path / "data")
    (config / "bf.yaml").write_text(text)
    (dags / "bf.py").write_text(DAG_STUB.format(name="bf"))
    port = free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(16).hex(),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "KEYROTATION_CONFIG_DIR": str(config),
        "KEYROTATION_LEDGER_URL": ledger_url,
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("include", "plugins", "dags")),
    }
    from keyrotation.config import load_key_class_file

    rt = runtime(load_key_class_file(config / "bf.yaml"), vault, ledger_url)
    parts = days("2024-01-01", 7)
    seed(rt, "bf_customers", parts)
    v2 = rt.backend.rotate()
    update_reference("bf", v2, rt.ledger, RunContext(actor="test"))

    def cli(*args: str) -> str:
        done = subprocess.run([AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"airflow {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    cli("db", "migrate")
    cli("dags", "reserialize")
    cli("dags", "unpause", "reencrypt__bf_customers")
    # Created before the scheduler starts: SQLite takes one writer at a time.
    cli("backfill", "create", "--dag-id", "reencrypt__bf_customers", "--from-date", "2024-01-03",
        "--to-date", "2024-01-05", "--max-active-runs", "1")
    logs = []
    procs = []
    try:
        for name, args in (("api-server", ["api-server", "--port", str(port)]), ("scheduler", ["scheduler"])):
            log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen([AIRFLOW, *args], env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 300
        while True:
            runs = [r for r in _runs(home / "airflow.db", "reencrypt__bf_customers") if r[0] == "backfill"]
            if len(runs) == 3 and all(state in ("success", "failed") for _, state, _ in runs):
                break
            if time.monotonic() > deadline:
                tail = (tmp_path / "scheduler.log").read_text()[-3000:]
                pytest.fail(f"backfill not finished after 300s: {runs}\nscheduler log tail:\n{tail}")
            time.sleep(2)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()

    assert [state for _, state, _ in runs] == ["success"] * 3, runs
    census = rt.census("bf_customers")
    assert census.under(v2) == ["2024-01-01", "2024-01-02", "2024-01-06", "2024-01-07"]
    rewrapped = rt.ledger.rows(events_in=(lg.PARTITION_REWRAPPED,))
    assert sorted(r["partition"] for r in rewrapped) == ["2024-01-03", "2024-01-04", "2024-01-05"]
    assert {r["dag_id"] for r in rewrapped} == {"reencrypt__bf_customers"}
    assert all(r["run_id"].startswith("backfill__") for r in rewrapped)
