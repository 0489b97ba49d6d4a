"""The ``check_policy`` task of ``rotate__*``: is the key class past its cryptoperiod or behind? Then say so.

It runs on every rotation run, after the rotation whatever its outcome (a teardown: a rotation that failed
is when a key goes past its cryptoperiod), and does not decide the run's state. It exists only where the key
class notifies on ``overdue``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from keyrotation.config import KeyClass, Notifications
from keyrotation.status import overdue_reasons
from keyrotation_airflow.notifications import OVERDUE, overdue_notice, send
from keyrotation_airflow.operators.base import KeyClassOperator
from keyrotation_airflow.operators.rotation import as_bool
from keyrotation_airflow.task_runtime import denied_fails_fast


class CheckPolicyOperator(KeyClassOperator):
    """
    Check the key class against its policy (age of the current version, data behind) with the ``report``
    role, and send an ``overdue`` notice when it is past either. Fails, and is retried, when no channel
    took the notice. Returns whether it was overdue and why (no key material: versions and counts).

    :param key_class: Key class name. (templated)
    :param notifications: The key class's channels, as the DAG was built.
    :param dry_run: Skip: a dry run sends nothing. (templated)
    """

    role = "report"
    template_fields: Sequence[str] = ("key_class", "dry_run")
    ui_color = "#e8e0f4"

    def __init__(self, *, key_class: str, notifications: Notifications, dry_run: bool | str = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class
        self.notifications = notifications
        self.dry_run = dry_run

    def execute(self, context: Any) -> dict:
        if as_bool(self.dry_run):
            raise AirflowSkipException(f"key class {self.key_class}: dry run: no policy check, nothing sent")
        with denied_fails_fast():
            rt = self.runtime
            state, censuses = rt.backend.key_state(), rt.censuses()
        reasons = overdue_reasons(rt.config.key_class, state, rt.ledger.current_reference(rt.name), censuses,
                                  datetime.now(UTC))
        if not reasons:
            self.log.info("key class %s: within its cryptoperiod and not behind", rt.name)
            return {"overdue": False, "reasons": []}
        notice = overdue_notice(rt.name, reasons, context)
        self.log.warning("key class %s: %s", rt.name, "; ".join(reasons))
        sent, failed = send(notice, self.notifications, context)
        if not sent:
            raise AirflowException(f"key class {rt.name}: the overdue notice was not sent: {'; '.join(failed)}")
        for error in failed:
            self.log.warning("key class %s: notice not sent to %s", rt.name, error)
        self.log.info("key class %s: notice %r sent to %s", rt.name, notice.subject, ", ".join(sent))
        return {"overdue": True, "reasons": reasons}


def policy_check(kc: KeyClass, **kwargs: Any) -> CheckPolicyOperator | None:
    """The ``check_policy`` task of ``rotate__<key class>`` as a teardown, where the key class notifies on
    ``overdue``; None otherwise. Chain it after the rotation's last task."""
    if kc.notifications is None or OVERDUE not in kc.notifications.events:
        return None
    return CheckPolicyOperator(task_id="check_policy", key_class=kc.name, notifications=kc.notifications,
                               **kwargs).as_teardown()
