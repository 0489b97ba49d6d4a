"""Retirement scheduled from facts (issue 16, item 1): the retire path waits out the grace period in the
triggerer before anyone is asked, and a rejected or unanswered request is not asked again for the same
versions and census unless a run says ``ask_again``."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import pytest

from dag_runs import key_class_dags, state, task_states
from helpers import days, runtime, seed, sweep
from keyrotation import ledger as lg
from keyrotation.ledger import RunContext
from keyrotation.rotation import update_reference

pytestmark = pytest.mark.airflow


def _rotated(make_key_class, vault, name: str, grace: str):
    rt = runtime(make_key_class(name=name, dataset=f"{name}_data", grace=grace), vault)
    seed(rt, f"{name}_data", days("2024-08-01", 3))
    v2 = rt.backend.rotate()
    update_reference(rt.name, v2, rt.ledger, RunContext(actor="ana"))
    sweep(rt, f"{name}_data", v2)
    return rt


def test_retirement_waits_out_the_grace_period_in_the_triggerer(make_key_class, vault, airflow_db, capfd, caplog):
    caplog.set_level(logging.INFO)
    rt = _rotated(make_key_class, vault, "gracewait", "25s")
    current_since = rt.ledger.current_reference(rt.name)["recorded_at"]
    started = datetime.now(UTC)
    assert started < current_since + timedelta(seconds=25)  # the run starts inside the grace period
    run = key_class_dags("gracewait")["retire__gracewait"].test()
    assert state(run) == "success"
    assert task_states(run) == {"census_gate": "success", "wait_grace_period": "success",
                                "retire_versions": "success"}
    [retired] = rt.ledger.rows(events_in=(lg.VERSIONS_RETIRED,))
    assert retired["recorded_at"].replace(tzinfo=UTC) >= current_since + timedelta(seconds=25)
    assert not rt.ledger.rows(events_in=(lg.RETIREMENT_REFUSED,))  # it waited instead of being refused
    assert rt.backend.key_state().min_decryption_version == 2
    out, err = capfd.readouterr()  # task logs go to the process's output under dag.test()
    assert "grace period of 25 seconds since v2 became current ends at" in out + err + caplog.text


def _context(gate: dict) -> dict:
    class TI:
        dag_id, run_id, task_id, try_number = "retire__asked", "manual__test", "wait_grace_period", 1

        def xcom_pull(self, task_ids: str):
            return gate if task_ids == "census_gate" else None

    return {"ti": TI(), "dag_run": None}


def test_a_rejected_request_is_not_asked_again_until_something_changes(make_key_class, vault):
    from airflow.sdk.exceptions import AirflowSkipException

    from keyrotation_airflow.operators.retire import WaitGracePeriodOperator

    rt = _rotated(make_key_class, vault, "asked", "0s")
    gate = {"retire_below": 2, "versions": [1], "datasets": [rt.census("asked_data").summary()]}
    rt.ledger.record(lg.RETIREMENT_DECISION, rt.name, RunContext(run_id="manual__1", actor="bo"), status="rejected",
                     actor="bo", detail={"approved": False, "approved_by": "bo", "retire_below": 2,
                                         "census": gate["datasets"]})
    wait = WaitGracePeriodOperator(task_id="wait_grace_period", key_class="asked")
    with pytest.raises(AirflowSkipException, match=r"retiring v1..v1 was rejected \(by bo, .* run manual__1\); not "
                                                   "asked again until a new version or the census changes, or a run "
                                                   "with ask_again"):
        wait.execute(_context(gate))
    asked_again = WaitGracePeriodOperator(task_id="wait_grace_period", key_class="asked", ask_again=True)
    info = asked_again.execute(_context(gate))
    assert (info["retire_below"], info["versions"], info["rotated_by"]) == (2, [1], "ana")
    changed = {**gate, "datasets": [{**gate["datasets"][0], "partitions": 4}]}  # the census changed since
    assert wait.execute(_context(changed))["retire_below"] == 2
    # A timeout counts as a refusal too; an approval does not keep anyone from being asked.
    rt.ledger.record(lg.RETIREMENT_DECISION, rt.name, RunContext(), status="timed_out",
                     detail={"error": "timeout", "retire_below": 2, "census": gate["datasets"]})
    with pytest.raises(AirflowSkipException, match="was timed_out"):
        wait.execute(_context(gate))
    rt.ledger.record(lg.RETIREMENT_DECISION, rt.name, RunContext(), status="approved", actor="cy",
                     detail={"approved": True, "retire_below": 2, "census": gate["datasets"]})
    assert wait.execute(_context(gate))["grace_end"]
    assert json.loads(rt.ledger.rows(events_in=(lg.RETIREMENT_DECISION,))[0]["detail"])["census"] == gate["datasets"]


def test_an_approval_is_joined_not_asked_again_and_a_timeout_is_recorded_and_skips(make_key_class, vault):
    """One request per version range and census: a run that finds them approved (the retirement then failed,
    say) joins that approval; no answer within the timeout is a recorded decision that skips the retirement."""
    from airflow.sdk.exceptions import AirflowSkipException

    from keyrotation_airflow.operators.retire import (
        RetireKeyVersionsOperator,
        RetirementApprovalOperator,
        approval_from_hitl,
    )

    rt = _rotated(make_key_class, vault, "joined", "0s")
    gate = {"retire_below": 2, "versions": [1], "datasets": [rt.census("joined_data").summary()]}
    approve = RetirementApprovalOperator(task_id="approve", key_class="joined", subject="Retire?",
                                         response_timeout=timedelta(hours=1))
    timeout = {"error": "The Human-in-the-loop response timeout has passed without a response.",
               "error_type": "timeout"}
    with pytest.raises(AirflowSkipException) as skipped:
        approve.execute_complete(_context(gate), timeout)
    assert str(skipped.value) == (
        "key class joined: nobody answered within 1 hour; recorded as timed_out, the versions stay enabled and the "
        "same request is not made again until a new version or the census changes, or a run with ask_again")
    [timed_out] = rt.ledger.rows(events_in=(lg.RETIREMENT_DECISION,))
    assert timed_out["status"] == "timed_out" and json.loads(timed_out["detail"])["census"] == gate["datasets"]
    assert approve.standing_approval(rt.ledger, "joined", gate) is None  # a timeout is no approval

    rt.ledger.record(lg.RETIREMENT_DECISION, rt.name, RunContext(run_id="manual__9"), status="approved", actor="cy",
                     detail={"approved": True, "approved_by": "cy", "retire_below": 2, "census": gate["datasets"]})
    joined = approve.execute(_context(gate))  # no request is made: this would need a running Airflow
    assert (joined["chosen_options"], joined["responded_by_user"], joined["joined_run_id"]) == (
        ["Approve"], "cy", "manual__9")
    assert approval_from_hitl(joined)["approved"] is True
    changed = {**gate, "datasets": [{**gate["datasets"][0], "partitions": 4}]}
    assert approve.standing_approval(rt.ledger, "joined", changed) is None  # another census: ask again
    stale = RetirementApprovalOperator(task_id="approve", key_class="joined", subject="Retire?",
                                       response_timeout=timedelta(seconds=0))
    assert stale.standing_approval(rt.ledger, "joined", gate) is None  # older than a request would have waited

    class TI:
        dag_id, run_id, task_id, try_number = "retire__joined", "manual__10", "retire_versions", 1

        def xcom_pull(self, task_ids: str):
            return joined if task_ids == "approve" else None

    retire = RetireKeyVersionsOperator(task_id="retire_versions", key_class="joined", approval_task_id="approve")
    assert retire.execute({"ti": TI(), "dag_run": None})["min_decryption_version"] == 2
    [retired] = rt.ledger.rows(events_in=(lg.VERSIONS_RETIRED,))
    assert retired["run_id"] == "manual__10" and "cy" in retired["detail"]
