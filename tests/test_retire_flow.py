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
    current_since = rt.ledger.current_reference(rt.name)["recorded_at"].replace(tzinfo=UTC)
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
