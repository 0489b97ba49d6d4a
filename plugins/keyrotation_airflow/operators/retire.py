"""Operator of the retirement DAG: retire old versions through the one retirement gate."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from keyrotation import ledger as lg
from keyrotation.config import human_duration
from keyrotation.errors import RetirementNotPossible, RetirementRefused
from keyrotation.retirement import retire
from keyrotation_airflow.operators.rotation import as_bool
from keyrotation_airflow.runtime import denied_fails_fast, key_class_runtime, run_context


def approval_from_hitl(result: dict | None) -> dict | None:
    """The ledger's approval record from an ApprovalOperator's result (XCom or trigger event)."""
    if not result:
        return None
    user = result.get("responded_by_user") or result.get("responded_by") or ""
    if isinstance(user, dict):
        user = user.get("name") or user.get("id") or ""
    return {
        "approved": ApprovalOperator.APPROVE in (result.get("chosen_options") or []),
        "approved_by": str(user),
        "responded_at": str(result.get("responded_at") or ""),
    }


class RetirementApprovalOperator(ApprovalOperator):
    """
    Ask a person to approve retiring a key class's old versions (Browse -> Required Actions), showing
    the census the gate saw; record the decision, the person and the time in the ledger. Reject skips
    the retirement, so the versions stay enabled.

    :param key_class: Key class name. (templated)
    """

    template_fields: Sequence[str] = (*ApprovalOperator.template_fields, "key_class")

    def __init__(self, *, key_class: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        decision = approval_from_hitl(event) if "error" not in event else None
        gate = context["ti"].xcom_pull(task_ids="census_gate") or {}
        asked = {"retire_below": gate.get("retire_below"), "census": gate.get("datasets")}
        rt = key_class_runtime(self.key_class, "retire")
        if decision is not None:
            rt.ledger.record(lg.RETIREMENT_DECISION, rt.name, run_context(context),
                             status="approved" if decision["approved"] else "rejected",
                             actor=decision["approved_by"], detail={**decision, **asked})
        else:  # no answer within response_timeout: recorded, and not asked again for the same versions
            rt.ledger.record(lg.RETIREMENT_DECISION, rt.name, run_context(context), status="timed_out",
                             detail={"error": str(event.get("error")), **asked})
        return super().execute_complete(context, event)


def previous_refusal(ledger: Any, key_class: str, retire_below: int, census: list[dict] | None) -> dict | None:
    """The last rejected or timed-out decision on retiring below ``retire_below`` while the census was the same;
    None if there is none, or the census has changed since."""
    for row in reversed(ledger.rows(key_class=key_class, events_in=(lg.RETIREMENT_DECISION,))):
        detail = json.loads(row["detail"] or "{}")
        if detail.get("retire_below") != retire_below:
            continue
        if row["status"] in ("rejected", "timed_out") and detail.get("census") == census:
            return row
        return None
    return None


class WaitGracePeriodOperator(BaseOperator):
    """
    Wait for the grace period since the current version became the reference, deferred to the triggerer
    (no worker slot; the task shows as deferred until its end), before anyone is asked to approve. Skips when
    no version is due for retirement, or when retiring the same versions was rejected (or not answered in
    time) and neither a new version nor the census has changed since: nothing asks twice, unless the run is
    triggered with ``ask_again``. Returns the grace end, the reference version and who made it current.

    :param key_class: Key class name. (templated)
    :param ask_again: Ask again after a rejection or a timeout of the same request. (templated)
    """

    template_fields: Sequence[str] = ("key_class", "ask_again")
    ui_color = "#d7e8f4"

    def __init__(self, *, key_class: str, ask_again: bool | str = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class
        self.ask_again = ask_again

    def execute(self, context: Any) -> dict:
        with denied_fails_fast():
            rt = key_class_runtime(self.key_class, "retire")
            plan = rt.retirement_plan()
        if plan is None:
            raise AirflowSkipException(f"key class {rt.name}: no version is due for retirement")
        gate = context["ti"].xcom_pull(task_ids="census_gate") or {}
        refusal = previous_refusal(rt.ledger, rt.name, plan.new_min_version, gate.get("datasets"))
        if refusal is not None and not as_bool(self.ask_again):
            raise AirflowSkipException(
                f"key class {rt.name}: retiring v{plan.versions[0]}..v{plan.versions[-1]} was {refusal['status']} "
                f"(by {refusal['actor'] or 'nobody'}, {refusal['recorded_at']:%Y-%m-%d %H:%M} UTC, run "
                f"{refusal['run_id']}); not asked again until a new version or the census changes, or a run with "
                "ask_again")
        reference = rt.ledger.current_reference(rt.name) or {}
        since = reference.get("recorded_at")
        if since is None:
            raise AirflowFailException(f"key class {rt.name}: no time recorded for reference v{plan.reference_version}")
        since = since if since.tzinfo else since.replace(tzinfo=UTC)
        end = since + rt.config.key_class.retire.grace_period
        info = {"grace_end": end.isoformat(), "reference_version": plan.reference_version,
                "current_since": since.isoformat(), "rotated_by": reference.get("actor") or "a schedule",
                "versions": plan.versions, "retire_below": plan.new_min_version}
        if end > datetime.now(UTC):
            self.log.info("key class %s: grace period of %s since v%s became current ends at %s; waiting in the "
                          "triggerer", rt.name, human_duration(rt.config.key_class.retire.grace_period),
                          plan.reference_version, end.isoformat())
            self.defer(trigger=DateTimeTrigger(moment=end), method_name="execute_complete", kwargs={"info": info})
        return info

    def execute_complete(self, context: Any, event: Any = None, info: dict | None = None) -> dict:
        self.log.info("grace period over (%s)", (info or {}).get("grace_end"))
        return info or {}


class RetireKeyVersionsOperator(BaseOperator):
    """
    Retire the key class's versions older than the newest ``versions_kept`` (raise
    ``min_decryption_version``, and trim if the policy says so), only if the retirement gate passes:
    census clean, grace period over, approval given where required. Otherwise the task fails, and
    does not retry, with the reasons in the log and in the ledger. Where the KMS cannot retire
    versions (AWS KMS key material), the task is skipped with that said plainly, and the ledger
    records it with the census.

    :param key_class: Key class name. (templated)
    :param approval_task_id: Task whose XCom holds the human approval, if the policy requires one.
    """

    template_fields: Sequence[str] = ("key_class",)
    ui_color = "#f4a1a1"

    def __init__(self, *, key_class: str, approval_task_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class
        self.approval_task_id = approval_task_id

    def execute(self, context: Any) -> dict:
        with denied_fails_fast():
            return self._retire(context)

    def _retire(self, context: Any) -> dict:
        rt = key_class_runtime(self.key_class, "retire")
        plan = rt.retirement_plan()
        if plan is None:
            raise AirflowSkipException(f"key class {rt.name}: no version is due for retirement")
        approval = None
        if self.approval_task_id:
            approval = approval_from_hitl(context["ti"].xcom_pull(task_ids=self.approval_task_id))
        try:
            state = retire(rt.backend, rt.config.key_class, plan, rt.censuses(), rt.ledger, run_context(context),
                           approval=approval)
        except RetirementNotPossible as exc:  # recorded in the ledger; nothing an operator can change
            raise AirflowSkipException(str(exc)) from None
        except RetirementRefused as exc:
            raise AirflowFailException(str(exc)) from None
        return {"retired": plan.versions, "min_decryption_version": state.min_decryption_version}
