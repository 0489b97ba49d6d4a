"""Operated as from the UI, against a running API server and scheduler: the approval before
retirement answered through the REST API (as the Required Actions page does), and the key inventory
view (login required)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path

import pytest
from live_airflow import LiveAirflow

from helpers import CONN_ID, DAG_STUB, KEY_CLASS_YAML, days, runtime, seed, sweep
from keyrotation import ledger as lg
from keyrotation.config import load_key_class_file
from keyrotation.ledger import RunContext
from keyrotation.rotation import update_reference

pytestmark = [pytest.mark.airflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def live(tmp_path_factory, openbao):
    base = tmp_path_factory.mktemp("live")
    dags, config_dir = base / "dags", base / "config"
    dags.mkdir()
    config_dir.mkdir()
    text = KEY_CLASS_YAML.format(name="ui", key_ref=f"ui-{secrets.token_hex(4)}", conn_id=CONN_ID, mode="rewrap",
                                 chunk_size=4, grace="0s", dataset="ui_customers", location=base / "data")
    # No scheduled run of reencrypt__ui_customers (created active) while the tests run: its census_after would
    # start retire__ui runs of its own through the dataset's asset, beside the ones the tests trigger.
    text = text.replace('start_date: "2024-01-01"', 'start_date: "2099-01-01"')
    (config_dir / "ui.yaml").write_text(text.replace("approval_required: false", "approval_required: true"))
    (dags / "ui.py").write_text(DAG_STUB.format(name="ui"))
    ledger_url = f"sqlite:///{base / 'ledger.db'}"
    rt = runtime(load_key_class_file(config_dir / "ui.yaml"), openbao.client(), ledger_url)
    seed(rt, "ui_customers", days("2024-01-01", 3))
    v2 = rt.backend.rotate()
    update_reference("ui", v2, rt.ledger, RunContext(actor="test"))
    sweep(rt, "ui_customers", v2)  # re-wrapped and validated: the gate's evidence
    airflow = LiveAirflow(base, dags, {"KEYROTATION_CONFIG_DIR": str(config_dir),
                                       "KEYROTATION_LEDGER_URL": ledger_url}).start()
    airflow.rt = rt
    yield airflow
    airflow.stop()


def test_inventory_view_needs_a_login_and_shows_each_key_class(live):
    import httpx

    anonymous = httpx.get(f"{live.url}/keyrotation/inventory", timeout=30)
    assert anonymous.status_code in (401, 403)
    with live.client("viewer") as client:
        page = client.get("/keyrotation/inventory")
    assert page.status_code == 200, page.text[:500]
    assert "ui" in page.text and "within policy" in page.text
    assert "ui_customers (3 partitions)" in page.text and "v2: 3" in page.text
    assert "/dags/rotate__ui" in page.text


def _trigger_and_answer(live, client, answer: str, conf: dict | None = None) -> str:
    run = client.post("/api/v2/dags/retire__ui/dagRuns", json={"logical_date": None, "conf": conf or {}}).json()
    run_id = run["dag_run_id"]

    def pending():
        details = client.get(f"/api/v2/dags/retire__ui/dagRuns/{run_id}/hitlDetails").json()
        return [d for d in details.get("hitl_details", []) if d.get("response_received") is False]

    [detail] = live.wait(pending, f"approval request of {run_id}")
    assert "under the versions to retire: **0**" in detail["body"], detail["body"]
    assert "ui_customers" in detail["body"]
    assert "The grace period of 0 seconds since v2 became current (by test) ended at 20" in " ".join(
        detail["body"].split()), detail["body"]
    _wait_until_answerable(live, client, run_id)
    resp = client.patch(f"/api/v2/dags/retire__ui/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails",
                        json={"chosen_options": [answer], "params_input": {}})
    assert resp.status_code == 200, resp.text

    def finished():
        state = client.get(f"/api/v2/dags/retire__ui/dagRuns/{run_id}").json()["state"]
        return state if state in ("success", "failed") else None

    assert live.wait(finished, f"end of {run_id}") == "success"
    return run_id


def _wait_until_answerable(live, client, run_id: str) -> None:
    """Airflow 3.3.2's scheduler fails an approval task whose answer re-queues it before the scheduler
    has processed the executor's report of the pause (seen 5 s after the pause under load): answer after."""
    live.wait(lambda: _task_state(client, run_id, "approve") == "awaiting_input", "approve awaiting input")
    paused = f"task_id=approve, run_id={run_id}, map_index=-1"
    live.wait(lambda: any(paused in line and "state=awaiting_input" in line
                          for line in live.log_lines("scheduler", "TaskInstance Finished:")),
              "the scheduler's processing of the approval pause", every=0.5)


