"""Operated as from the UI, against a running API server and scheduler: the approval before
retirement answered through the REST API (as the Required Actions page does), and the key inventory
view (login required)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from live_airflow import LiveAirflow, postgres_databases
from smtp_server import running_smtp_server

from helpers import CONN_ID, DAG_STUB, KEY_CLASS_YAML, days, runtime, seed, sweep
from keyrotation import ledger as lg
from keyrotation.config import load_key_class_file
from keyrotation.ledger import RunContext
from keyrotation.rotation import update_reference
from keyrotation_dev.sample_data import DATASET_WRITERS

pytestmark = [pytest.mark.airflow, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def airflow_db():
    """The live Airflow's metadata database: PostgreSQL, created for this module and dropped after it."""
    with postgres_databases("keyrotation_ui", "") as (url,):
        yield url


@pytest.fixture(scope="module")
def live(tmp_path_factory, openbao, moto, airflow_db):
    """One running Airflow (API server, scheduler, DAG processor, triggerer) for every test of this module, each
    on a key class of its own: ``ui`` (approvals, the inventory, the report's history), ``life`` (the shipped
    policy's lifecycle), ``bf`` (a backfill) and ``ev`` (rotation from a KMS event queue)."""
    base = tmp_path_factory.mktemp("live")
    smtp = ExitStack()
    mail = smtp.enter_context(running_smtp_server())
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
    (config_dir / "life.yaml").write_text(shipped_policy_shortened(base / "life_data"))
    (dags / "life.py").write_text(DAG_STUB.format(name="life"))
    life = runtime(load_key_class_file(config_dir / "life.yaml"), openbao.client(), ledger_url)
    first = life.backend.create_key().latest_version
    update_reference("life", first, life.ledger, RunContext(actor="test"))
    engine = life.engine("life_customers")
    for partition, table in DATASET_WRITERS["customers"](3, 200):  # the demo's data: email, phone and ssn
        engine.write_partition(partition, table, first)
    unanswered = _key_class(base, config_dir, dags, "to", KEY_CLASS_YAML.format(
        name="to", key_ref=f"to-{secrets.token_hex(4)}", conn_id=CONN_ID, mode="rewrap", chunk_size=4, grace="0s",
        dataset="to_data", location=base / "to_data").replace(
        "approval_required: false", f"approval_required: true\n    approval_timeout: {APPROVAL_TIMEOUT}s").replace(
        'start_date: "2024-01-01"', 'start_date: "2099-01-01"'), openbao, ledger_url)
    seed(unanswered, "to_data", days("2024-01-01", 2))
    v2 = unanswered.backend.rotate()
    update_reference("to", v2, unanswered.ledger, RunContext(actor="test"))
    sweep(unanswered, "to_data", v2)
    bf = _key_class(base, config_dir, dags, "bf", KEY_CLASS_YAML.format(
        name="bf", key_ref=f"bf-{secrets.token_hex(4)}", conn_id=CONN_ID, mode="rewrap", chunk_size=4, grace="0s",
        dataset="bf_customers", location=base / "bf_data"), openbao, ledger_url)
    seed(bf, "bf_customers", days("2024-01-01", 7))
    update_reference("bf", bf.backend.rotate(), bf.ledger, RunContext(actor="test"))
    sqs = moto.client("sqs")
    queue_url = sqs.create_queue(QueueName=f"kms-events-{secrets.token_hex(3)}")["QueueUrl"]
    ev = _key_class(base, config_dir, dags, "ev", KEY_CLASS_YAML.format(
        name="ev", key_ref=f"ev-{secrets.token_hex(4)}", conn_id=CONN_ID, mode="rewrap", chunk_size=4, grace="0s",
        dataset="ev_data", location=base / "ev_data").replace(
        "  rotation:\n", f"  events:\n    sqs_queue: {queue_url}\n    aws_conn_id: aws_kms_events\n"
                         "    region_name: us-east-1\n  rotation:\n"), openbao, ledger_url)
    update_reference("ev", ev.backend.create_key().latest_version, ev.ledger, RunContext(actor="test"))
    airflow = LiveAirflow(base, dags, {"KEYROTATION_CONFIG_DIR": str(config_dir), "KEYROTATION_LEDGER_URL": ledger_url,
                                       "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "2",
                                       "AIRFLOW_CONN_AWS_KMS_EVENTS": moto.airflow_connection_uri(),
                                       "AIRFLOW_CONN_SMTP_LIFE": mail.airflow_connection()},
                          database_url=airflow_db, triggerer=True)
    # The users' passwords set beforehand, so the rotation's check of the DAGs it starts reads the API as the
    # viewer, through the connection an operator configures (read-only).
    passwords = {"admin": secrets.token_urlsafe(12), "viewer": secrets.token_urlsafe(12)}
    (airflow.home / "simple_auth_manager_passwords.json.generated").write_text(json.dumps(passwords))
    airflow.env["AIRFLOW_CONN_KEYROTATION_AIRFLOW_API"] = json.dumps({
        "conn_type": "http", "host": "127.0.0.1", "port": airflow.port, "login": "viewer",
        "password": passwords["viewer"]})
    airflow.start()
    airflow.rt, airflow.life, airflow.bf, airflow.ev, airflow.unanswered = rt, life, bf, ev, unanswered
    airflow.sqs, airflow.queue_url, airflow.mail = sqs, queue_url, mail
    yield airflow
    airflow.stop()
    smtp.close()


