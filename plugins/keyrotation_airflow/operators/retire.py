"""Operator of the retirement DAG: retire old versions through the one retirement gate."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from keyrotation import ledger as lg
from keyrotation.config import human_duration
from keyrotation.errors import RetirementNotPossible, RetirementRefused
from keyrotation.retirement import duty_reason, retire, rotated_by
from keyrotation_airflow.operators.base import KeyClassOperator, KeyClassRuntimeMixin
from keyrotation_airflow.operators.rotation import as_bool
from keyrotation_airflow.task_runtime import denied_fails_fast, run_context


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


class RetirementApprovalOperator(ApprovalOperator, KeyClassRuntimeMixin):
    """
    Ask a person to approve retiring a key class's old versions (Browse -> Required Actions), showing
    the census the gate saw; record the decision, the person and the time in the ledger. Reject skips
    the retirement, so the versions stay enabled; so does no answer within ``response_timeout`` (recorded
    as ``timed_out``). A request is made once per version range and census: a run that finds the same
    versions and census already approved (within ``response_timeout``, and not retired since, e.g. because
    the retirement failed) joins that approval instead of asking again.

    :param key_class: Key class name. (templated)
    """

    role = "retire"
    template_fields: Sequence[str] = (*ApprovalOperator.template_fields, "key_class")

    def __init__(self, *, key_class: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class

    def execute(self, context: Any) -> Any:
        gate = context["ti"].xcom_pull(task_ids="census_gate") or {}
        rt = self.runtime
        decision = self.standing_approval(rt.ledger, rt.name, gate)
        if decision is not None:
            recorded = decision["recorded_at"]
            self.log.info("key class %s: retiring below v%s with this census was approved by %s at %s (run %s); "
                          "joining that approval, no new request", rt.name, gate.get("retire_below"),
                          decision["actor"] or "nobody", f"{recorded:%Y-%m-%d %H:%M:%S} UTC", decision["run_id"])
            return {"chosen_options": [self.APPROVE], "params_input": {}, "responded_at": recorded.isoformat(),
                    "responded_by_user": decision["actor"] or "", "joined_run_id": decision["run_id"]}
        return super().execute(context)

    def standing_approval(self, ledger: Any, key_class: str, gate: dict) -> dict | None:
        """The approval of the same versions and census, given within ``response_timeout`` (a request would not
        have waited longer), if that is the last decision on them."""
        decision = last_decision(ledger, key_class, gate.get("retire_below"), gate.get("datasets"))
        if decision is None or decision["status"] != "approved":
            return None
        if self.response_timeout is not None and datetime.now(UTC) - decision["recorded_at"] > self.response_timeout:
            return None
        return decision

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        gate = context["ti"].xcom_pull(task_ids="census_gate") or {}
        asked = {"retire_below": gate.get("retire_below"), "census": gate.get("datasets")}
        if "error" in event and event.get("error_type") != "timeout":
            return super().execute_complete(context, event)  # fails the task: not a decision
        rt = self.runtime
        kc = rt.config.key_class
        reference = rt.ledger.current_version(rt.name)
        asked = {**asked, "policy": kc.policy_facts(), "rotated_by": rotated_by(rt.ledger, rt.name, reference)}
        if "error" in event:  # no answer within response_timeout: recorded, and not asked again for the same
            rt.ledger.record(lg.RETIREMENT_DECISION, rt.name, run_context(context), status="timed_out",
                             detail={"error": str(event.get("error")), **asked})
            waited = human_duration(self.response_timeout) if self.response_timeout else "its timeout"
            raise AirflowSkipException(
                f"key class {rt.name}: nobody answered within {waited}; recorded as timed_out, the versions stay "
                "enabled and the same request is not made again until a new version or the census changes, or a "
                "run with ask_again")
        decision = approval_from_hitl(event)
        # Recorded as given; the retirement gate then refuses it, with this reason in the ledger.
        duty = duty_reason(kc, decision, asked["rotated_by"], reference or 0)
        if duty:
            self.log.warning("key class %s: %s", rt.name, duty)
        rt.ledger.record(lg.RETIREMENT_DECISION, rt.name, run_context(context),
                         status="approved" if decision["approved"] else "rejected",
                         actor=decision["approved_by"], detail={**decision, **asked, "duty_conflict": duty})
        return super().execute_complete(context, event)


def last_decision(ledger: Any, key_class: str, retire_below: int | None, census: list[dict] | None) -> dict | None:
    """The last decision on retiring below ``retire_below`` (approved, rejected or timed_out), if the census
    it was asked about is ``census``; None if there is none, or the census has changed since."""
    for row in reversed(ledger.rows(key_class=key_class, events_in=(lg.RETIREMENT_DECISION,))):
        detail = json.loads(row["detail"] or "{}")
        if detail.get("retire_below") != retire_below:
            continue
        if detail.get("census") != census:
            return None
        return {**row, "recorded_at": lg.as_utc(row["recorded_at"])}
    return None


def previous_refusal(ledger: Any, key_class: str, retire_below: int, census: list[dict] | None) -> dict | None:
    """The last rejected or timed-out decision on retiring below ``retire_below`` while the census was the same;
    None if there is none, or the census has changed since."""
    decision = last_decision(ledger, key_class, retire_below, census)
    return decision if decision is not None and decision["status"] in ("rejected", "timed_out") else None


class WaitGracePeriodOperator(KeyClassOperator):
    """
    Wait for the grace period since the current version became the reference, deferred to the triggerer
    (no worker slot; the task shows as deferred until its end), before anyone is asked to approve. Skips when
    no version is due for retirement, or when retiring the same versions was rejected (or not answered in
    time) and neither a new version nor the census has changed since: nothing asks twice, unless the run is
    triggered with ``ask_again``. Returns the grace end, the reference version and who made it current.

    :param key_class: Key class name. (templated)
    :param ask_again: Ask again after a rejection or a timeout of the same request. (templated)
    """

    role = "retire"
    template_fields: Sequence[str] = ("key_class", "ask_again")
    ui_color = "#d7e8f4"

    def __init__(self, *, key_class: str, ask_again: bool | str = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class
        self.ask_again = ask_again

    def execute(self, context: Any) -> dict:
        with denied_fails_fast():
            rt = self.runtime
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
        end = since + rt.config.key_class.retire.grace_period
        rotator = rotated_by(rt.ledger, rt.name, plan.reference_version) or "a schedule"
        info = {"grace_end": end.isoformat(), "reference_version": plan.reference_version,
                "current_since": since.isoformat(), "rotated_by": rotator,
                "versions": plan.versions, "retire_below": plan.new_min_version,
                "effect": rt.backend.retirement_effect(plan.versions, trim=rt.config.key_class.retire.trim)}
        if end > datetime.now(UTC):
            self.log.info("key class %s: grace period of %s since v%s became current ends at %s; waiting in the "
                          "triggerer", rt.name, human_duration(rt.config.key_class.retire.grace_period),
                          plan.reference_version, end.isoformat())
            self.defer(trigger=DateTimeTrigger(moment=end), method_name="execute_complete", kwargs={"info": info})
        return info

    def execute_complete(self, context: Any, event: Any = None, info: dict | None = None) -> dict:
        self.log.info("grace period over (%s)", (info or {}).get("grace_end"))
        return info or {}


class RetireKeyVersionsOperator(KeyClassOperator):
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

    role = "retire"
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
        rt = self.runtime
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
            sweeps = ", ".join(f"reencrypt__{ds.name}" for ds in rt.config.datasets) or "the sweeps"
            raise AirflowFailException(
                f"{exc}. What to do: where data is under an old version or not validated since its last change, "
                f"trigger {sweeps} with scope 'sweep' (the census and the ledger name the partitions); once the "
                f"census gate passes, trigger retire__{rt.name} again: a changed census is asked about anew") from None
        return {"retired": plan.versions, "min_decryption_version": state.min_decryption_version}
