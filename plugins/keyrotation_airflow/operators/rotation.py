"""Operators of the rotation DAG: create the new master key version, then make it the reference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowNotFoundException,
    AirflowSkipException,
)

from keyrotation import ledger as lg
from keyrotation.planning import estimate, select_partitions
from keyrotation.reports import HistoryUnavailable
from keyrotation.rotation import check_rotation, create_version, promote_version, record_skip, update_reference
from keyrotation_airflow.hooks.airflow_api import AirflowApiHook
from keyrotation_airflow.operators.base import KeyClassOperator
from keyrotation_airflow.task_runtime import denied_fails_fast, run_context, run_type


def as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def describe_events(context: Any) -> str:
    """Which asset events started the run: queue message ids only, never message bodies."""
    ids = []
    for events in (context.get("triggering_asset_events") or {}).values():
        for event in events:
            payload = (getattr(event, "extra", None) or {}).get("payload") or {}
            ids += [m.get("MessageId") for m in payload.get("message_batch", []) if isinstance(m, dict)]
    return f"messages {', '.join(i for i in ids if i)}" if ids else "asset event"


class RotateKeyOperator(KeyClassOperator):
    """
    Check a key class's master key (state, age against the rotation policy) and create a new version
    when rotation is due. Skips, and records the skip in the ledger, when it is not due.

    Returns the new version number (XCom). Creates the key first when it does not exist and the key
    class has ``create_if_missing``.

    :param key_class: Key class name (file ``<config dir>/<key_class>.yaml``). (templated)
    :param force: Rotate even when the current version is not yet due. (templated)
    :param reason: Why this rotation runs, recorded in the ledger. (templated)
    :param dry_run: Say whether a rotation is due and what the sweep after it would touch and cost (XCom
        ``dry_run_summary``, a ``dry_run`` ledger row); create nothing, and skip the rest of the run, so no
        asset event starts a sweep. (templated)
    :param follower_dag_ids: The DAGs the rotation's asset event must start (the sweeps, the retirement). Where
        the Airflow API connection is configured (``keyrotation_airflow_api``), a due rotation fails before
        creating anything if one of them is paused: Airflow queues no asset event for a paused DAG.
    """

    role = "rotate"
    template_fields: Sequence[str] = ("key_class", "force", "reason", "dry_run")
    ui_color = "#f4d7a1"

    def __init__(self, *, key_class: str, force: bool | str = False, reason: str | None = None,
                 dry_run: bool | str = False, follower_dag_ids: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class
        self.force = force
        self.reason = reason
        self.dry_run = dry_run
        self.follower_dag_ids = list(follower_dag_ids)

    def execute(self, context: Any) -> int:
        with denied_fails_fast():
            return self._rotate(context)

    def _rotate(self, context: Any) -> int:
        if as_bool(self.dry_run):
            return self._dry_run(context, as_bool(self.force))
        rt = self.runtime
        ctx = run_context(context)
        kind = run_type(context)
        force, reason = as_bool(self.force), self.reason
        if kind == "manual" and not (reason or "").strip():
            raise AirflowFailException(f"key class {rt.name}: a manual rotation needs a reason; trigger it "
                                       "again with the 'reason' parameter set (it goes to the ledger)")
        if kind == "asset_triggered":  # a message on the key class's KMS event queue: rotate now
            force, reason = True, reason or f"KMS event: {describe_events(context)}"
        state = rt.backend.key_state()
        check = check_rotation(rt.config.key_class, state, rt.ledger.current_version(rt.name), force=force)
        self.log.info("key class %s (%s %s): %s -> %s", rt.name, rt.config.key_class.backend,
                      rt.config.key_class.key_ref, check.reason, check.action)
        if not check.due:
            record_skip(rt.config.key_class, check, rt.ledger, ctx)
            raise AirflowSkipException(f"key class {rt.name}: rotation not due: {check.reason}")
        self._check_followers(rt.name)
        version = create_version(rt.backend, check, rt.ledger, ctx, reason=reason, kc=rt.config.key_class)
        self.log.info("key class %s: master key now at v%s", rt.name, version)
        return version


    def _check_followers(self, key_class: str) -> None:
        """Fail, before anything is created, if a DAG the rotation must start is paused (asked through the
        read-only API connection; where it is not configured, say that it was not checked)."""
        if not self.follower_dag_ids:
            return
        try:
            api = AirflowApiHook().get_conn()
        except AirflowNotFoundException:
            self.log.warning("key class %s: connection %s not configured: not checked that %s are active (they are "
                             "created active; a paused one would leave the data under the old version)", key_class,
                             AirflowApiHook.default_conn_name, ", ".join(self.follower_dag_ids))
            return
        try:
            paused = [d for d in self.follower_dag_ids if api.get(f"/api/v2/dags/{d}")["is_paused"]]
        except HistoryUnavailable as exc:
            raise AirflowException(f"key class {key_class}: cannot check that {', '.join(self.follower_dag_ids)} "
                                   f"are active: {exc}") from None
        if paused:
            raise AirflowFailException(
                f"key class {key_class}: {', '.join(paused)} {'is' if len(paused) == 1 else 'are'} paused: Airflow "
                "queues no asset event for a paused DAG, so this rotation would leave the data under the old version "
                "and nothing would retire it; nothing was created. Unpause it, then trigger the rotation again")

    def _dry_run(self, context: Any, force: bool) -> int:
        """What a rotation now would do, and the sweep after it: read through the report role (key metadata and
        the census), recorded as one ``dry_run`` row; then the task is skipped."""
        rt = self.report_runtime
        state = rt.backend.key_state()
        check = check_rotation(rt.config.key_class, state, rt.ledger.current_version(rt.name), force=force)
        following = state.latest_version + 1 if check.action in ("create", "rotate") else state.latest_version
        mode = rt.config.key_class.reencryption.mode
        datasets = []
        for ds in rt.config.datasets:
            census = rt.census(ds.name)
            partitions = select_partitions(census, following, mode, "sweep")
            cost = estimate(census, partitions, mode, ds.format, rt.backend.server_side_rewrap)
            datasets.append({"dataset": ds.name, "partitions": cost.partitions, "files": cost.files,
                             "rows": cost.rows, "bytes": cost.bytes, "kms_requests": cost.kms_requests,
                             "cloud_cost_usd": round(cost.cloud_cost_usd, 4), "census": census.summary()})
        summary = {"dry_run": True, "key_class": rt.name, "due": check.due, "action": check.action,
                   "check": check.reason, "latest_version": state.latest_version, "next_version": following,
                   "mode": mode, "sweep": datasets}
        rt.ledger.record(lg.DRY_RUN, rt.name, run_context(context), status="dry_run",
                         from_version=state.latest_version, to_version=following, detail=summary)
        context["ti"].xcom_push(key="dry_run_summary", value=summary)
        self.log.info("dry run: %s; would %s; the sweep after it: %s", check.reason, check.action,
                      "; ".join(f"{d['dataset']}: {d['partitions']} partitions, {d['rows']} rows, {d['bytes']} bytes, "
                                f"about {d['kms_requests']} KMS requests" for d in datasets) or "no datasets")
        raise AirflowSkipException(f"key class {rt.name}: dry run: nothing created, nothing started "
                                   "(XCom dry_run_summary)")


class UpdateKeyReferenceOperator(KeyClassOperator):
    """
    Make a version the KMS's primary where that is a step of its own (Cloud KMS, once the version
    is enabled), record it as the key class's current version in the ledger (the reference every
    re-encryption targets) and emit the key class's Asset event with the new version in its extra.

    :param key_class: Key class name. (templated)
    :param version: The version to make current, usually pulled from the rotate task. (templated)
    """

    role = "rotate"
    template_fields: Sequence[str] = ("key_class", "version")
    ui_color = "#f4d7a1"

    def __init__(self, *, key_class: str, version: int | str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_class = key_class
        self.version = version

    def execute(self, context: Any) -> dict:
        rt = self.runtime
        version = int(self.version)
        with denied_fails_fast():
            if promote_version(rt.backend, rt.name, version, rt.ledger, run_context(context)):
                self.log.info("key class %s: v%s is now the KMS's primary version", rt.name, version)
        previous = update_reference(rt.name, version, rt.ledger, run_context(context))
        self.log.info("key class %s: current version v%s (was %s)", rt.name, version,
                      f"v{previous}" if previous else "none")
        extra = {"key_class": rt.name, "version": version, "previous_version": previous}
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = extra
        return extra