def _task_state(client, run_id: str, task_id: str) -> str:
    return client.get(f"/api/v2/dags/retire__ui/dagRuns/{run_id}/taskInstances/{task_id}").json()["state"]


def test_retirement_waits_for_approval_reject_keeps_the_version_approve_retires_it(live):
    rt = live.rt
    with live.client("admin") as client:
        assert client.patch("/api/v2/dags/retire__ui", json={"is_paused": False}).status_code == 200
        rejected = _trigger_and_answer(live, client, "Reject")
        assert _task_state(client, rejected, "retire_versions") == "skipped"
        assert rt.backend.key_state().min_decryption_version == 1
        # Asked once: a further run for the same versions and census skips, without a new request.
        again = client.post("/api/v2/dags/retire__ui/dagRuns", json={"logical_date": None}).json()["dag_run_id"]
        live.wait(lambda: client.get(f"/api/v2/dags/retire__ui/dagRuns/{again}").json()["state"] == "success",
                  f"end of {again}")
        assert _task_state(client, again, "wait_grace_period") == "skipped"
        assert client.get(f"/api/v2/dags/retire__ui/dagRuns/{again}/hitlDetails").json()["hitl_details"] == []
        time.sleep(1)
        approved = _trigger_and_answer(live, client, "Approve", conf={"ask_again": True})
        assert _task_state(client, approved, "retire_versions") == "success"
    assert rt.backend.key_state().min_decryption_version == 2
    decisions = rt.ledger.rows(events_in=(lg.RETIREMENT_DECISION,))
    assert [(d["status"], d["actor"], d["run_id"]) for d in decisions] == [
        ("rejected", "admin", rejected), ("approved", "admin", approved)]
    assert json.loads(decisions[1]["detail"])["responded_at"]
    [retired] = rt.ledger.rows(events_in=(lg.VERSIONS_RETIRED,))
    assert retired["actor"] == "admin" and retired["run_id"] == approved


def test_inventory_view_in_headless_chromium(live, tmp_path):
    """As a person sees it: refused without a login; with one, the key classes, the census and a screenshot."""
    from browser import Browser, chromium_binary

    if not chromium_binary():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs the Debian package 'chromium'")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with Browser() as browser:
        refused = browser.open(f"{live.url}/keyrotation/inventory")
        assert "Key inventory" not in refused and ("Not authenticated" in refused or "Forbidden" in refused)
        browser.set_cookie(live.url, "_token", live.token("viewer"))
        text = browser.open(f"{live.url}/keyrotation/inventory")
        assert "Key inventory" in text and "ui_customers (3 partitions)" in text and "v2: 3" in text
        shot = browser.screenshot(tmp_path / "inventory.png")
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("KEYROTATION_SCREENSHOTS"):  # `make screenshots` refreshes the README's image
        shutil.copy(shot, Path(os.environ["KEYROTATION_SCREENSHOTS"]) / "inventory.png")


