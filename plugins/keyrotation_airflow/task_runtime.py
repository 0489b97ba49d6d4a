"""Glue between an Airflow task and the core: config, backend, ledger and the run context."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from airflow.sdk import get_current_context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from keyrotation import ledger as lg
from keyrotation.config import Dataset, KeyClass, load_key_class
from keyrotation.errors import ConfigError, KeyRotationError, KmsUnreachable, PermissionDenied
from keyrotation.ledger import Ledger, RunContext
from keyrotation.partition_engine import PartitionResult
from keyrotation.runtime import KeyClassRuntime
from keyrotation.stores.filesystems import Storage
from keyrotation_airflow.hooks.kms import kms_hook
from keyrotation_airflow.hooks.storage import dataset_storage_hook

log = logging.getLogger(__name__)


def run_context(context: Any) -> RunContext:
    """Who acts, for the ledger: the task instance, and the user who triggered the run if any."""
    ti = context["ti"]
    dag_run = context.get("dag_run")
    actor = getattr(dag_run, "triggering_user_name", None) if dag_run is not None else None
    return RunContext(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, try_number=ti.try_number,
                      actor=actor)


def run_type(context: Any) -> str:
    """``scheduled``, ``backfill``, ``manual`` or ``asset_triggered``; empty outside a DAG run."""
    value = getattr(context.get("dag_run"), "run_type", "") or ""
    return getattr(value, "value", str(value))


class ConfigFailure(AirflowFailException, ConfigError):
    """A key class's config became invalid after its DAGs were parsed: the task fails at once, since a retry
    reads the same file; still a :class:`ConfigError` for a task that carries on without that key class."""


def key_class_runtime(key_class: str, role: str) -> KeyClassRuntime:
    """Load the key class config afresh (so a run sees the file as it is now) and connect its KMS
    with the connection of ``role`` (rotate, reencrypt, retire, report).

    Every task reaches its KMS through here (an operator on one key class through its ``runtime``, see
    :class:`~keyrotation_airflow.operators.base.KeyClassOperator`): a config error fails the task without
    retries (:class:`ConfigFailure`), and a KMS that cannot be reached at set-up is recorded in the ledger."""
    try:
        config = load_key_class(key_class)
    except ConfigError as exc:
        _record_failure(lg.CONFIG_INVALID, key_class, str(exc))
        raise ConfigFailure(f"{exc}; not retried") from None
    with kms_unreachable_recorded(config.key_class.name):
        backend = kms_hook(config.key_class, role).get_backend(config.key_class)
    return KeyClassRuntime(config, backend, Ledger(), storage=dataset_storage(config.key_class, role))


@contextmanager
def kms_unreachable_recorded(key_class: str | None) -> Iterator[None]:
    """Record a ``kms_unreachable`` row for the running task when the KMS cannot be reached, then let the
    error fail the task: it is retried, since an outage can pass."""
    try:
        yield
    except KmsUnreachable as exc:
        _record_unreachable(key_class, exc)
        raise


def _record_unreachable(key_class: str | None, exc: KmsUnreachable) -> None:
    """Once per error (set-up and the task's own calls may both see it go by), and only inside a task: the
    triggerer's failures are reported by the task that deferred."""
    if not key_class or getattr(exc, "recorded", False):
        return
    try:
        context = get_current_context()
    except RuntimeError:
        return
    exc.recorded = True  # type: ignore[attr-defined]
    _record_failure(lg.KMS_UNREACHABLE, key_class, str(exc), context)


def _record_failure(event: str, key_class: str, message: str, context: Any = None) -> None:
    """One ``failed`` ledger row for the running task (none outside a task); a ledger that cannot be written
    is logged, and the task's own error still fails it."""
    try:
        context = context or get_current_context()
    except RuntimeError:
        return
    try:
        Ledger().record(event, key_class, run_context(context), status="failed", detail={"error": message})
    except (KeyRotationError, sa.exc.SQLAlchemyError, OSError) as error:
        log.warning("key class %s: %s could not be recorded in the ledger: %s", key_class, event, error)


def partitions_failed(results: Sequence[PartitionResult], message: str) -> AirflowException:
    """What fails a task whose partitions failed: bad input (unreadable, invalid, not under the expected
    version) fails at once, since a retry finds the same; only a KMS outage, which can pass, is retried."""
    if any(r.retryable for r in results):
        return AirflowException(message)
    return AirflowFailException(f"{message}; not retried")


def dataset_storage(kc: KeyClass, role: str) -> Callable[[Dataset], Storage]:
    """Each dataset's storage through its Airflow connection, resolved once per dataset."""
    cache: dict[str, Storage] = {}

    def storage(dataset: Dataset) -> Storage:
        if dataset.name not in cache:
            cache[dataset.name] = dataset_storage_hook(dataset, kc, role).get_conn()
        return cache[dataset.name]

    return storage


@contextmanager
def denied_fails_fast() -> Iterator[None]:
    """A refusal by the KMS's policy fails the task at once: retries cannot change the policy. The KMS
    unreachable is recorded in the ledger (for the running task's key class) and retried."""
    try:
        yield
    except PermissionDenied as exc:
        raise AirflowFailException(f"{exc}; not retried") from None
    except KmsUnreachable as exc:
        try:
            key_class = getattr(get_current_context()["task"], "key_class", None)
        except RuntimeError:
            key_class = None
        _record_unreachable(key_class if isinstance(key_class, str) else None, exc)
        raise