def _key_class(base: Path, config_dir: Path, dags: Path, name: str, text: str, openbao, ledger_url: str):  # noqa: ANN001
    (config_dir / f"{name}.yaml").write_text(text)
    (dags / f"{name}.py").write_text(DAG_STUB.format(name=name))
    return runtime(load_key_class_file(config_dir / f"{name}.yaml"), openbao.client(), ledger_url)


LIFE_GRACE = timedelta(seconds=75)
APPROVAL_TIMEOUT = 8  # seconds, for the key class "to" whose approval nobody answers


def shipped_policy_shortened(location: Path) -> str:
    """The shipped customer_pii key class (approval required, one version kept, its approval timeout), renamed
    ``life``, on its own key and data, with the grace period shortened from 7 days to 75 seconds, its notices
    mailed to the test's SMTP server, and no scheduled sweep (the test starts every run but the ones the
    lifecycle starts itself)."""
    text = (ROOT / "include" / "config" / "key_classes" / "customer_pii.yaml").read_text()
    for old, new in {"name: customer_pii": "name: life",
                     "key_ref: customer-pii": f"key_ref: life-{secrets.token_hex(4)}",
                     "grace_period: 7d": f"grace_period: {int(LIFE_GRACE.total_seconds())}s",
                     "  owner: data-platform\n": "  owner: data-platform\n  notifications:\n"
                                               "    smtp: {conn_id: smtp_life, to: [key-custodians@example.test]}\n",
                     "- name: customers": "- name: life_customers",
                     "location: ${KEYROTATION_HOME:-var}/data/customers": f"location: {location}",
                     'start_date: "2024-01-01"': 'start_date: "2099-01-01"'}.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    assert "approval_required: true" in text and "versions_kept: 1" in text
    return text


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
    run_id = live.trigger(client, "retire__ui", conf)["dag_run_id"]

    def pending():
        details = client.get(f"/api/v2/dags/retire__ui/dagRuns/{run_id}/hitlDetails").json()
        return [d for d in details.get("hitl_details", []) if d.get("response_received") is False]

    [detail] = live.wait(pending, f"approval request of {run_id}")
    assert "under the versions to retire: **0**" in detail["body"], detail["body"]
    assert "ui_customers" in detail["body"]
    assert "**Grace period:** 0 seconds since v2 became current (by test), ended at 20" in " ".join(
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


def _wait_until_answerable(live, client, run_id: str, dag_id: str = "retire__ui") -> None:
    """Airflow 3.3.2's scheduler fails an approval task whose answer re-queues it before the scheduler
    has processed the executor's report of the pause (seen 5 s after the pause under load): answer after."""
    live.wait(lambda: _task_state(client, run_id, "approve", dag_id) == "awaiting_input", "approve awaiting input")
    paused = f"dag_id={dag_id}, task_id=approve, run_id={run_id}, map_index=-1"
    live.wait(lambda: any(paused in line and "state=awaiting_input" in line
                          for line in live.log_lines("scheduler", "TaskInstance Finished:")),
              "the scheduler's processing of the approval pause", every=0.5)


def _task_state(client, run_id: str, task_id: str, dag_id: str = "retire__ui") -> str:
    return client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}").json()["state"]


