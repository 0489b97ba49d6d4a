"""The retirement gate, the one place that decides whether old versions may be retired."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from helpers import days, runtime, seed, sweep
from keyrotation import ledger as lg
from keyrotation.errors import RetirementRefused
from keyrotation.ledger import RunContext
from keyrotation.retirement import plan_retirement, retire
from keyrotation.rotation import update_reference


def _rotated(make_key_class, vault, **kwargs):
    rt = runtime(make_key_class(**kwargs), vault)
    seed(rt, "customers", days("2024-01-01", 3))
    v2 = rt.backend.rotate()
    update_reference(rt.name, v2, rt.ledger, RunContext())
    return rt, v2


def test_refuses_while_partitions_are_under_old_versions_then_retires(make_key_class, vault):
    rt, v2 = _rotated(make_key_class, vault, grace="0s")
    kc = rt.config.key_class
    plan = plan_retirement(kc, rt.backend.key_state(), v2)
    assert plan.versions == [1]
    engine = rt.engine("customers")
    engine.process("2024-01-01", v2, "rewrap")
    with pytest.raises(RetirementRefused, match="2 partitions still under versions below v2: 2024-01-02, 2024-01-03"):
        retire(rt.backend, kc, plan, rt.censuses(), rt.ledger, RunContext())
    assert rt.backend.key_state().min_decryption_version == 1
    for p in ("2024-01-02", "2024-01-03"):
        engine.process(p, v2, "rewrap")
    with pytest.raises(RetirementRefused, match="3 partitions not proven under v2 or newer by a validation in the "
                                                "ledger .*: 2024-01-01: never validated"):
        retire(rt.backend, kc, plan, rt.censuses(), rt.ledger, RunContext())
    sweep(rt, "customers", v2)
    state = retire(rt.backend, kc, plan, rt.censuses(), rt.ledger, RunContext(actor="ana"))
    assert state.min_decryption_version == 2
    assert plan_retirement(kc, rt.backend.key_state(), v2) is None  # nothing left to retire
    events = [(r["event"], r["status"]) for r in rt.ledger.rows(events_in=(lg.RETIREMENT_REFUSED,
                                                                          lg.VERSIONS_RETIRED))]
    assert events == [(lg.RETIREMENT_REFUSED, "refused")] * 2 + [(lg.VERSIONS_RETIRED, "ok")]


def test_refuses_during_grace_period_without_approval_and_on_unreadable_partitions(make_key_class, vault):
    rt, v2 = _rotated(make_key_class, vault, grace="7d")
    sweep(rt, "customers", v2)
    kc = rt.config.key_class
    plan = plan_retirement(kc, rt.backend.key_state(), v2)
    with pytest.raises(RetirementRefused, match="grace period of 7 days"):
        retire(rt.backend, kc, plan, rt.censuses(), rt.ledger, RunContext())
    later = datetime.now(UTC) + timedelta(days=8)
    strict = kc.model_copy(update={"retire": kc.retire.model_copy(update={"approval_required": True})})
    with pytest.raises(RetirementRefused, match="requires an approval"):
        retire(rt.backend, strict, plan, rt.censuses(), rt.ledger, RunContext(), now=later)
    with pytest.raises(RetirementRefused, match="requires an approval"):
        retire(rt.backend, strict, plan, rt.censuses(), rt.ledger, RunContext(), now=later,
               approval={"approved": False, "approved_by": "bo"})
    censuses = rt.censuses()
    censuses[0].errors["2024-01-09"] = "key material is not valid"
    with pytest.raises(RetirementRefused, match="1 partitions unreadable or blocking, cannot prove they are not "
                                                "under versions below v2: 2024-01-09: key material is not valid"):
        retire(rt.backend, kc, plan, censuses, rt.ledger, RunContext(), now=later)
    assert rt.backend.key_state().min_decryption_version == 1
    retire(rt.backend, strict, plan, rt.censuses(), rt.ledger, RunContext(), now=later,
           approval={"approved": True, "approved_by": "ana"})
    assert rt.backend.key_state().min_decryption_version == 2
    assert rt.ledger.rows(events_in=(lg.VERSIONS_RETIRED,))[0]["actor"] == "ana"


def test_no_reference_means_nothing_can_be_retired(make_key_class, vault):
    rt = runtime(make_key_class(), vault)
    rt.backend.create_key()
    with pytest.raises(RetirementRefused, match="no current version recorded"):
        plan_retirement(rt.config.key_class, rt.backend.key_state(), None)
