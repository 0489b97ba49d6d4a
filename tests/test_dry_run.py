"""Dry runs (issue 16, item 3): a rotation or a re-encryption run with ``dry_run`` changes nothing in the KMS,
the data or the ledger (but one ``dry_run`` row), emits no asset event, queues no other DAG, and leaves
what it found in XCom ``dry_run_summary`` (the task's XCom tab in the UI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dag_runs import key_class_dags, seed_and_rotate_through_dags, state, task_states
from helpers import days, runtime
from keyrotation import ledger as lg

pytestmark = pytest.mark.airflow


def _airflow_counts() -> dict[str, int]:
    """Asset events, and runs queued by them, in the metadata DB."""
    from airflow.models.asset import AssetDagRunQueue, AssetEvent
    from airflow.settings import Session

    session = Session()
    return {"asset_events": session.query(AssetEvent).count(), "queued": session.query(AssetDagRunQueue).count()}


def _summary(dag_run, task_id: str) -> dict:
    from airflow.models.xcom import XComModel
    from airflow.settings import Session

    row = Session().query(XComModel).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id,
                                                key="dry_run_summary").one()
    value = row.value
    return json.loads(value) if isinstance(value, str) else value


def _files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_dry_runs_change_nothing_start_nothing_and_say_what_they_found(make_key_class, vault, airflow_db):
    config = make_key_class(name="dry", dataset="dry_data")
    rt = runtime(config, vault)
    dags = key_class_dags("dry")
    parts = days("2024-07-01", 4)
    seed_and_rotate_through_dags(rt, dags, "dry_data", parts)  # v1 written, v2 made: the sweep is due
    root = Path(config.dataset("dry_data").location)

    # Re-encryption dry run.
    before = (_files(root), rt.backend.key_state(), len(rt.ledger.rows()), _airflow_counts())
    run = dags["reencrypt__dry_data"].test(run_conf={"scope": "sweep", "dry_run": True})
    assert state(run) == "success"
    assert task_states(run) == {"plan": "success", "reencrypt": "skipped", "validate": "skipped",
                                "census_after": "skipped"}
    after = (_files(root), rt.backend.key_state(), len(rt.ledger.rows()) - 1, _airflow_counts())
    assert after == before
    [row] = rt.ledger.rows(events_in=(lg.DRY_RUN,))
    summary = _summary(run, "plan")
    assert json.loads(row["detail"]) == summary
    assert {k: summary[k] for k in ("dataset", "mode", "target_version", "partitions", "files", "rows",
                                    "kms_requests")} == {
        "dataset": "dry_data", "mode": "rewrap", "target_version": 2, "partitions": 4, "files": 4, "rows": 200,
        "kms_requests": 12}  # per file: the rewrap, and the validation's two unwraps

    # Rotation dry run: due (forced), the next version and the sweep that would follow it.
    before = (_files(root), rt.backend.key_state(), len(rt.ledger.rows()), _airflow_counts())
    run = dags["rotate__dry"].test(run_conf={"force": True, "reason": "", "dry_run": True})
    assert state(run) == "success"
    assert task_states(run) == {"rotate_key": "skipped", "wait_version_ready": "skipped",
                                "update_reference": "skipped"}
    after = (_files(root), rt.backend.key_state(), len(rt.ledger.rows()) - 1, _airflow_counts())
    assert after == before
    summary = _summary(run, "rotate_key")
    assert {k: summary[k] for k in ("due", "action", "latest_version", "next_version")} == {
        "due": True, "action": "rotate", "latest_version": 2, "next_version": 3}
    assert [(d["dataset"], d["partitions"], d["rows"]) for d in summary["sweep"]] == [("dry_data", 4, 200)]
    assert [r["event"] for r in rt.ledger.rows()][-1] == lg.DRY_RUN

    # The counts are real: a rotation that is not a dry run emits the key class's asset event.
    counts = _airflow_counts()
    assert state(dags["rotate__dry"].test(run_conf={"force": True, "reason": "test: real", "dry_run": False})) \
        == "success"
    assert _airflow_counts()["asset_events"] == counts["asset_events"] + 1
    assert rt.backend.key_state().latest_version == 3