def _runs(client, dag_id: str) -> list[dict]:
    return client.get(f"/api/v2/dags/{dag_id}/dagRuns", params={"order_by": "id"}).json()["dag_runs"]


def test_retirement_waits_for_approval_reject_keeps_the_version_approve_retires_it(live):
    rt = live.rt
    with live.client("admin") as client:
        assert client.patch("/api/v2/dags/retire__ui", json={"is_paused": False}).status_code == 200
        rejected = _trigger_and_answer(live, client, "Reject")
        assert _task_state(client, rejected, "retire_versions") == "skipped"
        assert rt.backend.key_state().min_decryption_version == 1
        # Asked once: a further run for the same versions and census skips, without a new request.
        again = live.trigger(client, "retire__ui")["dag_run_id"]
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
        run_id = live.trigger(client, "retire__ui")["dag_run_id"]
        live.wait(lambda: _task_state(client, run_id, "approve") == "awaiting_input", "approval request")
        browser.open(f"{live.url}/dags/retire__ui/runs/{run_id}/tasks/approve/required_actions")
        browser.wait_for_text("Retire versions of key class ui", "What approving does in the KMS",
                              f"of Transit key {rt.config.key_class.key_ref} to v{target}: v{target - 1} can no longer",
                              "Grace period:", "became current (by test), ended at", "Approve", "Reject")
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
            run_id = live.trigger(client, "rotate__ui", conf)["dag_run_id"]

            def finished():
                state = client.get(f"/api/v2/dags/rotate__ui/dagRuns/{run_id}").json()["state"]
                return state if state in ("success", "failed") else None

            return run_id, live.wait(finished, f"end of {run_id}")

        unexplained, unexplained_state = run({"force": True, "reason": ""})
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


def test_the_lifecycle_closes_unattended_under_the_shipped_policy(live):
    """The shipped policy with a 75-second grace period: a manual rotation with its reason, the sweep it starts,
    a retire run that waits out the grace period deferred in the triggerer and only then asks, once, even after
    more sweeps; approved through the REST API (as the Required Actions page does), then retired; no failed run."""
    life = live.life
    dag_ids = ("rotate__life", "reencrypt__life_customers", "retire__life")
    with live.client("admin") as client:
        assert client.patch("/api/v2/dags/rotate__life", json={"is_paused": False}).status_code == 200
        rotation = live.trigger(client, "rotate__life", {"force": True, "reason": "lifecycle test: quarterly rotation"})
        assert live.wait(lambda: _finished(client, "rotate__life", rotation["dag_run_id"]), "the rotation") == "success"
        assert life.ledger.current_version("life") == 2
        grace_end = life.ledger.current_reference("life")["recorded_at"] + LIFE_GRACE
        live.wait(lambda: [r for r in _runs(client, "reencrypt__life_customers") if r["state"] == "success"],
                  "the sweep the rotation started")
        assert life.census("life_customers").by_version() == {2: 3}
        [retire] = live.wait(lambda: _runs(client, "retire__life"), "the retire run the sweep started")
        retire_id = retire["dag_run_id"]
        live.wait(lambda: _task_state(client, retire_id, "wait_grace_period", "retire__life") == "deferred",
                  "wait_grace_period deferred to the triggerer")
        assert datetime.now(UTC) < grace_end, "the grace period ended before the retire run could wait for it"
        assert client.get("/api/v2/dags/retire__life/dagRuns/~/hitlDetails").json()["hitl_details"] == []

        # More sweeps while it waits (a daily run, a backfill, an operator): each ends with the asset events
        # that start retire__life again; none of them may add a request.
        extra = [live.trigger(client, "reencrypt__life_customers")["dag_run_id"] for _ in range(2)]
        live.wait(lambda: all(_run_state(client, "reencrypt__life_customers", r) == "success" for r in extra),
                  "the extra sweeps", timeout=240)

        def pending():
            details = client.get("/api/v2/dags/retire__life/dagRuns/~/hitlDetails").json()["hitl_details"]
            return [d for d in details if d.get("response_received") is False]

        [request] = live.wait(pending, "the approval request after the grace end", timeout=240)
        assert datetime.now(UTC) >= grace_end
        assert request["task_instance"]["dag_run_id"] == retire_id
        body = " ".join(request["body"].split())
        key_ref = life.config.key_class.key_ref
        assert ("**What approving does in the KMS:** it raises the minimum decryption and encryption version of "
                f"Transit key `{key_ref}` to v2: v1 can no longer decrypt or encrypt; the key material stays in the "
                "key (no trim): lowering the minimum again re-enables it.") in body, body
        assert ("**Grace period:** 1 minute 15 seconds since v2 became current (by admin), ended at "
                f"{grace_end.isoformat()}") in body, body
        # The mail that asks for it, with the link that opens it (as the approver would, in a browser).
        [mail] = live.mail.wait_for(1)
        link = f"{live.url}/dags/retire__life/runs/{retire_id}/tasks/approve/required_actions?map_index=-1"
        assert mail.subject == "[keyrotation] life: approval pending in retire__life" and link in mail.text()
        assert mail.rcpt_tos == ("key-custodians@example.test",)
        _open_as_admin(live, link, "Retire versions of key class life", "What approving does in the KMS", "Approve")
        _wait_until_answerable(live, client, retire_id, "retire__life")
        assert client.patch(f"/api/v2/dags/retire__life/dagRuns/{retire_id}/taskInstances/approve/-1/hitlDetails",
                            json={"chosen_options": ["Approve"], "params_input": {}}).status_code == 200
        live.wait(lambda: _task_state(client, retire_id, "retire_versions", "retire__life") == "success",
                  "the retirement")
        live.wait(lambda: _settled(client, "retire__life"), "every retire run queued behind the first", timeout=240)
        assert len(client.get("/api/v2/dags/retire__life/dagRuns/~/hitlDetails").json()["hitl_details"]) == 1
        runs = {dag_id: _runs(client, dag_id) for dag_id in dag_ids}
    assert {dag_id: sorted({r["state"] for r in rs}) for dag_id, rs in runs.items()} == {
        dag_id: ["success"] for dag_id in dag_ids}
    assert life.backend.key_state().min_decryption_version == 2
    [decision] = life.ledger.rows(key_class="life", events_in=(lg.RETIREMENT_DECISION,))
    assert (decision["status"], decision["actor"], decision["run_id"]) == ("approved", "admin", retire_id)
    [retired] = life.ledger.rows(key_class="life", events_in=(lg.VERSIONS_RETIRED,))
    assert retired["run_id"] == retire_id and lg.as_utc(retired["recorded_at"]) >= grace_end


