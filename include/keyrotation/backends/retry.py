"""Retries with exponential backoff for calls to a KMS that may be briefly unreachable.

Hand-written rather than tenacity or the SDKs' own retries: neither can ask ``done`` before a retry and
return what a lost response's call already did instead of repeating it (tenacity's hooks return nothing).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all, sleeping ``initial``, 2x, 4x ... seconds between them, at most ``maximum``.

    With ``jitter``, each sleep is drawn between half and all of that, so that many clients throttled
    at once do not come back in step.
    """

    attempts: int = 6
    initial: float = 1.0
    maximum: float = 30.0
    jitter: bool = False

    def delays(self) -> list[float]:
        base = [min(self.initial * 2**i, self.maximum) for i in range(self.attempts - 1)]
        return [d * random.uniform(0.5, 1.0) for d in base] if self.jitter else base


def call_with_retries(fn: Callable[[], T], *, policy: RetryPolicy, retryable: tuple[type[BaseException], ...],
                      describe: str, done: Callable[[], T | None] | None = None) -> T:
    """Call ``fn``; on a ``retryable`` error, back off and try again, up to ``policy.attempts`` times.

    ``done``, if given, is asked before each retry whether the previous attempt took effect after all
    (its response was lost): a non-None answer is returned instead of repeating a non-idempotent call.
    Raises :class:`TransientFailure` when every attempt failed.
    """
    started = time.monotonic()
    delays = policy.delays()
    for attempt in range(policy.attempts):
        if attempt and done is not None:
            try:
                previous = done()
            except retryable:
                previous = None
            if previous is not None:
                return previous
        try:
            return fn()
        except retryable as exc:
            if attempt == policy.attempts - 1:
                raise TransientFailure(
                    f"{describe}: gave up after {policy.attempts} attempts over "
                    f"{time.monotonic() - started:.1f}s: {type(exc).__name__}: {exc}"
                ) from None
            log.warning("%s: attempt %d/%d failed (%s), retrying in %.1fs", describe, attempt + 1,
                        policy.attempts, type(exc).__name__, delays[attempt])
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


class TransientFailure(Exception):
    """Every attempt at a call failed with an error that might have passed."""
