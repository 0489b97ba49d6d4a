"""Scale-out, natively: the docker-compose topology (API server, scheduler, DAG processor, triggerer,
CeleryExecutor on Redis, PostgreSQL metadata DB, two Celery workers on "hosts" of their own,
connections from the Vault secrets backend over OpenBao's KV engine) runs a re-encryption sweep.

Proven, from the REST API and the ledger: both workers take partitions; a worker killed mid-run
(SIGKILL of all its process groups) loses nothing, its tasks are retried on the other; every
partition is re-wrapped exactly once and decrypts to the digest it had before; the census equals
that of a single-machine run over a copy of the data; and a key class whose KMS pool has one slot
never has two KMS tasks running at once, while the key class without a pool runs them side by side.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from helpers import CONN_ID, KEY_CLASS_YAML, days, partition_digests, runtime, seed
from keyrotation import ledger as lg
from keyrotation.config import load_key_class_file
from keyrotation.ledger import RunContext
from keyrotation.rotation import update_reference

SWEEP = "so_customers"  # key class "scaleout" (no pool): 60 partitions in chunks of 6, 10 + 10 mapped tasks
POOLED = "pl_orders"  # key class "pooled", its pool has 1 slot: 6 partitions in chunks of 2, 3 + 3 mapped tasks
PARTITIONS, CHUNK = 60, 6
KMS_TASKS = {"plan", "reencrypt", "validate", "census_after"}  # the re-encryption DAG's tasks that call the KMS

# The factory's retry delay is 1 minute; this test's DAG file shortens it so the run after the kill
# fits the test's time budget. Everything else is the factory's wiring, unchanged.
DAG_FILE = """\
\"\"\"Airflow DAGs of test key class {name}.\"\"\"
from datetime import timedelta

from keyrotation_factory import key_class_dags

dags = key_class_dags("{name}")
for dag in dags.values():
    for task in dag.tasks:
        task.retry_delay = timedelta(seconds=5)
