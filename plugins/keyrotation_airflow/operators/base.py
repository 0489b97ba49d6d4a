"""What every operator and sensor on one key class shares: its runtime, reached with the connection of its role."""

from __future__ import annotations

from functools import cached_property
from typing import ClassVar

from airflow.sdk import BaseOperator, BaseSensorOperator

from keyrotation.runtime import KeyClassRuntime
from keyrotation_airflow.task_runtime import key_class_runtime


class KeyClassRuntimeMixin:
    """
    Owns the key class's :class:`~keyrotation.runtime.KeyClassRuntime` (config, KMS backend, ledger, dataset
    storage), built on first use through :func:`~keyrotation_airflow.task_runtime.key_class_runtime` with the
    connection of :attr:`role`, and kept for the rest of this operator instance's run in this process.

    Like the amazon provider's ``AwsBaseHookMixin``: a subclass declares its ``role`` and reads ``self.runtime``
    where it first needs the KMS, so a failure to connect happens where it did (inside ``denied_fails_fast``
    where the task has one). ``key_class`` is a template field: the runtime is built from its rendered value.
    """

    #: ``rotate``, ``reencrypt``, ``retire`` or ``report``: the key class's connection this operator acts with.
    role: ClassVar[str]
    key_class: str

    @cached_property
    def runtime(self) -> KeyClassRuntime:
        return key_class_runtime(self.key_class, self.role)

    @cached_property
    def report_runtime(self) -> KeyClassRuntime:
        """The key class through the read-only ``report`` role, for what only reads (a dry run)."""
        return self.runtime if self.role == "report" else key_class_runtime(self.key_class, "report")


class KeyClassOperator(BaseOperator, KeyClassRuntimeMixin):
    """An operator on one key class; see :class:`KeyClassRuntimeMixin`."""


class KeyClassSensor(BaseSensorOperator, KeyClassRuntimeMixin):
    """A sensor on one key class; see :class:`KeyClassRuntimeMixin`."""