def _open_as_admin(live, url: str, *texts: str) -> None:
    from browser import Browser, chromium_binary

    if not chromium_binary():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs the Debian package 'chromium'")
        return  # the rest of the lifecycle still runs
    with Browser(1400, 1000) as browser:
        browser.set_cookie(live.url, "_token", live.token("admin"))
        browser.open(url)
        browser.wait_for_text(*texts)


def _run_state(client, dag_id: str, run_id: str) -> str:
    return client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()["state"]


def _settled(client, dag_id: str) -> bool:
    """No asset event waits to start ``dag_id`` and every run of it has ended. The scheduler makes the run of the
    events queued while a run was active only after that run ends (``max_active_runs``), deleting the queue in the
    same transaction: the queue is read first, so a run made after that read shows in the runs read next."""
    queued = client.get(f"/api/v2/dags/{dag_id}/assets/queuedEvents").json()["total_entries"]
    return queued == 0 and all(r["state"] in ("success", "failed") for r in _runs(client, dag_id))


def _finished(client, dag_id: str, run_id: str) -> str | None:
    state = _run_state(client, dag_id, run_id)
    return state if state in ("success", "failed") else None


def test_backfill_reencrypts_exactly_the_partitions_of_its_range(live):
    """As an operator backfills (the Backfill form posts to the REST API, as `airflow backfill create` does to
    the database): the scheduler runs one DAG run per day of the range, each re-encrypting its data interval's
    partition, and no other."""
    bf = live.bf
    v2 = bf.ledger.current_version("bf")
    with live.client("admin") as client:
        for _ in range(30):
            created = client.post("/api/v2/backfills", json={
                "dag_id": "reencrypt__bf_customers", "from_date": "2024-01-03T00:00:00Z",
                "to_date": "2024-01-05T00:00:00Z", "max_active_runs": 1})
            # On SQLite, Airflow refuses (503, rolled back) a backfill while the scheduler holds the write lock:
            # asked again, as an operator would.
            if not (created.status_code == 503 and "Database is locked" in created.text):
                break
            time.sleep(1)
        assert created.status_code == 200, created.text

        def finished():
            runs = [r for r in _runs(client, "reencrypt__bf_customers") if r["run_type"] == "backfill"]
            return runs if len(runs) == 3 and all(r["state"] in ("success", "failed") for r in runs) else None

        runs = live.wait(finished, "the backfill's three runs", timeout=300)
    assert sorted((r["logical_date"][:10], r["state"]) for r in runs) == [
        ("2024-01-03", "success"), ("2024-01-04", "success"), ("2024-01-05", "success")]
    assert bf.census("bf_customers").under(v2) == ["2024-01-01", "2024-01-02", "2024-01-06", "2024-01-07"]
    rewrapped = bf.ledger.rows(key_class="bf", events_in=(lg.PARTITION_REWRAPPED,))
    assert sorted(r["partition"] for r in rewrapped) == ["2024-01-03", "2024-01-04", "2024-01-05"]
    assert {r["dag_id"] for r in rewrapped} == {"reencrypt__bf_customers"}
    assert all(r["run_id"].startswith("backfill__") for r in rewrapped)


