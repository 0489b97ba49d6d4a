"""The DAGs, run by Airflow (``dag.test()`` on a SQLite metadata DB) against a real OpenBao."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dag_runs import key_class_dags as _dags
from dag_runs import seed_and_rotate_through_dags, task_context
from dag_runs import state as _state
from dag_runs import task_states as _task_states
from helpers import CANARY, days, runtime, seed
from keyrotation import ledger as lg

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.airflow


def _try_numbers(dag_run) -> dict[str, int]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.settings import Session

    tis = Session().query(TaskInstance).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id).all()
    return {ti.task_id: ti.try_number for ti in tis if ti.try_number}


# -- DAG loading -----------------------------------------------------------------------------------

def test_shipped_dags_load_without_import_errors(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("KEYROTATION_CONFIG_DIR", str(ROOT / "include" / "config" / "key_classes"))
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    assert sorted(bag.dags) == [
        "compliance_report", "ledger_checkpoint", "reencrypt__customers", "reencrypt__payments",
        "retire__customer_pii", "retire__payment_tokens", "rotate__customer_pii", "rotate__payment_tokens",
    ]
    for dag_id, dag in bag.dags.items():
        assert dag.doc_md, dag_id
        assert "keyrotation" in dag.tags
        # The trigger forms: no dropdown offers "null", every dropdown choice is labelled.
        for name in dag.params:
            schema = dag.params.get_param(name).schema
            if "enum" in schema:
                assert None not in schema["enum"], (dag_id, name)
                if len(schema["enum"]) > 1 and name != "scope":
                    assert set(schema.get("values_display", {})) == set(schema["enum"]), (dag_id, name)
    # A manual rotation's reason is a required field of the form (its type is not nullable).
    reason = bag.dags["rotate__customer_pii"].params.get_param("reason").schema
    assert reason["type"] == "string" and bag.dags["rotate__customer_pii"].params["reason"] == ""
    # The shipped key classes size chunks by work, and the sweep's docs say so.
    assert "chunks of about 1 minute of estimated work each" in bag.dags["reencrypt__customers"].doc_md


def test_bad_config_fails_only_its_dag_file_with_file_key_class_and_field(tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    shipped = ROOT / "include" / "config" / "key_classes"
    config = tmp_path / "config"
    config.mkdir()
    (config / "customer_pii.yaml").write_text((shipped / "customer_pii.yaml").read_text())
    bad = (shipped / "payment_tokens.yaml").read_text().replace("cryptoperiod: 365d", "cryptoperiod: soon")
    (config / "payment_tokens.yaml").write_text(bad)
    monkeypatch.setenv("KEYROTATION_CONFIG_DIR", str(config))

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert list(bag.import_errors) == [str(ROOT / "dags" / "payment_tokens.py")]
    error = bag.import_errors[str(ROOT / "dags" / "payment_tokens.py")]
    assert str(config / "payment_tokens.yaml") in error
    assert "key class 'payment_tokens'" in error
    assert "field key_class.rotation.cryptoperiod" in error
    assert {"rotate__customer_pii", "reencrypt__customers", "compliance_report"} <= set(bag.dags)


# -- rotation --------------------------------------------------------------------------------------

def test_rotation_creates_version_skips_when_not_due_and_rotates_when_forced(make_key_class, vault, airflow_db):
    config = make_key_class(name="rot", dataset="rot_customers")
    rt = runtime(config, vault)
    dag = _dags("rot")["rotate__rot"]

    first = dag.test(run_conf={"force": False, "reason": "first version"})  # no key yet: created as v1
    assert _state(first) == "success"
    assert rt.backend.key_state().latest_version == 1
    assert rt.ledger.current_version("rot") == 1

    not_due = dag.test(run_conf={"force": False, "reason": "test: first version"})  # v1 is seconds old: not due
    assert _task_states(not_due)["rotate_key"] == "skipped"
    assert _task_states(not_due)["update_reference"] == "skipped"
    assert rt.backend.key_state().latest_version == 1
    assert [r["status"] for r in rt.ledger.rows(events_in=(lg.ROTATION_SKIPPED,))] == ["skipped"]

    # A manual rotation without a reason is refused, at once and without retries.
    unexplained = dag.test(run_conf={"force": True, "reason": ""})
    assert _state(unexplained) == "failed"
    assert rt.backend.key_state().latest_version == 1
    assert _try_numbers(unexplained) == {"rotate_key": 1}

    forced = dag.test(run_conf={"force": True, "reason": "test: compromised laptop"})
    assert _state(forced) == "success"
    assert rt.backend.key_state().latest_version == 2
    assert rt.ledger.current_version("rot") == 2
    created = rt.ledger.rows(events_in=(lg.VERSION_CREATED,))
    assert [(r["from_version"], r["to_version"]) for r in created] == [(1, 2)]
    assert "compromised laptop" in created[0]["detail"]
    assert created[0]["dag_id"] == "rotate__rot" and created[0]["task_id"] == "rotate_key"


# -- the whole path --------------------------------------------------------------------------------

def test_end_to_end_rotate_reencrypt_validate_retire_report(make_key_class, vault, airflow_db, tmp_path, caplog,
                                                            capfd):
    config = make_key_class(name="e2e", mode="reencrypt", chunk_size=4, dataset="e2e_customers")
    rt = runtime(config, vault)
    dags = _dags("e2e")
    parts = days("2024-01-01", 10)
    caplog.set_level(logging.INFO)

    seed_and_rotate_through_dags(rt, dags, "e2e_customers", parts, "e2e")
    assert rt.census("e2e_customers").by_version() == {1: 10}

    # Retirement before re-encryption: the census gate must hold it back.
    from airflow.sdk.exceptions import AirflowFailException

    from keyrotation_airflow.operators.retire import RetireKeyVersionsOperator

    op = RetireKeyVersionsOperator(task_id="retire_versions", key_class="e2e")
    with pytest.raises(AirflowFailException, match="10 partitions still under versions below v2"):
        op.execute(task_context("retire__e2e", "retire_versions"))
    assert rt.backend.key_state().min_decryption_version == 1
    assert [r["status"] for r in rt.ledger.rows(events_in=(lg.RETIREMENT_REFUSED,))] == ["refused"]

    sweep = dags["reencrypt__e2e_customers"].test(run_conf={"scope": "auto"})
    assert _state(sweep) == "success"
    states = _task_states(sweep)
    assert [states[f"reencrypt[{i}]"] for i in range(3)] == ["success"] * 3  # 10 partitions in chunks of 4
    assert "chunks of 4 partitions (reencryption.chunk_size)" in dags["reencrypt__e2e_customers"].doc_md
    assert rt.census("e2e_customers").by_version() == {2: 10}
    assert len(rt.ledger.rows(events_in=(lg.PARTITION_VALIDATED,))) == 10

    assert _state(dags["retire__e2e"].test()) == "success"
    assert rt.backend.key_state().min_decryption_version == 2
    retired = rt.ledger.rows(events_in=(lg.VERSIONS_RETIRED,))
    assert [(r["from_version"], r["to_version"]) for r in retired] == [(1, 2)]
    engine = rt.engine("e2e_customers")
    assert {engine.validate(p).action for p in parts} == {"validated"}

    from keyrotation_airflow.operators.report import ComplianceReportOperator

    report = ComplianceReportOperator(task_id="write_report", output_dir=str(tmp_path / "report"),
                                      key_classes=["e2e"])
    path = Path(report.execute(task_context("compliance_report", "write_report"))["html"])
    page = path.read_text()
    assert "e2e" in page and "PASS" in page
    coverage = (path.parent / "coverage.csv").read_text().splitlines()
    assert coverage[1].startswith("cov-1,e2e,e2e_customers,2,True,10,500,")

    # No plaintext value reached a log line (task logs go to the process's output under dag.test),
    # the ledger or the report; the task logs were captured, or this proves nothing.
    out, err = capfd.readouterr()
    logs = out + err + caplog.text
    assert "plan (sweep): 10 partitions to bring under v2" in logs
    assert "e2e_customers 10/10 partition" in logs or "e2e_customers 2/2 partition" in logs
    assert CANARY not in logs
    assert all(CANARY not in str(row) for row in rt.ledger.rows())
    assert CANARY not in page


def test_a_sweep_without_chunk_size_is_chunked_by_estimated_work(make_key_class, vault, airflow_db, caplog, capfd):
    # No chunk_size (the default): 12 small partitions are seconds of work, one mapped task for them all.
    config = make_key_class(name="bywork", dataset="bywork_customers", **{"chunk_size: 16": "chunk_target: 30s"})
    assert config.key_class.reencryption.chunk_size is None
    rt = runtime(config, vault)
    dags = _dags("bywork")
    assert "chunks of about 30 seconds of estimated work each" in dags["reencrypt__bywork_customers"].doc_md
    parts = days("2024-03-01", 12)
    seed_and_rotate_through_dags(rt, dags, "bywork_customers", parts, "by work")
    caplog.set_level(logging.INFO)
    sweep = dags["reencrypt__bywork_customers"].test(run_conf={"scope": "sweep", "dry_run": False})
    assert _state(sweep) == "success"
    states = _task_states(sweep)
    assert states["reencrypt[0]"] == "success" and "reencrypt[1]" not in states
    assert rt.census("bywork_customers").by_version() == {2: 12}
    out, err = capfd.readouterr()
    assert "12 partitions to bring under v2 in 1 chunks of about 0.1 s of estimated work each (target 30 s)" \
        in out + err + caplog.text


def test_dry_run_and_range_plans(make_key_class, vault, airflow_db):
    config = make_key_class(name="rng", mode="rewrap", dataset="rng_customers")
    rt = runtime(config, vault)
    dags = _dags("rng")
    parts = days("2024-01-01", 8)
    seed_and_rotate_through_dags(rt, dags, "rng_customers", parts, "range")

    root = Path(config.dataset("rng_customers").location)
    files_before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    ledger_before = len(rt.ledger.rows())
    key_before = rt.backend.key_state()
    dry = dags["reencrypt__rng_customers"].test(run_conf={"dry_run": True, "scope": "sweep"})
    assert _state(dry) == "success"
    assert _task_states(dry)["reencrypt"] == "skipped"
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files_before
    assert [r["event"] for r in rt.ledger.rows()[ledger_before:]] == [lg.DRY_RUN]  # the dry run's own record
    assert rt.backend.key_state() == key_before
    assert rt.census("rng_customers").by_version() == {1: 8}

    # Bad parameter values are refused when the run is created, before any task runs.
    from airflow.sdk.exceptions import ParamValidationError

    for bad in ({"scope": "everything"}, {"mode": "sideways"}, {"partition_from": "yesterday"},
                {"dry_run": "maybe"}):
        with pytest.raises(ParamValidationError):
            dags["reencrypt__rng_customers"].test(run_conf=bad)

    # Full conf: dag.test() reuses the DAG object in-process, so an earlier run's conf can linger.
    ranged = dags["reencrypt__rng_customers"].test(run_conf={
        "scope": "range", "partition_from": "2024-01-03", "partition_to": "2024-01-05", "dry_run": False})
    assert _state(ranged) == "success"
    census = rt.census("rng_customers")
    assert census.under(2) == [p for p in parts if p not in ("2024-01-03", "2024-01-04", "2024-01-05")]
    rewrapped = rt.ledger.rows(events_in=(lg.PARTITION_REWRAPPED,))
    assert sorted(r["partition"] for r in rewrapped) == ["2024-01-03", "2024-01-04", "2024-01-05"]


def test_the_dags_a_rotation_starts_are_created_active(make_key_class, airflow_db):
    """Airflow queues no asset event for a paused DAG: reencrypt__* and retire__* are created unpaused, so a
    rotation never completes into a void; rotate__* starts paused as Airflow is configured (here: the default)."""
    from airflow.configuration import conf
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.dag import DagModel
    from airflow.models.dagbundle import DagBundleModel
    from airflow.settings import Session
    from conftest import DAGS_DIR

    make_key_class(name="active", dataset="active_data")
    bag = DagBag(dag_folder=str(DAGS_DIR / "active.py"))
    assert bag.import_errors == {}
    session = Session()
    if session.get(DagBundleModel, "keyrotation-tests") is None:
        session.add(DagBundleModel(name="keyrotation-tests"))
        session.commit()
    sync_bag_to_db(bag, "keyrotation-tests", None)
    paused = {m.dag_id: m.is_paused for m in session.query(DagModel).filter(DagModel.dag_id.in_(bag.dags))}
    assert conf.getboolean("core", "dags_are_paused_at_creation") is True
    assert paused == {"rotate__active": True, "reencrypt__active_data": False, "retire__active": False}


def test_a_scheduled_run_catches_up_once_the_rotation_sweep_had_its_time(make_key_class, vault):
    """A scheduled run handles its own partition, and, once the current version has been the reference longer
    than ``catch_up_after`` (1 day by default), every partition still under an older version."""
    from datetime import UTC, datetime, timedelta

    from keyrotation.ledger import RunContext
    from keyrotation_airflow.operators.reencrypt import PlanReencryptionOperator

    rt = runtime(make_key_class(name="catchup", dataset="catchup_data"), vault)
    parts = days("2024-10-01", 4)
    seed(rt, "catchup_data", parts)
    v2 = rt.backend.rotate()

    class Run:
        run_type = "scheduled"

    context = {**task_context("reencrypt__catchup_data", "plan"), "dag_run": Run(),
               "data_interval_start": datetime(2024, 10, 3, tzinfo=UTC)}
    plan = PlanReencryptionOperator(task_id="plan", key_class="catchup", dataset="catchup_data")
    rt.ledger.record(lg.REFERENCE_UPDATED, rt.name, RunContext(actor="test"), from_version=1, to_version=v2)
    assert plan.execute(context) == [{"partitions": ["2024-10-03"], "target_version": v2, "mode": "rewrap"}]
    rt.ledger.record(lg.REFERENCE_UPDATED, rt.name, RunContext(actor="test"), from_version=1, to_version=v2,
                     at=datetime.now(UTC) - timedelta(days=1, minutes=1))  # the reference, current for a day
    assert plan.execute(context) == [{"partitions": parts, "target_version": v2, "mode": "rewrap"}]
    Run.run_type = "backfill"  # a backfill never catches up
    assert plan.execute(context) == [{"partitions": ["2024-10-03"], "target_version": v2, "mode": "rewrap"}]
