"""Notifications (issue 16, item 4): per key class, by mail (a real SMTP server on loopback) and Slack (a real
HTTP server standing in for the webhook), when a retirement waits for an approval, when a rotate__/retire__
task or a reencrypt__ run fails, and when a key class is past its cryptoperiod or behind. A notice names the
key class, the DAG, the run, what happened and the link; never a token, a password or a data value."""

from __future__ import annotations

import html
import json
import re
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest

from dag_runs import key_class_dags, state, task_states
from helpers import CANARY, days, runtime, seed, sweep
from keyrotation.config import load_key_class_file
from keyrotation.errors import ConfigError
from keyrotation.ledger import RunContext
from keyrotation.rotation import update_reference

pytest_plugins = ["smtp_server"]

BASE_URL = "https://airflow.example.test/ops"  # with a path: an API server behind a reverse proxy's prefix
TO = ["keys@example.test", "oncall@example.test"]
NOTIFY = """\
  notifications:
    smtp: {conn_id: smtp_notify, to: [keys@example.test, oncall@example.test]}
    slack: {conn_id: slack_notify}
    events: [EVENTS]
"""
WEBHOOK_TOKEN = "T0KEYROT/B0KEYROT/" + secrets.token_hex(12)


class Webhook(ThreadingHTTPServer):
    """Slack's Incoming Webhook on loopback: records each POST (path, JSON body) and answers ``ok``."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict]] = []
        super().__init__(("127.0.0.1", 0), _WebhookHandler)

    def texts(self) -> list[str]:
        assert {path for path, _ in self.posts} <= {f"/services/{WEBHOOK_TOKEN}"}
        return [body["text"] for _, body in self.posts]


class _WebhookHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts.append((self.path, json.loads(body)))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def channels(smtp_server, monkeypatch):
    """The SMTP server and the webhook, reached through AIRFLOW_CONN_* connections; links on BASE_URL."""
    webhook = Webhook()
    thread = threading.Thread(target=webhook.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_NOTIFY", smtp_server.airflow_connection())
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_NOTIFY", json.dumps({
        "conn_type": "slackwebhook", "host": f"http://127.0.0.1:{webhook.server_address[1]}/services",
        "password": WEBHOOK_TOKEN}))
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", BASE_URL)
    yield smtp_server, webhook
    webhook.shutdown()
    webhook.server_close()


def _notifying(make_key_class, name: str, events: str = "approval_pending, failed, overdue", **overrides):
    return make_key_class(name=name, dataset=f"{name}_data",
                          **{"  retire:\n": NOTIFY.replace("EVENTS", events) + "  retire:\n", **overrides})


def _facts(mail) -> list[tuple[str, str]]:
    """The labelled facts of a mail, as its reader sees them."""
    rows = re.findall(r"<tr><th align='left'>(.*?)</th><td>(.*?)</td></tr>", mail.body())
    return [(html.unescape(label), html.unescape(value)) for label, value in rows]


def _links(mail) -> list[str]:
    return [html.unescape(link) for link in re.findall(r'<a href="(.*?)">', mail.body())]


def _slack(subject: str, facts: list[tuple[str, str]], link: str) -> str:
    return "\n".join([f"*{subject}*", *(f"{label}: {value}" for label, value in facts), f"<{link}>"])


def _no_secrets(mails, webhook, secrets_: list[str]) -> None:
    texts = [mail.text() for mail in mails] + [json.dumps(body) for _, body in webhook.posts]
    assert texts and all(s and s not in text for s in secrets_ for text in texts)


# -- config ----------------------------------------------------------------------------------------

KEY_CLASS = """\
key_class:
  name: pii
  backend: vault_transit
  key_ref: pii
  conn_id: vault_default
  rotation: {cryptoperiod: 90d}