def test_a_message_on_the_kms_event_queue_rotates_the_key(live):
    """Event-driven rotation: a message on the key class's SQS queue (as an EventBridge rule on AWS KMS events
    would send) starts rotate__ev through an AssetWatcher with the common-messaging MessageQueueTrigger, in the
    triggerer, against the local AWS-API server's SQS."""
    ev = live.ev
    with live.client() as client:
        assert client.patch("/api/v2/dags/rotate__ev", json={"is_paused": False}).status_code == 200
        time.sleep(5)  # let the triggerer pick up the watcher
        message_id = live.sqs.send_message(QueueUrl=live.queue_url, MessageBody=json.dumps(
            {"source": "aws.kms", "detail-type": "KMS CMK Rotation", "detail": {"key-id": "demo"}}))["MessageId"]

        def event_run():
            runs = client.get("/api/v2/dags/rotate__ev/dagRuns", params={"run_type": "asset_triggered"}).json()
            done = [r for r in runs.get("dag_runs", []) if r["state"] in ("success", "failed")]
            return done[0] if done else None

        run = live.wait(event_run, "an asset-triggered rotation", timeout=240)
    assert run["state"] == "success", live.log_tail("triggerer")
    assert ev.backend.key_state().latest_version == 2
    [created] = ev.ledger.rows(key_class="ev", events_in=(lg.VERSION_CREATED,))
    assert json.loads(created["detail"])["reason"] == f"KMS event: messages {message_id}"
    assert created["run_id"] == run["dag_run_id"]


def test_a_rotation_refuses_to_start_while_a_dag_it_must_start_is_paused(live):
    """A sweep paused by hand after its creation: the rotation fails before creating anything, naming it (read
    through the read-only API connection), since the asset event would be lost and the data left behind."""
    rt = live.rt
    before = rt.backend.key_state().latest_version
    with live.client("admin") as client:
        assert client.patch("/api/v2/dags/reencrypt__ui_customers", json={"is_paused": True}).status_code == 200
        try:
            assert client.patch("/api/v2/dags/rotate__ui", json={"is_paused": False}).status_code == 200
            conf = {"force": True, "reason": "test: paused follower"}
            run_id = live.trigger(client, "rotate__ui", conf)["dag_run_id"]
            assert live.wait(lambda: _finished(client, "rotate__ui", run_id), f"end of {run_id}") == "failed"
            ti = client.get(f"/api/v2/dags/rotate__ui/dagRuns/{run_id}/taskInstances/rotate_key").json()
            # The task log as the UI reads it (structured events; the failure's message is in the error's value).
            log = json.dumps(client.get(f"/api/v2/dags/rotate__ui/dagRuns/{run_id}/taskInstances/rotate_key/logs/1",
                                        params={"full_content": True}).json())
        finally:
            assert client.patch("/api/v2/dags/reencrypt__ui_customers", json={"is_paused": False}).status_code == 200
    assert (ti["state"], ti["try_number"]) == ("failed", 1)
    assert ("key class ui: reencrypt__ui_customers is paused: Airflow queues no asset event for a paused DAG, so this "
            "rotation would leave the data under the old version and nothing would retire it; nothing was created. "
            "Unpause it, then trigger the rotation again") in log, log[-2000:]
    assert rt.backend.key_state().latest_version == before and rt.ledger.current_version("ui") == before


