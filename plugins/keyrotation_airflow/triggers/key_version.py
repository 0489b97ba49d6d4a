"""Trigger that waits, asynchronously, until a master key version is usable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

if TYPE_CHECKING:
    from keyrotation.config import KeyClass
    from keyrotation_airflow.hooks.kms import KmsHookMixin


def _poll_target(key_class: str) -> tuple[KmsHookMixin, KeyClass]:
    """The key class's KMS hook on its rotate connection, and the key class. Blocking (reads the config and the
    connection): run it in a thread."""
    from keyrotation.config import load_key_class
    from keyrotation_airflow.hooks.kms import kms_hook

    kc = load_key_class(key_class).key_class
    return kms_hook(kc, "rotate"), kc


class KeyVersionReadyTrigger(BaseTrigger):
    """
    Fires once ``version`` of the key class's master key is usable: on Cloud KMS once the
    CryptoKeyVersion is ``ENABLED`` (HSM versions are ``PENDING_GENERATION`` first), polled with the
    async client; elsewhere once it encrypts and decrypts a random probe.

    Holds only the key class name and the version: the connection is resolved where it runs.

    :param key_class: Key class name.
    :param version: The version to wait for.
    :param poll_interval: Seconds between checks.
    :param timeout: Give up after this many seconds with an event that says what state the version
        is still in (None: wait until the task's own deferral timeout).
    """

    def __init__(self, key_class: str, version: int, poll_interval: float = 10.0,
                 timeout: float | None = None) -> None:
        super().__init__()
        self.key_class = key_class
        self.version = int(version)
        self.poll_interval = poll_interval
        self.timeout = timeout

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"key_class": self.key_class, "version": self.version, "poll_interval": self.poll_interval,
             "timeout": self.timeout},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        deadline = time.monotonic() + self.timeout if self.timeout is not None else None
        try:  # once per run: every poll goes through this hook (and its async client, where it has one)
            hook, kc = await asyncio.to_thread(_poll_target, self.key_class)
        except Exception as exc:  # noqa: BLE001 - reported to the task, which fails with it
            yield TriggerEvent({"status": "error", "version": self.version, "message": str(exc)})
            return
        while True:
            try:
                ready, state = await hook.aversion_state(kc, self.version)
            except Exception as exc:  # noqa: BLE001 - reported to the task, which fails with it
                message = getattr(exc, "message", None) or str(exc)
                yield TriggerEvent({"status": "error", "version": self.version,
                                    "message": f"{type(exc).__name__}: {message}"})
                return
            if ready:
                yield TriggerEvent({"status": "ready", "version": self.version})
                return
            if deadline is not None and time.monotonic() >= deadline:
                yield TriggerEvent({"status": "timeout", "version": self.version, "state": state,
                                    "message": f"key class {self.key_class}: v{self.version} still {state} after "
                                               f"{self.timeout:g}s"})
                return
            self.log.info("key class %s: v%s %s yet", self.key_class, self.version, state)
            await asyncio.sleep(self.poll_interval)
