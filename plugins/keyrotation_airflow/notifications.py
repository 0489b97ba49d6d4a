"""Notices of a key class through Airflow's notifiers: mail (the smtp provider's ``SmtpNotifier``) and Slack
(the slack provider's ``SlackWebhookNotifier``), as the key class's ``notifications`` section says.

Three events: a retirement waits for an approval (a notifier of the approval task), a task of ``rotate__*`` or
``retire__*`` failed, or a ``reencrypt__*`` run failed (failure callbacks), and the key class is past its
cryptoperiod or behind (the ``check_policy`` task of ``rotate__*``, :mod:`keyrotation_airflow.operators.policy`).

A notice names the key class, the DAG, the run, what happened and a link into the Airflow UI, built on
``[api] base_url``. It carries ids, versions, counts and error texts only, never key material, a token or a
data value: error texts go through Airflow's secrets masker first, as the task logs do.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier
from airflow.providers.smtp.notifications.smtp import SmtpNotifier
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import BaseNotifier, conf
from airflow.sdk.log import redact

from keyrotation.config import KeyClass, Notifications, human_duration

APPROVAL_PENDING, FAILED, OVERDUE = "approval_pending", "failed", "overdue"
ERROR_CHARS = 600  # of an error text in a notice: the task log has the rest
INVENTORY_PATH = "/keyrotation/inventory"  # the key inventory view of the keyrotation plugin


@dataclass(frozen=True)
class Notice:
    """One notice: a subject, labelled facts and a link; rendered as mail (HTML) and as a Slack message."""

    subject: str
    facts: tuple[tuple[str, str], ...]
    link: str

    def html(self) -> str:
        rows = "".join(f"<tr><th align='left'>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
                       for label, value in self.facts)
        link = html.escape(self.link, quote=True)
        return (f"<p>{html.escape(self.subject)}</p><table>{rows}</table>"
                f"<p><a href=\"{link}\">{link}</a></p>")

    def slack(self) -> str:
        lines = [f"*{_slack_escape(self.subject)}*"]
        lines += [f"{_slack_escape(label)}: {_slack_escape(value)}" for label, value in self.facts]
        return "\n".join([*lines, f"<{self.link}>"])


def _slack_escape(text: str) -> str:
    """Slack mrkdwn treats &, < and > as markup: an error text must not become a link or a mention."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def ui_base_url() -> str:
    """``[api] base_url``, as the task log links use it (the same fallback when it is not set)."""
    return (conf.get("api", "base_url", fallback=None) or "http://localhost:8080").rstrip("/")


def approval_link(context: Any) -> str:
    """The approval's page in the UI (``.../required_actions?map_index=-1``), from the HITL task's context."""
    base = ui_base_url()
    link = urlsplit(HITLOperator.generate_link_to_ui_from_context(context=context, base_url=base))
    # The provider keeps only the scheme and host of base_url; an API server may be served under a path.
    return urlunsplit(link._replace(path=urlsplit(base).path + link.path))


def run_link(dag_id: str, run_id: str) -> str:
    return f"{ui_base_url()}/dags/{dag_id}/runs/{quote(run_id)}"


def clean_error(error: Any) -> str:
    """An error text fit for a notice: through the secrets masker (a connection's password, anything a task
    masked), and cut to :data:`ERROR_CHARS`."""
    text = str(redact(str(error))).strip() or type(error).__name__
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"


def _task_label(ti: Any) -> str:
    map_index = getattr(ti, "map_index", -1)
    return f"{ti.task_id}[{map_index}]" if map_index is not None and map_index >= 0 else ti.task_id


def approval_notice(key_class: str, context: Any) -> Notice:
    ti, task = context["ti"], context["task"]
    timeout = getattr(task, "response_timeout", None)
    facts = [("Key class", key_class), ("DAG", ti.dag_id), ("Run", ti.run_id), ("Task", ti.task_id),
             ("What happened", f"approval pending: {task.subject}")]
    if timeout:
        facts.append(("Answer within", f"{human_duration(timeout)} (unanswered, the versions stay enabled)"))
    return Notice(f"[keyrotation] {key_class}: approval pending in {ti.dag_id}", tuple(facts), approval_link(context))