def test_an_unanswered_approval_times_out_is_recorded_and_not_asked_again(live):
    """Nobody answers within approval_timeout: the scheduler resumes the approval with a timeout, which is recorded
    as a decision (timed_out) and skips the retirement, the run does not fail; the next run asks no one again."""
    rt = live.unanswered
    with live.client("admin") as client:
        first = live.trigger(client, "retire__to")["dag_run_id"]
        assert live.wait(lambda: _finished(client, "retire__to", first), f"end of {first}") == "success"
        assert {t: _task_state(client, first, t, "retire__to") for t in ("approve", "retire_versions")} == {
            "approve": "skipped", "retire_versions": "skipped"}
        again = live.trigger(client, "retire__to")["dag_run_id"]
        assert live.wait(lambda: _finished(client, "retire__to", again), f"end of {again}") == "success"
        assert _task_state(client, again, "wait_grace_period", "retire__to") == "skipped"
        details = client.get("/api/v2/dags/retire__to/dagRuns/~/hitlDetails").json()["hitl_details"]
    assert [d["task_instance"]["dag_run_id"] for d in details] == [first]
    [decision] = rt.ledger.rows(key_class="to", events_in=(lg.RETIREMENT_DECISION,))
    assert (decision["status"], decision["run_id"]) == ("timed_out", first)
    assert rt.backend.key_state().min_decryption_version == 1