def test_operator_walkthrough_in_the_airflow_ui(live, tmp_path):
    """The pages the README walks an operator through render with our forms and texts (screenshots
    are kept with `make screenshots`): the trigger form, the backfill form and a pending approval."""
    from browser import Browser, chromium_binary

    if not chromium_binary():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs the Debian package 'chromium'")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    rt = live.rt
    target = rt.backend.rotate()  # a new version, data re-wrapped: v2 is due for retirement next
    update_reference("ui", target, rt.ledger, RunContext(actor="test"))
    sweep(rt, "ui_customers", target)
    out = Path(os.environ.get("KEYROTATION_SCREENSHOTS") or tmp_path)
    with Browser(1400, 1000) as browser, live.client("admin") as client:
        browser.set_cookie(live.url, "_token", live.token("admin"))
        browser.open(f"{live.url}/dags/rotate__ui")
        browser.click_text("Trigger")
        browser.wait_for_text("Single Run", "Rotation")
        browser.click_text("Rotation")
        browser.wait_for_text("Reason", "Force")
        browser.screenshot(out / "trigger-rotation.png")
        browser.open(f"{live.url}/dags/reencrypt__ui_customers")
        browser.click_text("Trigger")
        browser.wait_for_text("Single Run", "Partitions")
        browser.click_text("Backfill")
        browser.wait_for_text("Reprocess")
        browser.screenshot(out / "backfill.png")

        assert client.patch("/api/v2/dags/retire__ui", json={"is_paused": False}).status_code == 200
        run_id = client.post("/api/v2/dags/retire__ui/dagRuns", json={"logical_date": None}).json()["dag_run_id"]
        live.wait(lambda: _task_state(client, run_id, "approve") == "awaiting_input", "approval request")
        browser.open(f"{live.url}/dags/retire__ui/runs/{run_id}/tasks/approve/required_actions")
        browser.wait_for_text("Retire versions of key class ui", "Approve", "Reject")
        browser.screenshot(out / "approval.png")
        _wait_until_answerable(live, client, run_id)
        resp = client.patch(f"/api/v2/dags/retire__ui/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails",
                            json={"chosen_options": ["Approve"], "params_input": {}})
        assert resp.status_code == 200
        live.wait(lambda: _task_state(client, run_id, "retire_versions") == "success", "retirement")
    assert rt.backend.key_state().min_decryption_version == target


def test_report_reads_run_history_through_the_rest_api_as_a_read_only_user(live):
    """The report's Airflow source against the real API server: runs and who triggered them, the
    failure, the UI event log, paginated, as the viewer, who cannot trigger anything."""
    from datetime import UTC, datetime, timedelta

    from keyrotation.reports import AirflowHistory, KeyClassEvidence, Period, build_report

    started = datetime.now(UTC) - timedelta(minutes=1)
    with live.client("admin") as client:
        assert client.patch("/api/v2/dags/rotate__ui", json={"is_paused": False}).status_code == 200

        def run(conf: dict) -> tuple[str, str]:
            run_id = client.post("/api/v2/dags/rotate__ui/dagRuns",
                                 json={"logical_date": None, "conf": conf}).json()["dag_run_id"]

            def finished():
                state = client.get(f"/api/v2/dags/rotate__ui/dagRuns/{run_id}").json()["state"]
                return state if state in ("success", "failed") else None

            return run_id, live.wait(finished, f"end of {run_id}")

        unexplained, unexplained_state = run({"force": True, "reason": None})
        explained, explained_state = run({"force": True, "reason": "audit: yearly rotation"})
    assert (unexplained_state, explained_state) == ("failed", "success")
    with live.client("viewer") as viewer:
        assert viewer.post("/api/v2/dags/rotate__ui/dagRuns", json={"logical_date": None}).status_code == 403

    passwords = json.loads((live.home / "simple_auth_manager_passwords.json.generated").read_text())
    history = AirflowHistory(live.url, "viewer", passwords["viewer"], page_size=2)
    rt = live.rt
    period = Period(started, datetime.now(UTC) + timedelta(minutes=1))
    built = build_report([KeyClassEvidence(rt.config.key_class, rt.backend.key_state(), rt.censuses())],
                         rt.ledger, period, history=history)
    import io

    import pandas as pd

    def table(name: str) -> pd.DataFrame:
        return pd.read_parquet(io.BytesIO(built.files[f"{name}.parquet"]))

    runs = table("runs").set_index("run_id")
    assert runs.loc[unexplained, ["dag_id", "state", "run_type", "triggering_user"]].tolist() == [
        "rotate__ui", "failed", "manual", "admin"]
    assert runs.loc[explained, ["state", "triggering_user", "reason"]].tolist() == [
        "success", "admin", "audit: yearly rotation"]
    failures = table("failures")
    failed = failures[(failures["source"] == "airflow") & (failures["run_id"] == unexplained)]
    assert failed[["task", "state"]].values.tolist() == [["rotate_key", "failed"]]
    actions = table("ui_actions")
    assert len(actions[(actions["dag_id"] == "rotate__ui") & (actions["user"] == "admin")]) >= 2
    findings = table("findings").set_index("control")
    assert findings.loc["LOG-1", "status"] == "PASS" and "runs" in findings.loc["LOG-1", "detail"]
    assert findings.loc["OPS-1", "status"] == "WARN"
    assert history.requests > 3  # two per page: every list was read page by page
