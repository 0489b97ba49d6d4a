"""Trigger that waits, asynchronously, until a master key version is usable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


def version_usable(key_class: str, version: int) -> bool:
    from keyrotation_airflow.task_runtime import key_class_runtime

    return key_class_runtime(key_class, "rotate").backend.is_version_usable(version)


def _gcp_poll_target(key_class: str, version: int) -> tuple[dict[str, Any], str] | None:
    """For a Cloud KMS key class: the client arguments of its rotate connection and the version's resource
    name; None for other backends. Blocking (reads the connection): run it in a thread."""
    from keyrotation.config import load_key_class
    from keyrotation_airflow.hooks.kms import KeyClassKmsHook

    kc = load_key_class(key_class).key_class
    if kc.backend != "gcp_kms":
        return None
    from keyrotation.backends.gcp_kms import version_resource_name

    return KeyClassKmsHook(kc, "rotate").cloud_kms_client_args(), version_resource_name(kc.key_ref, version)


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
            "keyrotation_airflow.triggers.key_version.KeyVersionReadyTrigger",
            {"key_class": self.key_class, "version": self.version, "poll_interval": self.poll_interval,
             "timeout": self.timeout},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        deadline = time.monotonic() + self.timeout if self.timeout is not None else None
        try:
            target = await asyncio.to_thread(_gcp_poll_target, self.key_class, self.version)
            if target is not None:
                from google.cloud.kms_v1 import KeyManagementServiceAsyncClient

                client = KeyManagementServiceAsyncClient(**target[0])  # bound to this event loop
        except Exception as exc:  # noqa: BLE001 - reported to the task, which fails with it
            yield TriggerEvent({"status": "error", "version": self.version, "message": str(exc)})
            return
        state = "not usable"
        while True:
            try:
                if target is None:
                    ready = await asyncio.to_thread(version_usable, self.key_class, self.version)
                else:
                    described = await client.get_crypto_key_version(name=target[1])
                    state = described.state.name
                    ready = state == "ENABLED"
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