def test_zz_no_canary_anywhere_in_the_live_airflow(live, openbao, record_property):
    """Last in the module, after every live run: no data value, token, KEK or DEK of the live key classes is in
    any file of the live Airflow's home (the task log files the LocalExecutor's task runners wrote, the scheduler,
    DAG processor, triggerer and API server logs), in its PostgreSQL metadata database (every table's rows, XCom
    included, and the bytes of its files in the server's data directory, dead rows included), the ledger, or a
    report of the live key classes (with the run history read from the API server).
    The KEKs and DEKs are recovered post hoc from every partition's key material by tests/oracle.py, through
    Transit; every live key class re-wraps (rewrap), so they are the keys the runs handled."""
    import re

    import sqlalchemy as sa
    from oracle import TransitKms, partition_keys, read_dataset

    from helpers import CANARY, database_dump, file_text, find_leaks, forms, postgres_files_text

    kms = TransitKms(openbao.url, openbao.token)
    classes = {"ui": (live.rt, "ui_customers"), "life": (live.life, "life_customers"),
               "to": (live.unanswered, "to_data"), "bf": (live.bf, "bf_customers")}
    for rt, _ in classes.values():
        assert rt.config.key_class.reencryption.mode == "rewrap"  # the data keys the runs handled are still there
    needles = {"data value": forms(CANARY.encode()), "OpenBao token": forms(openbao.token.encode())}
    partitions = files = 0
    for name, (rt, dataset) in classes.items():
        for folder in sorted(Path(rt.config.dataset(dataset).location).glob("*=*")):
            partitions += 1
            for file, keys in partition_keys(folder, kms.unwrap_key).items():
                files += 1
                for kind, found in (("KEK", keys.keks), ("DEK", keys.deks)):
                    for key_id, key in found.items():
                        needles[f"{kind} {name}/{folder.name}/{file}/{key_id}"] = forms(key)
                        sample = (f"{kind} {name}/{folder.name}/{file}/{key_id}", key)
    # life's data is the demo's (no canary in it): its e-mail addresses and phone numbers, read back by the oracle
    # (not its 9-digit SSNs: numbers of 9 digits are everywhere in a database).
    for partition, facts in read_dataset(live.life.config.dataset("life_customers").location, kms).items():
        for column in ("email", "phone"):
            for i, value in enumerate(facts.table.column(column).to_pylist()[:10]):
                needles[f"data value life/{partition}/{column}#{i}"] = forms(value.encode())

    # A report of the live key classes, as the compliance report DAG writes it, with the API server's run history.
    from keyrotation.reports import AirflowHistory, KeyClassEvidence, Period, write_report

    passwords = json.loads((live.home / "simple_auth_manager_passwords.json.generated").read_text())
    now = datetime.now(UTC)
    report_dir = live.home.parent / "canary_report"
    write_report([KeyClassEvidence(rt.config.key_class, rt.backend.key_state(), rt.censuses())
                  for rt, _ in classes.values()], live.rt.ledger, str(report_dir),
                 Period(now - timedelta(days=1), now + timedelta(minutes=1)),
                 history=AirflowHistory(live.url, "viewer", passwords["viewer"]))

    task_log = re.compile(r"dag_id=[^/]+/run_id=[^/]+/task_id=[^/]+/.*\.log$")
    haystacks, where = {}, {"task log files": 0, "component logs": 0, "other home files": 0,
                            "metadata DB tables": 0, "metadata DB files": 0, "ledger DB files": 0, "report files": 0}
    for path in sorted(p for p in live.home.rglob("*") if p.is_file()):
        haystacks[str(path)] = file_text(path)
        rel = path.relative_to(live.home).as_posix()
        if task_log.search(rel):
            where["task log files"] += 1
        elif rel.endswith(".log"):
            where["component logs"] += 1
        else:
            where["other home files"] += 1
    def metadata_db() -> dict[str, str]:
        rows = database_dump(live.database_url)
        files, count = postgres_files_text(live.database_url)
        where["metadata DB tables"], where["metadata DB files"] = rows.count("\n== ") + 1, count
        return {"metadata DB rows": rows, "metadata DB files": files}

    haystacks.update(metadata_db())
    for path in sorted(live.home.parent.glob("ledger.db*")):
        haystacks[str(path)] = file_text(path)
        where["ledger DB files"] += 1
    for path in sorted(report_dir.iterdir()):
        haystacks[str(path)] = file_text(path)
        where["report files"] += 1

    # The scan read what it must have: task logs of many runs, every component's log, XCom rows.
    assert where["task log files"] >= 20, where
    assert {f"{c}.log" for c in ("scheduler", "api-server", "dag-processor", "triggerer")} <= {
        Path(p).name for p in haystacks}
    logs_text = "".join(t for p, t in haystacks.items() if task_log.search(p))
    assert "rewrapped" in logs_text, "no sweep's task log was read"
    metadata = sa.create_engine(live.database_url)
    with metadata.connect() as db:
        xcom_rows = db.execute(sa.text("SELECT count(*) FROM xcom")).scalar_one()
    assert xcom_rows > 0 and "== xcom" in haystacks["metadata DB rows"] and where["metadata DB tables"] > 50, where
    assert partitions == 15 and files >= 15
    kinds: dict[str, int] = {}
    for what in needles:
        kind = what[:3] if what.startswith(("KEK", "DEK")) else "data value" if "data value" in what else what
        kinds[kind] = kinds.get(kind, 0) + 1

    leaks = find_leaks(needles, haystacks)
    record_property("canary_scan", {"backend": "vault_transit", "where": where, "xcom_rows": xcom_rows,
                                    "chars": sum(len(t) for t in haystacks.values()), "partitions": partitions,
                                    "data_files": files, "canaries": len(needles), "canaries_by_kind": kinds,
                                    "hits": len(leaks)})
    assert leaks == [], leaks

    # The scan can fail: a DEK printed into a task log (base64, off alignment), the token stored in an Airflow
    # Variable (in the metadata DB), a phone number of life's data in the ledger; each is found when the same files
    # are read again. (Not planted in a component's log: the running component writes over an appended line.)
    import base64

    some_log = next(p for p in sorted(haystacks) if task_log.search(p))
    with open(some_log, "a") as log:
        log.write(json.dumps({"event": "debug key=" + base64.b64encode(b"k=" + sample[1]).decode()}) + "\n")
    with metadata.begin() as db:
        db.execute(sa.text("INSERT INTO variable (key, val, is_encrypted) VALUES (:key, :val, false)"),
                   {"key": "planted", "val": openbao.token})
    metadata.dispose()
    phone = next(k for k in needles if "phone" in k)
    live.life.ledger.record(lg.REPORT_WRITTEN, "*", None, detail={"note": max(needles[phone], key=len)})
    again = {p: file_text(Path(p)) for p in (str(some_log), *map(str, live.home.parent.glob("ledger.db*")))}
    found = find_leaks(needles, {**again, **metadata_db()})
    assert {(what, Path(where).name) for what, where in found} >= {
        (sample[0], Path(some_log).name), ("OpenBao token", "metadata DB rows"), ("OpenBao token", "metadata DB files"),
        (phone, "ledger.db")}, found
