"""Sensor: wait until a new master key version is usable (HSM-backed keys take a while)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import conf
from airflow.sdk.exceptions import AirflowException, AirflowSensorTimeout

from keyrotation_airflow.operators.base import KeyClassSensor
from keyrotation_airflow.task_runtime import denied_fails_fast
from keyrotation_airflow.triggers.key_version import KeyVersionReadyTrigger


class KeyVersionReadySensor(KeyClassSensor):
    """
    Wait until ``version`` of a key class's master key is usable: on Cloud KMS until the version is
    ``ENABLED`` (HSM and external keys pass through ``PENDING_GENERATION``), elsewhere until it
    encrypts and decrypts a random probe. Deferrable: the trigger polls asynchronously and gives up
    at ``timeout`` with the state the version is still in.

    :param key_class: Key class name. (templated)
    :param version: The version to wait for, usually pulled from the rotate task. (templated)
    :param deferrable: Wait in the triggerer instead of a worker slot.
        (default: False, or ``[operators] default_deferrable``)
    """

    role = "rotate"
    template_fields: Sequence[str] = ("key_class", "version")
    ui_color = "#d7e8f4"

    def __init__(self, *, key_class: str, version: int | str,
                 deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class
        self.version = version
        self.deferrable = deferrable

    def execute(self, context: Any) -> Any:
        if self.deferrable and not self.poke(context):
            # The trigger gives up at the sensor's timeout with an event naming the state the version is
            # still in; the deferral's own timeout is a backstop a little later.
            self.defer(
                trigger=KeyVersionReadyTrigger(self.key_class, int(self.version), float(self.poke_interval),
                                               timeout=float(self.timeout)),
                method_name="execute_complete",
                timeout=timedelta(seconds=float(self.timeout) + 2 * float(self.poke_interval) + 60),
            )
        elif not self.deferrable:
            super().execute(context=context)

    def execute_complete(self, context: Any, event: dict | None = None) -> None:
        if event and event.get("status") == "timeout":
            raise AirflowSensorTimeout(f"{event['message']}: the version is not usable; check the key in the KMS "
                                       "(an HSM or external key may still be generating or have failed)")
        if not event or event.get("status") != "ready":
            detail = (event or {}).get("message") or event
            raise AirflowException(f"key class {self.key_class}: waiting for v{self.version} failed: {detail}")
        self.log.info("key class %s: v%s is usable", self.key_class, event["version"])

    def poke(self, context: Any) -> bool:
        with denied_fails_fast():
            ready = self.runtime.backend.is_version_usable(int(self.version))
        self.log.info("key class %s: v%s %s", self.key_class, self.version, "usable" if ready else "not usable yet")
        return ready