def failure_notice(key_class: str, context: Any) -> Notice:
    """A failed task (a task's failure callback: the context has its exception), or a failed run (a DAG's
    failure callback: the context has a reason, and the last failed task when there is one)."""
    ti = context.get("ti")
    dag_run = context.get("dag_run")
    dag_id = ti.dag_id if ti is not None else context["dag"].dag_id
    run_id = ti.run_id if ti is not None else getattr(dag_run, "run_id", None) or context["run_id"]
    facts = [("Key class", key_class), ("DAG", dag_id), ("Run", run_id)]
    if "reason" in context:  # the run failed
        subject = f"[keyrotation] {key_class}: run of {dag_id} failed"
        what = f"the run failed ({context['reason']})"
        if ti is not None:
            what += f"; last failed task: {_task_label(ti)}"
        link = ti.log_url if ti is not None else run_link(dag_id, run_id)
    else:
        subject = f"[keyrotation] {key_class}: {ti.task_id} failed in {dag_id}"
        facts.append(("Task", f"{_task_label(ti)} (try {ti.try_number})"))
        what = f"failed: {clean_error(context.get('exception') or 'no error recorded')}"
        link = ti.log_url
    return Notice(subject, (*facts, ("What happened", what)), link)


def overdue_notice(key_class: str, reasons: Sequence[str], context: Any) -> Notice:
    ti = context["ti"]
    states = ", ".join(reason.split(":")[0] for reason in reasons)
    facts = (("Key class", key_class), ("DAG", ti.dag_id), ("Run", ti.run_id), ("Task", ti.task_id),
             ("What happened", "; ".join(reasons)), ("Key inventory", ui_base_url() + INVENTORY_PATH))
    return Notice(f"[keyrotation] {key_class}: {states}", facts, ti.log_url)


def send(notice: Notice, channels: Notifications, context: Any) -> tuple[list[str], list[str]]:
    """Send ``notice`` to every configured channel (each is tried); the channels it went to, and those it did
    not, with why."""
    # The channel notifiers template nothing from the DAG (under dag.test a DAG callback's DAG has no template
    # environment, which the mail notifier would ask for to render a sender taken from the connection).
    context = {key: value for key, value in context.items() if key != "dag"}
    sent, failed = [], []
    if channels.smtp is not None:
        smtp = channels.smtp
        try:
            SmtpNotifier(to=smtp.to, cc=smtp.cc or None, from_email=smtp.from_email, subject=notice.subject,
                         html_content=notice.html(), smtp_conn_id=smtp.conn_id).notify(context)
            sent.append(f"smtp ({smtp.conn_id})")
        except Exception as exc:  # a channel that fails must not keep the notice from the others
            failed.append(f"smtp ({smtp.conn_id}): {clean_error(exc)}")
    if channels.slack is not None:
        try:
            SlackWebhookNotifier(slack_webhook_conn_id=channels.slack.conn_id, text=notice.slack()).notify(context)
            sent.append(f"slack ({channels.slack.conn_id})")
        except Exception as exc:
            failed.append(f"slack ({channels.slack.conn_id}): {clean_error(exc)}")
    return sent, failed


class KeyClassNotifier(BaseNotifier):
    """
    Notify a key class's channels of ``event`` (``approval_pending`` or ``failed``): as a HITL task's notifier,
    or as a task's or DAG's ``on_failure_callback``. The channels are those of the config the DAG was built
    from, so a failure caused by a config broken since is still reported. A channel that fails is logged and
    does not fail the task: the approval is asked for, and the failure recorded, all the same.
    """

    def __init__(self, key_class: str, notifications: Notifications, event: str) -> None:
        super().__init__()
        if event not in (APPROVAL_PENDING, FAILED):
            raise ValueError(f"KeyClassNotifier sends approval_pending or failed notices, not {event!r}")
        self.key_class = key_class
        self.notifications = notifications
        self.event = event

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """Nothing to render: a notice is built from the context in code, so an error text is never read as a
        template (and a DAG callback under ``dag.test`` gets a DAG that has no template environment)."""

    def notify(self, context: Any) -> None:
        build = approval_notice if self.event == APPROVAL_PENDING else failure_notice
        notice = build(self.key_class, context)
        sent, failed = send(notice, self.notifications, context)
        for error in failed:
            self.log.warning("key class %s: notice %r not sent to %s", self.key_class, notice.subject, error)
        if sent:
            self.log.info("key class %s: notice %r sent to %s", self.key_class, notice.subject, ", ".join(sent))


def _notifier(kc: KeyClass, event: str) -> KeyClassNotifier | None:
    if kc.notifications is None or event not in kc.notifications.events:
        return None
    return KeyClassNotifier(kc.name, kc.notifications, event)


def approval_notifiers(kc: KeyClass) -> list[BaseNotifier]:
    """``notifiers=`` of the retirement's approval task."""
    notifier = _notifier(kc, APPROVAL_PENDING)
    return [notifier] if notifier else []


def failure_callbacks(kc: KeyClass) -> dict[str, Any]:
    """``on_failure_callback`` for ``default_args`` (each failed task of rotate__/retire__), or a DAG's own
    (one notice per failed reencrypt__ run, where every failed mapped chunk would otherwise send one)."""
    notifier = _notifier(kc, FAILED)
    return {"on_failure_callback": notifier} if notifier else {}
