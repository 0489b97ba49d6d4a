"""Errors that do not waste retries, in real DAG runs (``dag.test()``) against the real OpenBao: bad input
fails at once with one ledger row; a KMS that cannot be reached, even at connection set-up, gives the
project's ``KMS unreachable: ...`` message and a ledger row for every try, and is retried."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path

import pytest

from dag_runs import key_class_dags as _dags
from dag_runs import state as _state
from dag_runs import task_instances
from helpers import CONN_ID, days, runtime, seed
from keyrotation import ledger as lg
from keyrotation.ledger import RunContext
from keyrotation.rotation import update_reference
from keyrotation_dev.devserver import free_port

pytestmark = pytest.mark.airflow


def _no_retry_wait(dag) -> None:
    """A retry, if any, runs at once: dag.test() would otherwise wait out the minute of retry_delay. A task
    that must not be retried still shows as a second try."""
    for task in dag.tasks:
        task.retry_delay = timedelta(0)


def _tries(dag_run) -> dict[str, tuple[str, int]]:
    """``task_id[map_index]`` -> (state, try_number) of the run's task instances."""
    return {name: (str(ti.state), ti.try_number) for name, ti in task_instances(dag_run).items()}


def test_unreadable_partition_fails_once_with_one_ledger_row(make_key_class, vault, airflow_db):
    config = make_key_class(name="ff_bad", mode="reencrypt", dataset="ff_bad_customers")
    rt = runtime(config, vault)
    parts = days("2024-01-01", 3)
    seed(rt, "ff_bad_customers", parts)
    update_reference(rt.name, rt.backend.rotate(), rt.ledger, RunContext(actor="test"))
    data = Path(rt.store("ff_bad_customers").path(parts[1], "part-00001.parquet"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    dag = _dags("ff_bad")["reencrypt__ff_bad_customers"]
    _no_retry_wait(dag)
    assert dag.task_dict["reencrypt"].retries == 3  # what a KMS outage would still get

    run = dag.test(run_conf={"scope": "sweep", "dry_run": False})

    assert _state(run) == "failed"
    assert _tries(run)["reencrypt[0]"] == ("failed", 1)
    failed = rt.ledger.rows(events_in=(lg.PARTITION_FAILED,))
    assert [(r["partition"], r["status"], r["task_id"], r["try_number"]) for r in failed] == [
        (parts[1], "failed", "reencrypt", 1)]
    assert json.loads(failed[0]["detail"])["error"].startswith(f"partition {parts[1]}: ")
    done = rt.ledger.rows(events_in=(lg.PARTITION_REENCRYPTED,))
    assert sorted(r["partition"] for r in done) == [parts[0], parts[2]]  # the others went on


def test_kms_down_at_task_start_says_kms_unreachable_records_each_try_and_retries(
        make_key_class, vault, airflow_db, monkeypatch, caplog, capfd):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("AIRFLOW_CONN_VAULT_FF_DOWN", json.dumps({
        "conn_type": "vault", "host": "127.0.0.1", "port": port, "password": "s.unused",
        "extra": {"auth_type": "token"}}))
    config = make_key_class(name="ff_down", dataset="ff_down_customers",
                            **{f"conn_id: {CONN_ID}": "conn_id: vault_ff_down"})
    assert config.key_class.conn_for("rotate") == "vault_ff_down"
    dag = _dags("ff_down")["rotate__ff_down"]
    _no_retry_wait(dag)
    retries = dag.task_dict["rotate_key"].retries
    assert retries >= 1
    caplog.set_level(logging.INFO)

    run = dag.test(run_conf={"force": True, "reason": "test: KMS down"})

    assert _state(run) == "failed"
    assert _tries(run)["rotate_key"] == ("failed", retries + 1)  # an outage can pass: retried
    message = (f"KMS unreachable: key class 'ff_down' (vault_transit) through connection 'vault_ff_down' at "
               f"http://127.0.0.1:{port}: ConnectionRefusedError: [Errno 111] Connection refused")
    rows = runtime(config, vault).ledger.rows(events_in=(lg.KMS_UNREACHABLE,))
    assert [(r["key_class"], r["status"], r["dag_id"], r["task_id"], r["try_number"]) for r in rows] == [
        ("ff_down", "failed", "rotate__ff_down", "rotate_key", n) for n in range(1, retries + 2)]
    assert {r["detail"] for r in rows} == {json.dumps({"error": message})}

    out, err = capfd.readouterr()
    logs = out + err + caplog.text
    assert logs.count(message) >= retries + 1  # the task log names it, once a try at least
    # One line of cause, not the provider's internals: no request path, no requests/hvac/urllib3 frames.
    assert "lookup-self" not in logs
    for internals in ("requests/adapters.py", "hvac/", "urllib3/", "NewConnectionError", "MaxRetryError"):
        assert internals not in logs, internals


def test_kms_lost_after_set_up_is_recorded_once_a_try(make_key_class, vault, airflow_db, monkeypatch):
    from keyrotation.backends.vault_transit import VaultTransitBackend
    from keyrotation.errors import KmsUnreachable

    message = "KMS unreachable: Transit key 'x' at http://127.0.0.1:1: read key: gave up after 6 attempts"

    def lost(self):
        raise KmsUnreachable(message)

    config = make_key_class(name="ff_lost", dataset="ff_lost_customers")
    dag = _dags("ff_lost")["rotate__ff_lost"]
    _no_retry_wait(dag)
    monkeypatch.setattr(VaultTransitBackend, "key_state", lost)  # set-up reached the KMS; its first call does not

    run = dag.test(run_conf={"force": True, "reason": "test: KMS lost"})

    retries = dag.task_dict["rotate_key"].retries
    assert _tries(run)["rotate_key"] == ("failed", retries + 1)
    rows = runtime(config, vault).ledger.rows(events_in=(lg.KMS_UNREACHABLE,))
    assert [(r["task_id"], r["try_number"], r["detail"]) for r in rows] == [
        ("rotate_key", n, json.dumps({"error": message})) for n in range(1, retries + 2)]


def test_config_error_in_a_task_fails_at_once(make_key_class, vault, airflow_db, caplog, capfd):
    config = make_key_class(name="ff_conf", dataset="ff_conf_customers")
    dag = _dags("ff_conf")["rotate__ff_conf"]
    _no_retry_wait(dag)
    dag.test(mark_success_pattern=".*")  # the DAG in the metadata DB while its file was valid; no task runs
    # The file changes after the DAG was parsed: the next task to load it finds it invalid.
    Path(config.source).write_text(Path(config.source).read_text().replace("cryptoperiod: 90d", "cryptoperiod: soon"))
    capfd.readouterr()

    run = dag.test(run_conf={"force": True, "reason": "test: config changed under a run"})

    assert _state(run) == "failed"
    assert _tries(run)["rotate_key"] == ("failed", 1)
    assert runtime(config, vault).backend.key_state().exists is False  # nothing reached the KMS
    out, err = capfd.readouterr()
    message = (f"{config.source}: key class 'ff_conf': field key_class.rotation.cryptoperiod: Value error, not a "
               "duration: 'soon' (use e.g. 90d, 12h, 30m, 45s, 2w)")
    assert f"{message}; not retried" in out + err + caplog.text
    rows = runtime(config, vault).ledger.rows(events_in=(lg.CONFIG_INVALID,))
    assert [(r["key_class"], r["status"], r["task_id"], json.loads(r["detail"])) for r in rows] == [
        ("ff_conf", "failed", "rotate_key", {"error": message})]
