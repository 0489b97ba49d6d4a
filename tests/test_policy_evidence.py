"""Issue 17, items 2 and 3: every decision records the policy in force (and the report flags a decision taken
under a weaker one), and separation of duties between who rotated and who approved a retirement. Report
findings are checked against the ledger rows read directly."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from helpers import days, runtime, seed, sweep
from keyrotation import ledger as lg
from keyrotation.config import load_key_class, policy_changes
from keyrotation.errors import RetirementRefused
from keyrotation.ledger import RunContext
from keyrotation.reports import KeyClassEvidence, Period
from keyrotation.reports.evidence import collect
from keyrotation.reports.findings import findings
from keyrotation.retirement import plan_retirement, retire
from keyrotation.rotation import check_rotation, create_version, record_skip, update_reference


def _with_retire(kc, **changes):
    return kc.model_copy(update={"retire": kc.retire.model_copy(update=changes)})


def _rotate(rt, kc, actor: str) -> int:
    """A forced rotation through the rotation module (records version_created with its policy)."""
    check = check_rotation(kc, rt.backend.key_state(), rt.ledger.current_version(rt.name), force=True)
    version = create_version(rt.backend, check, rt.ledger, RunContext(actor=actor), reason="test", kc=kc)
    update_reference(rt.name, version, rt.ledger, RunContext(actor=actor))
    return version


def _report(rt, kc):
    now = datetime.now(UTC)
    period = Period(now - timedelta(days=1), now + timedelta(days=1))
    ev = collect([KeyClassEvidence(kc, rt.backend.key_state(), rt.censuses())], rt.ledger, period, None, now)
    return ev, {r.control: r for r in findings(ev).itertuples()}


def _policy(row: dict) -> dict:
    return json.loads(row["detail"])["policy"]


def test_policy_facts_are_stable_and_name_what_changed(make_key_class):
    config = make_key_class(name="polfacts", grace="7d")
    kc = config.key_class
    facts = kc.policy_facts()
    assert facts == {"cryptoperiod_s": 90 * 86400, "grace_period_s": 7 * 86400, "approval_required": False,
                     "separate_approver": False, "versions_kept": 1, "config_sha256": facts["config_sha256"]}
    assert len(facts["config_sha256"]) == 64
    assert load_key_class("polfacts").key_class.policy_facts() == facts  # same file, same hash
    weaker = _with_retire(kc, grace_period=timedelta(minutes=1), approval_required=False)
    assert weaker.config_hash() != kc.config_hash()
    stricter = _with_retire(kc, approval_required=True, separate_approver=True, versions_kept=2)
    assert policy_changes(facts, weaker.policy_facts()) == [("grace period 7 days -> 1 minute", True)]
    assert policy_changes(stricter.policy_facts(), facts) == [
        ("approval required true -> false", True), ("separate approver true -> false", True),
        ("versions kept 2 -> 1", True)]
    assert policy_changes(facts, stricter.policy_facts()) == [
        ("approval required false -> true", False), ("separate approver false -> true", False),
        ("versions kept 1 -> 2", False)]
    longer = kc.model_copy(update={"rotation": kc.rotation.model_copy(update={"cryptoperiod": timedelta(days=365)})})
    assert policy_changes(facts, longer.policy_facts()) == [("cryptoperiod 90 days -> 365 days", True)]
    separate = make_key_class(name="polfacts", grace="7d", **{"approval_required: false":
                                                             "approval_required: true\n    separate_approver: true"})
    assert separate.key_class.retire.separate_approver is True
    assert make_key_class(name="polfacts").key_class.retire.separate_approver is False  # the default


def test_shortening_the_grace_period_then_retiring_is_recorded_and_flagged(make_key_class, vault):
    rt = runtime(make_key_class(name="polgrace", dataset="polgrace_data", grace="7d"), vault)
    kc = rt.config.key_class
    seed(rt, "polgrace_data", days("2024-01-01", 2))
    update_reference(rt.name, 1, rt.ledger, RunContext())
    record_skip(kc, check_rotation(kc, rt.backend.key_state(), 1), rt.ledger, RunContext())
    v2 = _rotate(rt, kc, "ana")
    sweep(rt, "polgrace_data", v2)
    plan = plan_retirement(kc, rt.backend.key_state(), v2)
    with pytest.raises(RetirementRefused, match="grace period of 7 days"):
        retire(rt.backend, kc, plan, rt.censuses(), rt.ledger, RunContext())
    short = _with_retire(kc, grace_period=timedelta(minutes=1))
    retire(rt.backend, short, plan, rt.censuses(), rt.ledger, RunContext(actor="bo"),
           now=datetime.now(UTC) + timedelta(minutes=2))
    assert rt.backend.key_state().min_decryption_version == v2

    # The ledger itself: every decision carries the policy it was taken under.
    [skipped] = rt.ledger.rows(events_in=(lg.ROTATION_SKIPPED,))
    [created] = rt.ledger.rows(events_in=(lg.VERSION_CREATED,))
    [refused] = rt.ledger.rows(events_in=(lg.RETIREMENT_REFUSED,))
    [retired] = rt.ledger.rows(events_in=(lg.VERSIONS_RETIRED,))
    assert _policy(skipped) == _policy(created) == _policy(refused) == kc.policy_facts()
    assert _policy(refused)["grace_period_s"] == 7 * 86400
    assert _policy(retired) == short.policy_facts() and _policy(retired)["grace_period_s"] == 60
    assert json.loads(retired["detail"])["rotated_by"] == "ana"

    ev, found = _report(rt, short)
    [change] = ev.tables["policy_changes"].to_dict("records")
    assert change == {"id": "pol-1", "key_class": "polgrace", "time": change["time"], "decision": "versions_retired",
                      "ledger_row": retired["id"], "changed": "grace period 7 days -> 1 minute",
                      "weaker": "grace period 7 days -> 1 minute", "from_config": _policy(refused)["config_sha256"],
                      "to_config": _policy(retired)["config_sha256"], "actor": "bo", "run_id": ""}
    assert found["RET-1"].status == "PASS"  # no approval was required, before or after
    assert found["POL-1"].status == "FAIL"
    assert found["POL-1"].detail == (
        f"1 of 1 policy changes in the period weakened the policy before a decision: versions_retired at "
        f"{change['time']} under grace period 7 days -> 1 minute (config {_policy(refused)['config_sha256'][:12]} "
        f"-> {_policy(retired)['config_sha256'][:12]})")
    assert found["POL-1"].evidence == "pol-1"
    # Under an unchanged policy there is no change to list and nothing to flag.
    quiet = runtime(make_key_class(name="polsame", dataset="polsame_data"), vault)
    quiet_kc = quiet.config.key_class
    seed(quiet, "polsame_data", days("2024-01-01", 1))
    update_reference(quiet.name, 1, quiet.ledger, RunContext())
    for _ in range(2):
        record_skip(quiet_kc, check_rotation(quiet_kc, quiet.backend.key_state(), 1), quiet.ledger, RunContext())
    ev, found = _report(quiet, quiet_kc)
    assert len(ev.tables["policy_changes"]) == 0
    assert (found["POL-1"].status, found["POL-1"].detail) == ("PASS", "0 policy changes in the period, none weaker")


def test_separation_of_duties_refuses_the_rotator_as_approver_and_is_reported(make_key_class, vault):
    rt = runtime(make_key_class(name="polduty", dataset="polduty_data"), vault)
    kc = rt.config.key_class
    strict = _with_retire(kc, approval_required=True, separate_approver=True)
    seed(rt, "polduty_data", days("2024-01-01", 2))
    update_reference(rt.name, 1, rt.ledger, RunContext())
    v2 = _rotate(rt, strict, "ana")
    sweep(rt, "polduty_data", v2)
    plan = plan_retirement(strict, rt.backend.key_state(), v2)
    with pytest.raises(RetirementRefused) as refused:
        retire(rt.backend, strict, plan, rt.censuses(), rt.ledger, RunContext(),
               approval={"approved": True, "approved_by": "ana"})
    assert str(refused.value) == (
        "key class 'polduty': retirement of v1..v1 refused: separation of duties: ana approved the retirement and "
        "also triggered the rotation to v2; retire.separate_approver requires a different approver")
    [row] = rt.ledger.rows(events_in=(lg.RETIREMENT_REFUSED,))
    assert json.loads(row["detail"])["reasons"] == [
        "separation of duties: ana approved the retirement and also triggered the rotation to v2; "
        "retire.separate_approver requires a different approver"]
    assert rt.backend.key_state().min_decryption_version == 1
    retire(rt.backend, strict, plan, rt.censuses(), rt.ledger, RunContext(),
           approval={"approved": True, "approved_by": "bo"})
    assert rt.backend.key_state().min_decryption_version == v2

    # Switch off: the same person may rotate and approve; the report says so either way.
    v3 = _rotate(rt, kc, "ana")
    sweep(rt, "polduty_data", v3)
    lax = _with_retire(kc, approval_required=True)
    retire(rt.backend, lax, plan_retirement(lax, rt.backend.key_state(), v3), rt.censuses(), rt.ledger,
           RunContext(), approval={"approved": True, "approved_by": "ana"})
    retired = rt.ledger.rows(events_in=(lg.VERSIONS_RETIRED,))
    assert [(r["actor"], json.loads(r["detail"])["rotated_by"]) for r in retired] == [("bo", "ana"), ("ana", "ana")]
    ev, found = _report(rt, lax)
    table = ev.tables["retirements"]
    done = table[table["event"] == "versions_retired"]
    assert list(zip(done["rotated_by"], done["approved_by"], done["separate_approver"], strict=True)) == [
        ("ana", "bo", True), ("ana", "ana", False)]
    assert (found["SOD-1"].status, found["SOD-1"].detail) == (
        "WARN", "1 retirements approved by the person who rotated (retire.separate_approver is off): "
                "v<2: rotated by ana, approved by bo; v<3: rotated by ana, approved by ana")
    # Turning the switch off between the two retirements is itself a weaker policy.
    assert found["POL-1"].status == "FAIL" and "separate approver true -> false" in found["POL-1"].detail


def test_the_approval_records_policy_and_rotator(make_key_class, vault, caplog):
    from keyrotation_airflow.operators.retire import RetirementApprovalOperator

    rt = runtime(make_key_class(name="polapprove", dataset="polapprove_data", **{
        "approval_required: false": "approval_required: true\n    separate_approver: true"}), vault)
    seed(rt, "polapprove_data", days("2024-01-01", 1))
    update_reference(rt.name, 1, rt.ledger, RunContext())
    _rotate(rt, rt.config.key_class, "ana")
    gate = {"retire_below": 2, "versions": [1], "datasets": []}

    class TI:
        dag_id, run_id, task_id, try_number = "retire__polapprove", "manual__t", "approve", 1

        def xcom_pull(self, task_ids: str):
            return gate if task_ids == "census_gate" else None

    approve = RetirementApprovalOperator(task_id="approve", key_class="polapprove", subject="Retire?")
    approve.execute_complete({"ti": TI(), "dag_run": None}, {
        "chosen_options": ["Approve"], "params_input": {}, "responded_by_user": "ana",
        "responded_at": datetime.now(UTC)})
    [decision] = rt.ledger.rows(events_in=(lg.RETIREMENT_DECISION,))
    detail = json.loads(decision["detail"])
    assert (decision["status"], decision["actor"], detail["rotated_by"]) == ("approved", "ana", "ana")
    assert detail["policy"] == rt.config.key_class.policy_facts()
    assert detail["duty_conflict"] == ("separation of duties: ana approved the retirement and also triggered the "
                                       "rotation to v2; retire.separate_approver requires a different approver")
