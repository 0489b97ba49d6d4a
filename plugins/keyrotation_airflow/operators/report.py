"""Operator of the compliance report DAG."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowNotFoundException, AirflowSkipException

from keyrotation.config import list_key_classes
from keyrotation.errors import ConfigError, KeyRotationError
from keyrotation.ledger import Ledger, home_dir
from keyrotation.reports import (
    DEFAULT_MIN_INTERVAL,
    REPORT_SKIPPED,
    KeyClassEvidence,
    Period,
    changed_key_classes,
    skip_reason,
    write_report,
)
from keyrotation_airflow.hooks.airflow_api import AirflowApiHook
from keyrotation_airflow.hooks.storage import storage_for
from keyrotation_airflow.task_runtime import key_class_runtime, run_context, run_type


def report_period(start: str | None, end: str | None, context: Any) -> Period:
    """The period a run reports on: the params if given (``end`` inclusive); for a scheduled or backfill
    run its data interval (one month); otherwise (by hand, or after an audit event) the month so far."""
    if start or end:
        if not (start and end):
            raise ConfigError("parameters period_start and period_end go together (YYYY-MM-DD, both inclusive)")
        try:
            low, high = date.fromisoformat(str(start)), date.fromisoformat(str(end))
        except ValueError:
            raise ConfigError(f"parameters period_start/period_end: {start!r}/{end!r} are not dates "
                              "(YYYY-MM-DD)") from None
        if low > high:
            raise ConfigError(f"parameter period_start: {low} is after period_end {high}")
        return Period(datetime(low.year, low.month, low.day, tzinfo=UTC),
                      datetime(high.year, high.month, high.day, tzinfo=UTC) + timedelta(days=1))
    interval_start, interval_end = context.get("data_interval_start"), context.get("data_interval_end")
    if run_type(context) in ("scheduled", "backfill") and interval_start and interval_end > interval_start:
        return Period(interval_start.astimezone(UTC), interval_end.astimezone(UTC))
    now = datetime.now(UTC)
    return Period(datetime(now.year, now.month, 1, tzinfo=UTC), now + timedelta(seconds=1))


class ComplianceReportOperator(BaseOperator):
    """
    Write the compliance report for a period: findings per control, charts, the evidence tables as
    CSV and Parquet, ``report.html`` and ``report.pdf``, from the ledger, each KMS's metadata, each
    dataset's census and Airflow's run history (REST API, read-only). The artifacts' paths and
    SHA-256 go to the ledger. A key class whose config or KMS cannot be read is named in the log and
    left out, and the task fails after writing the report for the others.

    :param output_dir: Where to write: a folder, ``s3://bucket/prefix`` or ``gs://bucket/prefix``;
        default ``$KEYROTATION_HOME/reports/<period start>_<timestamp>``. (templated)
    :param output_conn_id: ``aws`` connection for an ``s3://`` output. (templated)
    :param key_classes: Key classes to report on; default: every key class file. (templated)
    :param period_start: First day reported on (YYYY-MM-DD); default: the run's data interval. (templated)
    :param period_end: Last day reported on, inclusive. (templated)
    :param api_conn_id: Connection to the Airflow API server for the run history; if it is not
        defined, the report says so and its LOG-1 finding is a WARN. (templated)
    :param min_interval_minutes: A run triggered by audit asset events reports on the key classes those
        events are about (their extra's ``key_class``; for an event without one, the key classes with
        ledger events since the last report covering them), less each key class whose previous report
        covering it was written less than this many minutes ago (the skip recorded in the ledger with its
        reason); with none left the run is skipped. 0 turns the limit off. Scheduled, backfill and manual
        runs always report on every key class. (templated)
    """

    template_fields: Sequence[str] = ("output_dir", "output_conn_id", "key_classes", "period_start", "period_end",
                                      "api_conn_id", "min_interval_minutes")
    ui_color = "#d6eaf8"

    def __init__(self, *, output_dir: str | None = None, output_conn_id: str | None = None,
                 key_classes: list[str] | None = None, period_start: str | None = None,
                 period_end: str | None = None, api_conn_id: str = AirflowApiHook.default_conn_name,
                 min_interval_minutes: int | str | None = int(DEFAULT_MIN_INTERVAL.total_seconds() // 60),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.output_dir = output_dir
        self.output_conn_id = output_conn_id
        self.key_classes = key_classes
        self.period_start = period_start
        self.period_end = period_end
        self.api_conn_id = api_conn_id
        self.min_interval_minutes = min_interval_minutes

    def min_interval(self) -> timedelta:
        value = self.min_interval_minutes
        if value in (None, ""):
            return DEFAULT_MIN_INTERVAL
        try:
            minutes = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"parameter min_interval_minutes: {value!r} is not a number of minutes") from None
        if minutes < 0:
            raise ConfigError(f"parameter min_interval_minutes: {value!r} is negative")
        return timedelta(minutes=minutes)

    def triggered_key_classes(self, context: Any, ledger: Ledger, candidates: list[str]) -> list[str]:
        """The key classes among ``candidates`` that the triggering audit events are about."""
        named, unnamed = set(), False
        for events in (context.get("triggering_asset_events") or {}).values():
            for event in events:
                name = (getattr(event, "extra", None) or {}).get("key_class")
                if name:
                    named.add(str(name))
                else:
                    unnamed = True
        if unnamed or not named:
            named.update(changed_key_classes(ledger, [c for c in candidates if c not in named]))
        return [c for c in candidates if c in named]

    def rate_limited(self, context: Any, ledger: Ledger, ctx: Any, candidates: list[str]) -> list[str]:
        """The key classes an audit-triggered run reports on; records a skip for each one left out."""
        interval, now = self.min_interval(), datetime.now(UTC)
        names = []
        for name in self.triggered_key_classes(context, ledger, candidates):
            reason = skip_reason(ledger, now, interval, name)
            if reason:
                ledger.record(REPORT_SKIPPED, name, ctx, status="skipped",
                              detail={"reason": reason, "run_type": "asset_triggered"})
                self.log.info("key class %s left out of the report: %s", name, reason)
            else:
                names.append(name)
        return names

    def execute(self, context: Any) -> dict:
        ledger = Ledger()
        ctx = run_context(context) if context.get("ti") else None
        names = list(self.key_classes or list_key_classes())
        if run_type(context) == "asset_triggered":
            names = self.rate_limited(context, ledger, ctx, names)
            if not names:
                reason = "no key class named by the audit events is due a report (see report_skipped events)"
                ledger.record(REPORT_SKIPPED, "*", ctx, status="skipped",
                              detail={"reason": reason, "run_type": "asset_triggered"})
                self.log.info("report skipped: %s", reason)
                raise AirflowSkipException(reason)
        period = report_period(self.period_start, self.period_end, context)
        items, problems = [], []
        for name in names:
            try:
                rt = key_class_runtime(name, "report")
                deletions = rt.backend.deletion_dates()
                items.append(KeyClassEvidence(rt.config.key_class, rt.backend.key_state(), rt.censuses(), deletions))
            except (KeyRotationError, OSError, ValueError) as exc:
                problems.append(f"{name}: {exc}")
                self.log.error("key class %s left out of the report: %s", name, exc)
        try:
            history = AirflowApiHook(self.api_conn_id).get_conn() if self.api_conn_id else None
        except AirflowNotFoundException:
            self.log.warning("connection %s is not defined: the report will not include Airflow's run history",
                             self.api_conn_id)
            history = None
        home = home_dir()
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = self.output_dir or f"{home}/reports/{period.start.date().isoformat()}_{stamp}"
        result = write_report(items, ledger, out, period, history=history,
                              storage=storage_for(out, self.output_conn_id), ctx=ctx)
        self.log.info("compliance report for %s, %d key classes: %s (findings %s, content SHA-256 %s)", period,
                      len(items), result.html_path, result.findings, result.content_hash)
        if problems:
            raise KeyRotationError(f"report written to {result.html_path} without {len(problems)} key classes: "
                                   + "; ".join(problems))
        return result.summary()