"""


def test_notifications_config_defaults_and_errors_naming_the_field(tmp_path):
    path = tmp_path / "pii.yaml"
    path.write_text(KEY_CLASS)
    assert load_key_class_file(path).key_class.notifications is None  # absent: no notifications
    path.write_text(KEY_CLASS + "  notifications:\n    smtp: {to: keys@example.test}\n")
    notifications = load_key_class_file(path).key_class.notifications
    assert notifications.model_dump() == {
        "smtp": {"conn_id": "smtp_default", "to": ["keys@example.test"], "cc": [], "from_email": None},
        "slack": None, "events": ["approval_pending", "failed", "overdue"]}
    path.write_text(KEY_CLASS + "  notifications: {slack: {}, events: [failed]}\n")
    assert load_key_class_file(path).key_class.notifications.model_dump() == {
        "smtp": None, "slack": {"conn_id": "slack_default"}, "events": ["failed"]}

    for section, problem in [
        ("{smtp: {to: [keys@example.test, ops]}}",
         "field key_class.notifications.smtp.to: Value error, not an email address: 'ops'"),
        ("{smtp: {to: []}}",
         "field key_class.notifications.smtp.to: List should have at least 1 item after validation, not 0"),
        ("{events: [failed]}", "field key_class.notifications: Value error, name at least one channel: smtp, slack"),
        ("{slack: {}, events: [late]}",
         "field key_class.notifications.events[0]: Input should be 'approval_pending', 'failed' or 'overdue'"),
        ("{slack: {}, on: [failed]}", "field key_class.notifications: Value error, unknown key 'on' (YAML reads a "
                                      "bare on as true): list the events under 'events'"),
        ("{slack: {channel: '#keys'}}",
         "field key_class.notifications.slack.channel: Extra inputs are not permitted"),
    ]:
        path.write_text(KEY_CLASS + f"  notifications: {section}\n")
        with pytest.raises(ConfigError) as err:
            load_key_class_file(path)
        assert str(err.value) == f"{path}: key class 'pii': {problem}"


def test_without_notifications_the_dags_have_no_notifier_and_no_check(make_key_class):
    make_key_class(name="quiet", dataset="quiet_data", **{"approval_required: false": "approval_required: true"})
    dags = key_class_dags("quiet")
    assert set(dags["rotate__quiet"].task_ids) == {"rotate_key", "wait_version_ready", "update_reference"}
    assert dags["reencrypt__quiet_data"].on_failure_callback is None
    assert all(not task.on_failure_callback for dag in dags.values() for task in dag.tasks)
    assert dags["retire__quiet"].get_task("approve").notifiers == []


# -- through the DAGs ----------------------------------------------------------------------------------

def _answer_reject_once_asked(smtp_server, dag_id: str, problems: list) -> threading.Thread:
    """Once the approval mail is in and the task waits for input, reject it as the UI's Required Actions page
    does (the API server's own handler), so that ``dag.test`` goes on."""
    # Imported here, in the test's thread: two threads importing Airflow's namespace packages at once deadlock.
    from airflow.api_fastapi.core_api.datamodels.hitl import UpdateHITLDetailPayload
    from airflow.api_fastapi.core_api.routes.public.hitl import update_hitl_detail
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    def answer() -> None:
        try:
            smtp_server.wait_for(1, timeout=60)
            deadline = time.monotonic() + 30
            while True:
                with create_session() as session:
                    ti = session.query(TaskInstance).filter_by(dag_id=dag_id, task_id="approve").one_or_none()
                    if ti is not None and str(ti.state) == "awaiting_input":
                        update_hitl_detail(dag_id, ti.run_id, "approve",
                                           UpdateHITLDetailPayload(chosen_options=["Reject"], params_input={}),
                                           user=SimpleNamespace(get_id=lambda: "ana", get_name=lambda: "ana"),
                                           session=session)
                        return
                assert time.monotonic() < deadline, "the approval task never waited for input"
                time.sleep(0.2)
        except BaseException as exc:  # reported by the test, not lost in the thread
            problems.append(exc)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return thread


@pytest.mark.airflow
def test_a_pending_approval_is_mailed_and_posted_with_the_link_to_answer_it(make_key_class, vault, openbao, channels,
                                                                             airflow_db):
    smtp_server, webhook = channels
    rt = runtime(_notifying(make_key_class, "notify_ask", **{"approval_required: false": "approval_required: true"}),
                 vault)
    seed(rt, "notify_ask_data", days("2024-09-01", 2))
    v2 = rt.backend.rotate()
    update_reference(rt.name, v2, rt.ledger, RunContext(actor="ana"))
    sweep(rt, "notify_ask_data", v2)  # the census gate opens: v1 is due for retirement, with an approval

    dag = key_class_dags("notify_ask")["retire__notify_ask"]
    problems: list = []
    answering = _answer_reject_once_asked(smtp_server, "retire__notify_ask", problems)
    run = dag.test()
    answering.join(timeout=30)
    assert problems == []
    assert state(run) == "success"
    assert task_states(run) == {"census_gate": "success", "wait_grace_period": "success", "approve": "success",
                                "retire_versions": "skipped"}  # rejected: nothing retired

    [mail] = smtp_server.messages
    _no_secrets([mail], webhook, [openbao.token, smtp_server.password, WEBHOOK_TOKEN, CANARY])
    subject = "[keyrotation] notify_ask: approval pending in retire__notify_ask"
    link = f"{BASE_URL}/dags/retire__notify_ask/runs/{run.run_id}/tasks/approve/required_actions?map_index=-1"
    facts = [("Key class", "notify_ask"), ("DAG", "retire__notify_ask"), ("Run", run.run_id), ("Task", "approve"),
             ("What happened", f"approval pending: {dag.get_task('approve').subject}"),
             ("Answer within", "7 days (unanswered, the versions stay enabled)")]
    assert (mail.subject, mail.message["To"], mail.message["From"]) == (
        subject, ", ".join(TO), "keyrotation@example.test")
    assert (mail.rcpt_tos, mail.login) == (tuple(TO), "keyrotation")
    assert _facts(mail) == facts
    assert _links(mail) == [link]
    assert webhook.texts() == [_slack(subject, facts, link)]


@pytest.mark.airflow
def test_a_failed_rotation_and_an_overdue_key_class_are_notified(make_key_class, vault, openbao, channels, airflow_db):
    smtp_server, webhook = channels
    rt = runtime(_notifying(make_key_class, "notify_due", **{
        "cryptoperiod: 90d": "cryptoperiod: 1s", "  reencryption:\n": "  reencryption:\n    behind_after: 0s\n"}),
        vault)
    seed(rt, "notify_due_data", days("2024-09-01", 3))  # under v1, the data holding the canary
    v2 = rt.backend.rotate()
    update_reference(rt.name, v2, rt.ledger, RunContext(actor="ana"))  # and not re-encrypted: behind
    time.sleep(1.1)  # v2 past its cryptoperiod of one second

    run = key_class_dags("notify_due")["rotate__notify_due"].test(run_conf={"reason": ""})
    assert state(run) == "failed"  # the check after it decides nothing about the run
    assert task_states(run) == {"rotate_key": "failed", "wait_version_ready": "upstream_failed",
                                "update_reference": "upstream_failed", "check_policy": "success"}

    failed, overdue = smtp_server.messages
    _no_secrets([failed, overdue], webhook, [openbao.token, smtp_server.password, WEBHOOK_TOKEN, CANARY])
    common = [("Key class", "notify_due"), ("DAG", "rotate__notify_due"), ("Run", run.run_id)]
    runs = f"{BASE_URL}/dags/rotate__notify_due/runs/{quote(run.run_id)}/tasks"
    expected = [
        ("[keyrotation] notify_due: rotate_key failed in rotate__notify_due",
         [*common, ("Task", "rotate_key (try 1)"),
          ("What happened", "failed: key class notify_due: a manual rotation needs a reason; trigger it again with "
                            "the 'reason' parameter set (it goes to the ledger)")],
         f"{runs}/rotate_key?try_number=1"),
        ("[keyrotation] notify_due: past its cryptoperiod, behind",
         [*common, ("Task", "check_policy"),
          ("What happened", "past its cryptoperiod: v2 is 0.0 days old (cryptoperiod: 1 second); behind: 3 "
                            "partitions still under versions older than v2 (or blocking) 0.0 days after it became "
                            "current (policy: 0.0 days)"),
          ("Key inventory", f"{BASE_URL}/keyrotation/inventory")],
         f"{runs}/check_policy?try_number=1"),
    ]
    for mail, (subject, facts, link) in zip((failed, overdue), expected, strict=True):
        assert (mail.subject, mail.rcpt_tos, _facts(mail), _links(mail)) == (subject, tuple(TO), facts, [link])
    assert webhook.texts() == [_slack(*notice) for notice in expected]


@pytest.mark.airflow
def test_a_failed_reencrypt_run_sends_one_notice_not_one_per_chunk(make_key_class, vault, channels, airflow_db):
    smtp_server, webhook = channels
    config = _notifying(make_key_class, "notify_run", events="failed", mode="reencrypt", chunk_size=1)
    rt = runtime(config, vault)
    seed(rt, "notify_run_data", days("2024-09-01", 2))
    update_reference(rt.name, rt.backend.rotate(), rt.ledger, RunContext(actor="ana"))
    # ssn dropped from encrypted_columns: a re-encryption would write it in plaintext, so every chunk is refused.
    path = Path(config.source)
    path.write_text(path.read_text().replace("encrypted_columns: [email, ssn]", "encrypted_columns: [email]"))

    run = key_class_dags("notify_run")["reencrypt__notify_run_data"].test(run_conf={"scope": "sweep"})
    assert state(run) == "failed"
    assert [s for name, s in sorted(task_states(run).items()) if name.startswith("reencrypt[")] == ["failed"] * 2

    [mail] = smtp_server.messages  # sent before dag.test returns: the server accepts a mail before the 250
    assert len(webhook.posts) == 1
    facts = dict(_facts(mail))
    assert mail.subject == "[keyrotation] notify_run: run of reencrypt__notify_run_data failed"
    assert facts["What happened"] in {f"the run failed (task_failure); last failed task: reencrypt[{i}]"
                                      for i in (0, 1)}
    index = facts["What happened"][-2]
    assert _facts(mail) == [("Key class", "notify_run"), ("DAG", "reencrypt__notify_run_data"), ("Run", run.run_id),
                            ("What happened", facts["What happened"])]
    assert _links(mail) == [
        f"{BASE_URL}/dags/reencrypt__notify_run_data/runs/{quote(run.run_id)}/tasks/reencrypt/mapped/{index}"
        "?try_number=1"]


def test_an_error_text_goes_through_the_secrets_masker_and_is_cut(smtp_server, monkeypatch):
    from airflow.sdk.log import mask_secret

    from keyrotation.config import Notifications
    from keyrotation_airflow.notifications import ERROR_CHARS, FAILED, KeyClassNotifier

    monkeypatch.setenv("AIRFLOW_CONN_SMTP_NOTIFY", smtp_server.airflow_connection())
    secret = "s.MASKED-" + secrets.token_hex(8)
    mask_secret(secret)  # as Airflow does for a connection's password when a task reads it
    ti = SimpleNamespace(dag_id="retire__pii", run_id="manual__1", task_id="retire_versions", map_index=-1,
                         try_number=2, log_url="http://localhost:8080/dags/retire__pii/runs/manual__1/tasks/x")
    error = RuntimeError(f"KMS said no to token {secret} " + "x" * 2 * ERROR_CHARS)
    notifier = KeyClassNotifier("pii", Notifications.model_validate({"smtp": {"conn_id": "smtp_notify",
                                                                              "to": TO}}), FAILED)
    notifier.notify({"ti": ti, "exception": error})
    [mail] = smtp_server.wait_for(1)
    what = dict(_facts(mail))["What happened"]
    assert secret not in mail.text() and what.startswith("failed: KMS said no to token *** xxx")
    assert len(what) == len("failed: ") + ERROR_CHARS and what.endswith("x…")
