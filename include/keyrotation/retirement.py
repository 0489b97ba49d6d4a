"""The retirement gate: the one place that decides whether old key versions may be retired.

Every retire path goes through :func:`retire`. It opens only on positive proof: the census of every
dataset of the key class shows no partition under a version being retired, none blocking (unreadable,
labelled with a version the KMS does not have, a data file missing or not encrypted) and no unmanaged
file under such a version or of unknown protection; the ledger shows every partition validated after
its last change under a version being kept (:mod:`keyrotation.proof`); the grace period since the
current version became the reference has passed; and, where the policy says so, a person approved
(and, with ``retire.separate_approver``, not the person who triggered the rotation). Every row it writes
records the policy in force (:meth:`KeyClass.policy_facts`) and who rotated.
Where the KMS cannot retire versions at all (AWS KMS key material), it
says so and records it, with the census, instead of pretending.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from keyrotation import ledger as lg
from keyrotation.backends.base import KeyState, KmsBackend
from keyrotation.census import Census
from keyrotation.config import KeyClass, human_duration
from keyrotation.errors import RetirementNotPossible, RetirementRefused
from keyrotation.ledger import Ledger, RunContext
from keyrotation.proof import proof_gaps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetirementPlan:
    key_class: str
    reference_version: int
    current_min_version: int
    new_min_version: int

    @property
    def versions(self) -> list[int]:
        return list(range(self.current_min_version, self.new_min_version))

    def to_dict(self) -> dict:
        return {**asdict(self), "versions": self.versions}


def plan_retirement(kc: KeyClass, state: KeyState, reference_version: int | None) -> RetirementPlan | None:
    """Versions older than the newest ``versions_kept`` (counted back from the reference); None if none."""
    if reference_version is None:
        raise RetirementRefused(f"key class {kc.name!r}: no current version recorded in the ledger yet")
    new_min = max(1, reference_version - kc.retire.versions_kept + 1)
    if new_min <= state.min_decryption_version:
        return None
    return RetirementPlan(kc.name, reference_version, state.min_decryption_version, new_min)


def _listed(items: list[str], limit: int = 5) -> str:
    return "; ".join(items[:limit]) + (" ..." if len(items) > limit else "")


def data_reasons(min_version: int, censuses: list[Census], evidence: dict[str, dict[str, dict]]) -> list[str]:
    """Why the data does not yet prove that versions below ``min_version`` protect nothing; empty when it
    does. ``evidence``: per dataset, :meth:`Ledger.partition_evidence`. Asked through :func:`census_gate`."""
    reasons: list[str] = []
    for census in censuses:
        if census.errors:
            reasons.append(f"dataset {census.dataset}: {len(census.errors)} partitions unreadable or blocking, cannot "
                           f"prove they are not under versions below v{min_version}: "
                           + _listed([f"{p}: {census.errors[p]}" for p in sorted(census.errors)]))
        old = census.under(min_version)
        if old:
            reasons.append(f"dataset {census.dataset}: {len(old)} partitions still under versions below "
                           f"v{min_version}: " + ", ".join(old[:5]) + (" ..." if len(old) > 5 else ""))
        unmanaged = census.unmanaged_blocking(min_version)
        if unmanaged:
            files = [f"{p}/{r}" for p, rs in unmanaged.items() for r in rs]
            reasons.append(f"dataset {census.dataset}: {len(files)} unmanaged files (not in a manifest; left in place) "
                           f"under versions below v{min_version} or of unknown protection: " + _listed(files))
        gaps = {p: g for p, g in proof_gaps(census, evidence.get(census.dataset, {}), min_version).items()
                if p not in old}
        if gaps:
            reasons.append(f"dataset {census.dataset}: {len(gaps)} partitions not proven under v{min_version} or newer "
                           f"by a validation in the ledger (a sweep of the dataset validates them): "
                           + _listed([f"{p}: {g}" for p, g in gaps.items()]))
    return reasons


@dataclass(frozen=True)
class CensusGate:
    """The census test of retiring ``plan.versions``: ``reasons`` why the censuses and the ledger do not yet
    prove that those versions protect nothing (:func:`data_reasons`); empty when they do."""

    plan: RetirementPlan
    censuses: list[Census]
    reasons: list[str]

    @property
    def passed(self) -> bool:
        return not self.reasons

    def summary(self) -> dict:
        """JSON-safe, for XCom and the approval page: the versions and, per dataset, its census and how many of
        its partitions are still under the versions to retire."""
        below = self.plan.new_min_version
        return {"retire_below": below, "versions": self.plan.versions,
                "datasets": [{**c.summary(), "under_retired_versions": len(c.under(below))} for c in self.censuses]}


def census_gate(plan: RetirementPlan, censuses: list[Census], ledger: Ledger) -> CensusGate:
    """The census test, written once: the census gate (before anyone is asked) and :func:`retire` both ask it,
    with the ledger's evidence (:meth:`Ledger.partition_evidence`) of each census's dataset."""
    evidence = {c.dataset: ledger.partition_evidence(c.dataset) for c in censuses}
    return CensusGate(plan, censuses, data_reasons(plan.new_min_version, censuses, evidence))


def rotated_by(ledger: Ledger, key_class: str, version: int | None) -> str | None:
    """Who triggered the rotation that made ``version``: the actor of its ``version_created`` (or
    ``key_created``) row, else of the ``reference_updated`` row that made it current; None for a schedule."""
    if version is None:
        return None
    for events in ((lg.VERSION_CREATED, lg.KEY_CREATED), (lg.REFERENCE_UPDATED,)):
        rows = [r for r in ledger.rows(key_class=key_class, events_in=events) if r["to_version"] == version]
        if rows:
            return rows[-1]["actor"] or None
    return None


def duty_reason(kc: KeyClass, approval: dict | None, rotator: str | None, reference_version: int) -> str | None:
    """Why the approval breaks ``retire.separate_approver`` (the approver triggered the rotation); None if not."""
    if not (kc.retire.separate_approver and approval and approval.get("approved")):
        return None
    approver = approval.get("approved_by") or ""
    if rotator and approver == rotator:
        return (f"separation of duties: {approver} approved the retirement and also triggered the rotation to "
                f"v{reference_version}; retire.separate_approver requires a different approver")
    return None


def gate_reasons(kc: KeyClass, census: CensusGate, reference_time: datetime | None, approval: dict | None,
                 now: datetime, rotator: str | None = None) -> list[str]:
    """Why retirement must not happen now; empty when every condition holds. ``rotator``: who triggered the
    rotation to the reference version (:func:`rotated_by`)."""
    plan = census.plan
    reasons = list(census.reasons)
    grace = kc.retire.grace_period
    if reference_time is None:
        reasons.append(f"no time recorded for reference v{plan.reference_version}; cannot check the grace period")
    elif now - reference_time < grace:
        reasons.append(f"grace period of {human_duration(grace)} since v{plan.reference_version} became current "
                       f"({reference_time.isoformat()}) ends at {(reference_time + grace).isoformat()}")
    if kc.retire.approval_required and not (approval and approval.get("approved")):
        reasons.append("the retire policy requires an approval and none was given")
    duty = duty_reason(kc, approval, rotator, plan.reference_version)
    if duty:
        reasons.append(duty)
    return reasons


def retire(backend: KmsBackend, kc: KeyClass, plan: RetirementPlan, censuses: list[Census], ledger: Ledger,
           ctx: RunContext, *, approval: dict | None = None, now: datetime | None = None) -> KeyState:
    """Retire ``plan.versions`` if the gate passes; otherwise record the refusal and raise."""
    now = now or datetime.now(UTC)
    reference = ledger.current_reference(kc.name)
    reference_time = reference["recorded_at"] if reference else None
    rotator = rotated_by(ledger, kc.name, plan.reference_version)
    reasons = gate_reasons(kc, census_gate(plan, censuses, ledger), reference_time, approval, now, rotator)
    detail = {"plan": plan.to_dict(), "census": [c.summary() for c in censuses], "policy": kc.policy_facts(),
              "rotated_by": rotator}
    if not backend.can_retire:
        data = "; ".join(r for r in reasons if r.startswith("dataset ")) or \
            f"no data is under versions below v{plan.new_min_version}"
        message = f"key class {kc.name!r}: versions v{plan.versions[0]}..v{plan.versions[-1]} cannot be retired: " \
            f"{backend.cannot_retire_reason} Census: {data}."
        ledger.record(lg.RETIREMENT_NOT_POSSIBLE, kc.name, ctx, status="not_possible",
                      from_version=plan.current_min_version, to_version=plan.new_min_version,
                      detail={**detail, "reasons": [backend.cannot_retire_reason, f"Census: {data}."]})
        log.warning(message)
        raise RetirementNotPossible(message)
    if reasons:
        ledger.record(lg.RETIREMENT_REFUSED, kc.name, ctx, status="refused",
                      from_version=plan.current_min_version, to_version=plan.new_min_version,
                      detail={**detail, "reasons": reasons})
        message = f"key class {kc.name!r}: retirement of v{plan.versions[0]}..v{plan.versions[-1]} refused: " + \
            "; ".join(reasons)
        log.error(message)
        raise RetirementRefused(message)
    state = backend.retire_below(plan.new_min_version, trim=kc.retire.trim)
    ledger.record(lg.VERSIONS_RETIRED, kc.name, ctx, from_version=plan.current_min_version,
                  to_version=plan.new_min_version, actor=(approval or {}).get("approved_by") or ctx.actor,
                  detail={**detail, "trim": kc.retire.trim, "approval": approval})
    log.info("key class %s: retired v%s..v%s (min_decryption_version now v%s)", kc.name, plan.versions[0],
             plan.versions[-1], state.min_decryption_version)
    return state