globals().update(dags)
"""


def test_every_task_that_calls_the_kms_is_in_the_key_class_pool(tmp_path, monkeypatch):
    """The pool wiring, without a running Airflow: KMS tasks in the pool, the ledger-only task and the
    approval not; without ``kms_pool`` every task stays in the default pool."""
    from keyrotation_factory import key_class_dags

    text = KEY_CLASS_YAML.format(name="poolwiring", key_ref="k", conn_id=CONN_ID, mode="rewrap", chunk_size=4,
                                 grace="0s", dataset="pw_data", location=tmp_path / "data")
    (tmp_path / "poolwiring.yaml").write_text(
        text.replace("approval_required: false", "approval_required: true")
        .replace("  conn_id:", "  kms_pool: kms_quota\n  conn_id:"))
    (tmp_path / "nopool.yaml").write_text(text.replace("poolwiring", "nopool").replace("pw_data", "np_data"))
    monkeypatch.setenv("KEYROTATION_CONFIG_DIR", str(tmp_path))
    pools = {f"{dag_id}.{task.task_id}": task.pool
             for dag_id, dag in key_class_dags("poolwiring").items() for task in dag.tasks}
    assert pools == {
        "rotate__poolwiring.rotate_key": "kms_quota",
        "rotate__poolwiring.wait_version_ready": "kms_quota",
        "rotate__poolwiring.update_reference": "default_pool",  # ledger only
        "reencrypt__pw_data.plan": "kms_quota",
        "reencrypt__pw_data.reencrypt": "kms_quota",
        "reencrypt__pw_data.validate": "kms_quota",
        "reencrypt__pw_data.census_after": "kms_quota",
        "retire__poolwiring.census_gate": "kms_quota",
        "retire__poolwiring.wait_grace_period": "kms_quota",  # reads the key; deferred, it holds no slot
        "retire__poolwiring.approve": "default_pool",  # a person answers
        "retire__poolwiring.retire_versions": "kms_quota",
    }
    assert {task.pool for dag in key_class_dags("nopool").values() for task in dag.tasks} == {"default_pool"}


# -- the live topology -----------------------------------------------------------------------------

def _key_class(config_dir: Path, name: str, dataset: str, base: Path, chunk_size: int,
               pool: str | None = None) -> Path:
    text = KEY_CLASS_YAML.format(name=name, key_ref=f"{name}-{secrets.token_hex(4)}", conn_id=CONN_ID,
                                 mode="rewrap", chunk_size=chunk_size, grace="0s", dataset=dataset,
                                 location=base / "data" / dataset)
    if pool:
        text = text.replace("  conn_id:", f"  kms_pool: {pool}\n  conn_id:")
    text += "    schedule: null\n"  # runs only when triggered: no scheduled run appears on unpausing
    path = config_dir / f"{name}.yaml"
    path.write_text(text)
    return path


def _secrets_backend(openbao, base: Path) -> dict[str, str]:
    """A kv-v2 mount on the OpenBao server holding the KMS connection, and a token that may only read
    it: the VaultBackend settings every Airflow component gets (as in docker-compose.yaml)."""
    vault = openbao.client()
    mount = f"airflow-{secrets.token_hex(3)}"
    vault.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    vault.secrets.kv.v2.create_or_update_secret(path=f"connections/{CONN_ID}", mount_point=mount,
                                                secret=json.loads(openbao.airflow_connection_uri()))
    vault.sys.create_or_update_policy(name=f"{mount}-reader", policy=(
        f'path "{mount}/data/connections/*" {{\n  capabilities = ["read"]\n}}\n'))
    token = vault.auth.token.create(policies=[f"{mount}-reader"], ttl="2h")["auth"]["client_token"]
    token_file = base / "openbao-airflow-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    return {
        "AIRFLOW__SECRETS__BACKEND": "airflow.providers.hashicorp.secrets.vault.VaultBackend",
        "AIRFLOW__SECRETS__BACKEND_KWARGS": json.dumps({
            "connections_path": "connections", "variables_path": None, "config_path": None,
            "mount_point": mount, "url": openbao.url, "auth_type": "token", "token_path": str(token_file),
            "kv_engine_version": 2}),
    }


def _interval(ti: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"])


def _max_concurrent(intervals: list[tuple[datetime, datetime]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.slow
@pytest.mark.airflow
@pytest.mark.timeout(420)
def test_sweep_scales_out_over_two_celery_workers_survives_a_killed_worker_and_keeps_the_kms_pool(
        tmp_path, openbao):
    from celery_airflow import CeleryAirflow, redis_broker
    from live_airflow import postgres_databases

    started = time.monotonic()
    dags, config_dir = tmp_path / "dags", tmp_path / "config"
    dags.mkdir()
    config_dir.mkdir()
    pool = f"kms_{secrets.token_hex(3)}"
    sweep_file = _key_class(config_dir, "scaleout", SWEEP, tmp_path, chunk_size=CHUNK)
    pooled_file = _key_class(config_dir, "pooled", POOLED, tmp_path, chunk_size=2, pool=pool)
    for name in ("scaleout", "pooled"):
        (dags / f"{name}.py").write_text(DAG_FILE.format(name=name))

    with postgres_databases("keyrotation_scaleout", "", "_ledger") as (airflow_db, ledger_url), \
            redis_broker() as broker:
        airflow = CeleryAirflow(tmp_path, dags, {
            "KEYROTATION_CONFIG_DIR": str(config_dir),
            "KEYROTATION_LEDGER_URL": ledger_url,
            **_secrets_backend(openbao, tmp_path),
        }, database_url=airflow_db, broker_url=broker)
        # No connection in the environment: the KMS connection comes from the secrets backend only.
        airflow.env = {k: v for k, v in airflow.env.items() if not k.startswith("AIRFLOW_CONN_")}
        try:
            # Airflow migrates its database and starts while this process writes the data.
            with ThreadPoolExecutor(1) as background:
                starting = background.submit(airflow.start, 180)
                try:
                    # Seed: 60 partitions under v1, rotate to v2 and make it the reference (what rotate__ does).
                    vault = openbao.client()
                    rt = runtime(load_key_class_file(sweep_file), vault, ledger_url)
                    partitions = days("2024-01-01", PARTITIONS)
                    seed(rt, SWEEP, partitions)
                    before = partition_digests(rt, SWEEP, partitions)
                    target = rt.backend.rotate()
                    update_reference("scaleout", target, rt.ledger, RunContext(actor="test"))
                    pooled_rt = runtime(load_key_class_file(pooled_file), vault, ledger_url)
                    seed(pooled_rt, POOLED, days("2024-01-01", 6))
                    update_reference("pooled", pooled_rt.backend.rotate(), pooled_rt.ledger, RunContext(actor="test"))
                    # The single-machine reference: the same sweep, in this process, over a copy of the data.
                    # (its own folder, config and ledger: the same key class, the data copied before the sweep).
                    single_dir = tmp_path / "single"
                    shutil.copytree(tmp_path / "data" / SWEEP, single_dir / "data" / SWEEP)
                    (single_dir / "scaleout.yaml").write_text(sweep_file.read_text().replace(str(tmp_path / "data"),
                                                                                             str(single_dir / "data")))
                    single_rt = runtime(load_key_class_file(single_dir / "scaleout.yaml"), vault,
                                        f"sqlite:///{single_dir / 'ledger.db'}")
                    # It runs now, before Airflow can: once the Airflow sweep ends, retire__scaleout (grace 0 s,
                    # no approval, unpaused like the factory makes it) may retire v1, which this copy still needs.
                    single = single_rt.engine(SWEEP)
                    single.run(partitions, lambda p: single.process(p, target, "rewrap"))
                    single_census = single_rt.census(SWEEP).summary()
                    single_digests = partition_digests(single_rt, SWEEP, partitions)
                finally:
                    starting.result()
            seeded = time.monotonic()
            airflow.start_worker("worker-a")
            airflow.start_worker("worker-b")
            airflow.wait_workers_ready()
            ready = time.monotonic()
            with airflow.client() as client:
                resp = client.post("/api/v2/pools", json={"name": pool, "slots": 1,
                                                          "description": "KMS quota of key class pooled"})
                assert resp.status_code == 201, resp.text
                runs = {}
                for dag_id in (f"reencrypt__{SWEEP}", f"reencrypt__{POOLED}"):
                    airflow.wait(lambda d=dag_id: client.get(f"/api/v2/dags/{d}").status_code == 200,
                                 f"{dag_id} parsed")
                    assert client.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).status_code == 200
                    runs[dag_id] = airflow.trigger(client, dag_id, {"scope": "sweep"})["dag_run_id"]
                sweep_dag, sweep_run = f"reencrypt__{SWEEP}", runs[f"reencrypt__{SWEEP}"]

                def on_worker_a() -> tuple[list[dict], list[dict]]:
                    tis = [ti for ti in airflow.task_instances(client, sweep_dag, sweep_run)
                           if ti["task_id"] in ("reencrypt", "validate") and ti["hostname"] == "worker-a"]
                    return ([ti for ti in tis if ti["state"] == "success"],
                            [ti for ti in tis if ti["state"] == "running"])

                # Mid-run: worker-a has finished two chunks and is running more; best with both of its
                # slots running (a task it has received but not started yet waits for the scheduler's
                # task_queued_timeout, see celery_airflow.py), else after 5 s with one.
                one_running_since = []

                def mid_run() -> list[dict] | None:
                    done, running = on_worker_a()
                    if len(done) < 2 or not running:
                        return None
                    one_running_since.append(time.monotonic())
                    return running if len(running) >= 2 or time.monotonic() - one_running_since[0] > 5 else None

                running = airflow.wait(mid_run, "worker-a with two finished chunks and one running", timeout=150,
                                       every=0.2)
                killed_pids = airflow.kill_worker("worker-a")
                killed = {(ti["task_id"], ti["map_index"]) for ti in running}
                kill_at = time.monotonic()

                def finished():
                    states = [client.get(f"/api/v2/dags/{d}/dagRuns/{r}").json()["state"] for d, r in runs.items()]
                    return states if all(s in ("success", "failed") for s in states) else None

                def states() -> dict:
                    return {d: {f"{ti['task_id']}[{ti['map_index']}]": (ti["state"], ti["hostname"], ti["try_number"])
                                for ti in airflow.task_instances(client, d, r)} for d, r in runs.items()}

                try:
                    end = airflow.wait(finished, "the end of both runs", timeout=240)
                except TimeoutError as exc:
                    raise AssertionError(f"{exc}\ntask instances: {states()}") from None
                assert end == ["success"] * 2, states()
                done_at = time.monotonic()

                tis = {d: airflow.task_instances(client, d, r) for d, r in runs.items()}
                sweep_tis = tis[sweep_dag]
                killed_tries = {k: airflow.tries(client, sweep_dag, sweep_run, *k) for k in killed}
                pooled_dag = f"reencrypt__{POOLED}"
                pooled_tries = [t for ti in tis[pooled_dag]
                                for t in airflow.tries(client, pooled_dag, runs[pooled_dag], ti["task_id"],
                                                       ti["map_index"])
                                if t["start_date"] and t["end_date"]]
        finally:
            airflow.stop()

        # Both workers took partitions; the killed worker's tasks ran again, on the other one.
        mapped = [ti for ti in sweep_tis if ti["task_id"] in ("reencrypt", "validate")]
        assert len([ti for ti in mapped if ti["task_id"] == "reencrypt"]) == PARTITIONS // CHUNK
        per_worker = {h: sum(1 for ti in mapped if ti["hostname"] == h) for h in ("worker-a", "worker-b")}
        partitions_per_worker = {h: sum(CHUNK for ti in mapped if ti["hostname"] == h and ti["task_id"] == "reencrypt")
                                 for h in ("worker-a", "worker-b")}
        assert per_worker["worker-a"] >= 2 and per_worker["worker-b"] >= 2, per_worker
        assert sum(per_worker.values()) == len(mapped)
        retried = sorted(f"{ti['task_id']}[{ti['map_index']}]" for ti in sweep_tis if ti["try_number"] > 1)
        assert {f"{task}[{index}]" for task, index in killed} <= set(retried)
        for tries in killed_tries.values():
            first, last = tries[0], tries[-1]
            assert first["hostname"] == "worker-a" and first["state"] == "failed", tries
            assert last["hostname"] == "worker-b" and last["state"] == "success" and last["try_number"] >= 2, tries
        # Every partition re-wrapped exactly once (a commit the kill kept out of the ledger is reconciled).
        rows = rt.ledger.rows(dataset=SWEEP, events_in=(lg.PARTITION_REWRAPPED, lg.PARTITION_RECONCILED))
        assert sorted(r["partition"] for r in rows) == partitions
        assert all(r["to_version"] == target for r in rows)
        assert not rt.ledger.rows(dataset=SWEEP, events_in=(lg.PARTITION_FAILED, lg.VALIDATION_FAILED))
        validated = rt.ledger.rows(dataset=SWEEP, events_in=(lg.PARTITION_VALIDATED,))
        assert {r["partition"] for r in validated} == set(partitions)
        # Nothing lost: all under the new version, same plaintext, same census as on a single machine.
        assert partition_digests(rt, SWEEP, partitions) == before
        assert rt.census(SWEEP).summary() == single_census == {
            "dataset": SWEEP, "partitions": PARTITIONS, "by_version": {f"v{target}": PARTITIONS}, "unreadable": 0,
            "blocking": 0, "unmanaged_files": 0}
        assert single_digests == before

        # The pool: never two KMS tasks of key class "pooled" at once (all their tries), while
        # those of "scaleout", which has no pool, ran side by side.
        assert {t["task_id"] for t in pooled_tries} == KMS_TASKS
        assert {ti["pool"] for ti in tis[pooled_dag]} == {pool}
        assert {ti["pool"] for ti in sweep_tis} == {"default_pool"}
        assert _max_concurrent([_interval(t) for t in pooled_tries]) == 1
        ordered = sorted(_interval(t) for t in pooled_tries)
        assert all(nxt[0] >= prev[1] for prev, nxt in zip(ordered, ordered[1:], strict=False))
        sweep_peak = _max_concurrent([_interval(ti) for ti in sweep_tis
                                      if ti["task_id"] in KMS_TASKS and ti["start_date"] and ti["end_date"]])
        assert sweep_peak >= 2

        print(f"\nscale-out: {PARTITIONS} partitions in {len(mapped)} mapped tasks; tasks per worker {per_worker}, "
              f"partitions re-encrypted per worker {partitions_per_worker}; worker-a killed ({len(killed_pids)} "
              f"processes) with {sorted(f'{t}[{i}]' for t, i in killed)} running, retried on worker-b; "
              f"retried: {retried}; "
              f"pool of 1: {len(pooled_tries)} KMS task tries, peak concurrency 1 (no pool: {sweep_peak}); "
              f"seed + Airflow start {seeded - started:.0f}s, workers ready {ready - started:.0f}s, "
              f"kill to end {done_at - kill_at:.0f}s, "
              f"total {time.monotonic() - started:.0f}s")
