"""Trigger that waits, asynchronously, until a master key version is usable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


def version_usable(key_class: str, version: int) -> bool:
    from keyrotation_airflow.runtime import key_class_runtime

    return key_class_runtime(key_class, "rotate").backend.is_version_usable(version)


class KeyVersionReadyTrigger(BaseTrigger):
    """
    Fires once ``version`` of the key class's master key encrypts and decrypts a random probe.

    Holds only the key class name and the version: the connection is resolved where it runs.

    :param key_class: Key class name.
    :param version: The version to wait for.
    :param poll_interval: Seconds between checks.
    """

    def __init__(self, key_class: str, version: int, poll_interval: float = 10.0) -> None:
        super().__init__()
        self.key_class = key_class
        self.version = int(version)
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "keyrotation_airflow.triggers.key_version.KeyVersionReadyTrigger",
            {"key_class": self.key_class, "version": self.version, "poll_interval": self.poll_interval},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                ready = await asyncio.to_thread(version_usable, self.key_class, self.version)
            except Exception as exc:  # noqa: BLE001 - reported to the task, which fails with it
                yield TriggerEvent({"status": "error", "version": self.version, "message": str(exc)})
                return
            if ready:
                yield TriggerEvent({"status": "ready", "version": self.version})
                return
            self.log.info("key class %s: v%s not usable yet", self.key_class, self.version)
            await asyncio.sleep(self.poll_interval)
