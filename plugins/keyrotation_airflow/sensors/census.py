"""Sensor: the census gate before retirement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import PokeReturnValue
from airflow.sdk.exceptions import AirflowSkipException

from keyrotation.retirement import census_gate
from keyrotation_airflow.operators.base import KeyClassSensor
from keyrotation_airflow.task_runtime import denied_fails_fast


class CensusGateSensor(KeyClassSensor):
    """
    Wait until no partition of any dataset of the key class is under a version due for retirement.

    Skips (and so skips retirement) when no version is due for retirement.

    :param key_class: Key class name. (templated)
    """

    role = "retire"
    template_fields: Sequence[str] = ("key_class",)
    ui_color = "#d7e8f4"

    def __init__(self, *, key_class: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class

    def poke(self, context: Any) -> bool | PokeReturnValue:
        rt = self.runtime
        with denied_fails_fast():
            plan = rt.retirement_plan()
        if plan is None:
            raise AirflowSkipException(f"key class {rt.name}: no version is due for retirement")
        gate = census_gate(plan, rt.censuses(), rt.ledger)  # the retirement gate's census test
        summary = gate.summary()
        for census, dataset in zip(gate.censuses, summary["datasets"], strict=True):
            self.log.info("%s; %d partitions under versions below v%s", census.format(),
                          dataset["under_retired_versions"], plan.new_min_version)
        for reason in gate.reasons:
            self.log.info("not yet: %s", reason)
        # The census the gate passed on goes to XCom: the approval shows it.
        return PokeReturnValue(is_done=gate.passed, xcom_value=summary)
