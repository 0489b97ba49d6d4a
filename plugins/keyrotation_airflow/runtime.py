"""Glue between an Airflow task and the core: config, backend, ledger and the run context."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from keyrotation.config import Dataset, KeyClass, load_key_class
from keyrotation.errors import PermissionDenied
from keyrotation.ledger import Ledger, RunContext
from keyrotation.runtime import KeyClassRuntime
from keyrotation.stores.filesystems import Storage
from keyrotation_airflow.hooks.kms import KeyClassKmsHook
from keyrotation_airflow.hooks.storage import DatasetStorageHook


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


def key_class_runtime(key_class: str, role: str) -> KeyClassRuntime:
    """Load the key class config afresh (so a run sees the file as it is now) and connect its KMS
    with the connection of ``role`` (rotate, reencrypt, retire, report)."""
    config = load_key_class(key_class)
    backend = KeyClassKmsHook(config.key_class, role).get_backend()
    return KeyClassRuntime(config, backend, Ledger(), storage=dataset_storage(config.key_class, role))


def dataset_storage(kc: KeyClass, role: str) -> Callable[[Dataset], Storage]:
    """Each dataset's storage through its Airflow connection, resolved once per dataset."""
    cache: dict[str, Storage] = {}

    def storage(dataset: Dataset) -> Storage:
        if dataset.name not in cache:
            cache[dataset.name] = DatasetStorageHook(dataset, kc, role).get_conn()
        return cache[dataset.name]

    return storage


@contextmanager
def denied_fails_fast() -> Iterator[None]:
    """A refusal by the KMS's policy fails the task at once: retries cannot change the policy."""
    try:
        yield
    except PermissionDenied as exc:
        raise AirflowFailException(f"{exc}; not retried") from None
