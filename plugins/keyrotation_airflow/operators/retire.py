"""Operator of the retirement DAG: retire old versions through the one retirement gate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from keyrotation import ledger as lg
from keyrotation.errors import RetirementNotPossible, RetirementRefused
from keyrotation.retirement import retire
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
        if decision is not None:
            rt = key_class_runtime(self.key_class, "retire")
            rt.ledger.record(lg.RETIREMENT_DECISION, rt.name, run_context(context),
                             status="approved" if decision["approved"] else "rejected",
                             actor=decision["approved_by"], detail=decision)
        return super().execute_complete(context, event)


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
