"""The invariant, property-tested: no version that still wraps data is ever retired.

Random interleavings of rotations, re-encryptions in either mode, crashes at any engine step,
retries and retirement attempts (through the one retirement gate), against the real OpenBao; after
every step every partition must decrypt to its original digest.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import customers, days, partition_digests, runtime
from keyrotation.errors import KeyRotationError, RetirementRefused
from keyrotation.ledger import RunContext
from keyrotation.retirement import retire
from keyrotation.rotation import update_reference

PARTITIONS = days("2024-01-01", 3)
STEPS = ["staged", "material_moved", "data_moved", "committed", "cleaned", "rewrapped_file", "recorded"]

operations = st.one_of(
    st.tuples(st.just("rotate")),
    st.tuples(st.just("reencrypt"), st.integers(0, 2), st.sampled_from(["rewrap", "reencrypt"])),
    st.tuples(st.just("crash"), st.integers(0, 2), st.sampled_from(["rewrap", "reencrypt"]), st.sampled_from(STEPS)),
    st.tuples(st.just("retry_all")),
    st.tuples(st.just("retire"), st.integers(1, 2)),
)


class Crash(Exception):
    pass


def decryptable(rt) -> dict[str, str]:
    return partition_digests(rt, "customers", PARTITIONS)


def apply(rt, op) -> None:
    reference = rt.ledger.current_version(rt.name)
    kind = op[0]
    if kind == "rotate":
        update_reference(rt.name, rt.backend.rotate(), rt.ledger, RunContext())
    elif kind == "reencrypt":
        rt.engine("customers").process(PARTITIONS[op[1]], reference, op[2])
    elif kind == "crash":

        def crash(name: str) -> None:
            if name == op[3]:
                raise Crash(name)

        try:
            rt.engine("customers", checkpoint=crash).process(PARTITIONS[op[1]], reference, op[2])
        except Crash:
            pass
    elif kind == "retry_all":
        engine = rt.engine("customers")
        engine.run(rt.census("customers").under(reference), lambda p: engine.process(p, reference, "rewrap"))
    elif kind == "retire":
        kc = rt.config.key_class
        kc = kc.model_copy(update={"retire": kc.retire.model_copy(update={"versions_kept": op[1]})})
        from keyrotation.retirement import plan_retirement

        plan = plan_retirement(kc, rt.backend.key_state(), reference)
        if plan is not None:
            try:
                retire(rt.backend, kc, plan, rt.censuses(), rt.ledger, RunContext())
            except RetirementRefused:
                pass


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(ops=st.lists(operations, min_size=1, max_size=10))
def test_no_interleaving_leaves_an_undecryptable_partition(ops, make_key_class, vault):
    with tempfile.TemporaryDirectory() as tmp:
        config = make_key_class(mode="rewrap", location=Path(tmp) / "customers")
        rt = runtime(config, vault, ledger_url=f"sqlite:///{tmp}/ledger.db")
        state = rt.backend.create_key()
        update_reference(rt.name, state.latest_version, rt.ledger, RunContext())
        engine = rt.engine("customers")
        for p in PARTITIONS:
            engine.write_partition(p, customers(p, 20), state.latest_version)
        expected = decryptable(rt)
        for op in ops:
            try:
                apply(rt, op)
            except KeyRotationError:
                pass  # a refused or failed step is fine; losing data is not
            assert decryptable(rt) == expected, f"after {op}"
            state = rt.backend.key_state()
            census = rt.census("customers")
            assert not census.errors, census.errors
            assert all(pc.oldest >= state.min_decryption_version for pc in census.partitions.values()), op


def test_the_check_would_catch_a_retirement_that_bypasses_the_gate(make_key_class, vault, tmp_path):
    """A direct retire_below while data is under the old version is exactly what the property forbids."""
    rt = runtime(make_key_class(mode="rewrap", location=tmp_path / "customers"), vault)
    state = rt.backend.create_key()
    engine = rt.engine("customers")
    for p in PARTITIONS:
        engine.write_partition(p, customers(p, 20), state.latest_version)
    rt.backend.rotate()
    rt.backend.retire_below(2)
    with pytest.raises(KeyRotationError, match="disallowed by policy"):
        decryptable(rt)
