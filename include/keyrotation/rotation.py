"""Rotation of a master key: is it due, create the new version, promote it, make it the reference."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from keyrotation import ledger as lg
from keyrotation.backends.base import KeyState, KmsBackend
from keyrotation.config import KeyClass
from keyrotation.errors import KeyNotFoundError
from keyrotation.ledger import Ledger, RunContext


@dataclass(frozen=True)
class RotationCheck:
    key_class: str
    action: str  # create | rotate | adopt | skip
    reason: str
    latest_version: int
    reference_version: int | None
    age_s: float | None

    @property
    def due(self) -> bool:
        return self.action != "skip"

    def to_dict(self) -> dict:
        return asdict(self)


def check_rotation(kc: KeyClass, state: KeyState, reference_version: int | None, *, force: bool = False,
                   now: datetime | None = None) -> RotationCheck:
    """Decide what a rotation run must do, from the KMS state and the ledger's reference."""
    now = now or datetime.now(UTC)
    if not state.exists:
        if not kc.create_if_missing:
            raise KeyNotFoundError(
                f"key class {kc.name!r}: master key {kc.key_ref!r} does not exist and create_if_missing is false"
            )
        return RotationCheck(kc.name, "create", "master key does not exist yet", 0, reference_version, None)
    created = state.created_at(state.latest_version)
    age = (now - created).total_seconds() if created else None
    due_after = kc.rotation.due_after
    age_text = f"{age / 86400:.1f} days" if age is not None else "unknown age"
    args = (state.latest_version, reference_version, age)
    if force:
        return RotationCheck(kc.name, "rotate", f"forced (v{state.latest_version} is {age_text} old)", *args)
    if age is None or age >= due_after.total_seconds():
        return RotationCheck(kc.name, "rotate", f"v{state.latest_version} is {age_text} old, due after "
                                                f"{due_after.days} days", *args)
    if reference_version is None or reference_version < state.latest_version:
        return RotationCheck(kc.name, "adopt", f"ledger reference v{reference_version} is behind the KMS's "
                                               f"v{state.latest_version}", *args)
    return RotationCheck(kc.name, "skip", f"v{state.latest_version} is {age_text} old, not due until "
                                          f"{due_after.days} days", *args)


def create_version(backend: KmsBackend, check: RotationCheck, ledger: Ledger, ctx: RunContext,
                   reason: str | None = None, *, kc: KeyClass) -> int:
    """Carry out ``check``: create the key or a new version (or adopt the latest); return the version. The
    ledger row records the policy ``kc`` was under."""
    detail = {"reason": reason, "check": check.reason, "policy": kc.policy_facts()}
    if check.action == "create":
        version = backend.create_key().latest_version
        ledger.record(lg.KEY_CREATED, check.key_class, ctx, to_version=version, detail=detail)
    elif check.action == "rotate":
        version = backend.rotate()
        ledger.record(lg.VERSION_CREATED, check.key_class, ctx, from_version=check.latest_version,
                      to_version=version, detail=detail)
    elif check.action == "adopt":
        version = check.latest_version
    else:
        raise ValueError(f"key class {check.key_class!r}: rotation not due ({check.reason})")
    return version


def record_skip(kc: KeyClass, check: RotationCheck, ledger: Ledger, ctx: RunContext) -> None:
    """Record that a rotation was not due, with the policy that said so."""
    ledger.record(lg.ROTATION_SKIPPED, kc.name, ctx, status="skipped", from_version=check.latest_version,
                  detail={"check": check.reason, "policy": kc.policy_facts()})


def promote_version(backend: KmsBackend, key_class: str, version: int, ledger: Ledger, ctx: RunContext) -> bool:
    """Make ``version`` the KMS's primary where rotation left that as a step of its own (Cloud KMS)."""
    if not backend.promote(version):
        return False
    ledger.record(lg.VERSION_PROMOTED, key_class, ctx, to_version=version, detail={"primary": version})
    return True


def update_reference(key_class: str, version: int, ledger: Ledger, ctx: RunContext) -> int | None:
    """Record ``version`` as the key class's current version; return the previous one."""
    previous = ledger.current_version(key_class)
    if previous != version:
        ledger.record(lg.REFERENCE_UPDATED, key_class, ctx, from_version=previous, to_version=version)
    return previous
