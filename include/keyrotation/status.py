"""Where a key class stands against its policy, for the key inventory, the compliance report and the overdue notice."""

from __future__ import annotations

from datetime import UTC, datetime

from keyrotation.backends.base import KeyState
from keyrotation.census import Census
from keyrotation.config import KeyClass, human_duration


def behind(kc: KeyClass, current_version: int | None, current_since: datetime | None, censuses: list[Census],
           now: datetime) -> str | None:
    """Why the key class is *behind*: data still under an older version (or blocking) longer than the policy's
    ``reencryption.behind_after`` after the current version became the reference (``current_since``: the
    ledger's reference time, timezone-aware); None when it is not."""
    if current_version is None or current_since is None:
        return None
    stale = sum(len(c.under(current_version)) + len(c.errors) for c in censuses)
    waited = now - current_since
    if not stale or waited <= kc.reencryption.behind_after:
        return None
    limit = _days(kc.reencryption.behind_after.total_seconds())
    return (f"behind: {stale} partitions still under versions older than v{current_version} (or blocking) "
            f"{_days(waited.total_seconds())} after it became current (policy: {limit})")


def _days(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.1f} days" if days < 10 else f"{days:.0f} days"


def overdue_reasons(kc: KeyClass, state: KeyState, reference: dict | None, censuses: list[Census],
                    now: datetime) -> list[str]:
    """Why the key class is overdue: its current version (the ledger's reference) is older than the
    cryptoperiod, and/or it is :func:`behind`; empty when it is neither (the ``overdue`` notice)."""
    current = int(reference["to_version"]) if reference else None
    reasons = []
    created = state.created_at(current) if current else None
    if created is not None:
        age = now - (created if created.tzinfo else created.replace(tzinfo=UTC))
        if age > kc.rotation.cryptoperiod:
            reasons.append(f"past its cryptoperiod: v{current} is {age.total_seconds() / 86400:.1f} days old "
                           f"(cryptoperiod: {human_duration(kc.rotation.cryptoperiod)})")
    why = behind(kc, current, reference["recorded_at"] if reference else None, censuses, now)
    if why:
        reasons.append(why)
    return reasons
