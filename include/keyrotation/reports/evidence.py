"""The evidence tables of the compliance report, built from the ledger, the KMS's own metadata, the
census of each dataset and (when reachable) Airflow's run history. Each table is a pandas
DataFrame with an ``id`` column that findings point at."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import pandas as pd

from keyrotation import ledger as lg
from keyrotation.backends.base import KeyState
from keyrotation.census import Census
from keyrotation.config import KeyClass, policy_changes
from keyrotation.ledger import Ledger
from keyrotation.reports.airflow_history import AirflowHistory, HistoryUnavailable
from keyrotation.status import behind

# NIST SP 800-57 Part 1 Rev. 5, symmetric data-encryption and key-wrapping keys: originator-usage
# period up to 2 years, recipient-usage period up to 3 years beyond it.
NIST_ORIGINATOR_USAGE = timedelta(days=730)
NIST_RECIPIENT_EXTRA = timedelta(days=3 * 365)

PARTITION_EVENTS = (lg.PARTITION_WRITTEN, lg.PARTITION_REWRAPPED, lg.PARTITION_REENCRYPTED, lg.PARTITION_RECONCILED)
FAILURE_EVENTS = (lg.PARTITION_FAILED, lg.VALIDATION_FAILED, lg.RETIREMENT_REFUSED)
# Decisions that record the policy they were taken under (detail.policy, KeyClass.policy_facts).
POLICY_EVENTS = (lg.KEY_CREATED, lg.VERSION_CREATED, lg.ROTATION_SKIPPED, lg.RETIREMENT_DECISION,
                 lg.VERSIONS_RETIRED, lg.RETIREMENT_REFUSED, lg.RETIREMENT_NOT_POSSIBLE)
ALGORITHMS = {"aes256-gcm96": "AES-256-GCM", "SYMMETRIC_DEFAULT": "AES-256-GCM"}


@dataclass
class KeyClassEvidence:
    """What the KMS and the census say about one key class now."""

    key_class: KeyClass
    state: KeyState
    censuses: list[Census]
    deletion_dates: dict[int, datetime] = field(default_factory=dict)


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime

    @classmethod
    def month_of(cls, day: date) -> Period:
        first = day.replace(day=1)
        nxt = (first + timedelta(days=32)).replace(day=1)
        return cls(datetime(first.year, first.month, 1, tzinfo=UTC), datetime(nxt.year, nxt.month, 1, tzinfo=UTC))

    def __str__(self) -> str:
        return f"{self.start.date().isoformat()} to {(self.end - timedelta(seconds=1)).date().isoformat()}"

    def contains(self, when: datetime) -> bool:
        return self.start <= _aware(when) < self.end


@dataclass
class Evidence:
    """Every table of the report, plus what could not be read."""

    period: Period
    generated_at: datetime
    tables: dict[str, pd.DataFrame]
    history_error: str | None = None
    ledger_ok: bool = True
    ledger_detail: str = ""
    #: The report written before this one (``PreviousReport.summary()``), None for the first.
    previous: dict | None = None


def _aware(value: datetime | str | None) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _iso(value: datetime | str | None) -> str:
    value = _aware(value)
    return value.astimezone(UTC).isoformat(timespec="seconds") if value else ""


def _days(delta: timedelta | None) -> float | None:
    return None if delta is None else round(delta.total_seconds() / 86400, 1)


def _frame(rows: list[dict], prefix: str, columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=columns)
    frame.insert(0, "id", [f"{prefix}-{i}" for i in range(1, len(frame) + 1)])
    return frame


def key_inventory(items: list[KeyClassEvidence], ledger: Ledger, now: datetime) -> pd.DataFrame:
    rows = []
    for ev in items:
        kc, state = ev.key_class, ev.state
        reference_row = ledger.current_reference(kc.name)
        reference = int(reference_row["to_version"]) if reference_row else None
        since = reference_row["recorded_at"] if reference_row else None
        created = state.created_at(reference) if reference else None
        first = min((v.created_at for v in state.versions.values() if v.created_at), default=None)
        rows.append({
            "key_class": kc.name, "backend": kc.backend, "key_ref": kc.key_ref,
            "algorithm": ALGORITHMS.get(state.algorithm, state.algorithm or "unknown"), "owner": kc.owner,
            "exists": state.exists, "created": _iso(first), "current_version": reference,
            "current_version_created": _iso(created), "age_days": _days(now - created) if created else None,
            "cryptoperiod_days": kc.rotation.cryptoperiod.days,
            "next_due": _iso(created + kc.rotation.due_after) if created else "",
            "kms_latest_version": state.latest_version, "min_decryption_version": state.min_decryption_version,
            "min_encryption_version": state.min_encryption_version,
            "retirement": "retire DAG" if kc.retires_versions else "not possible (KMS keeps every version)",
            "behind": behind(kc, reference, since, ev.censuses, now) or "",
        })
    return _frame(rows, "inv", ["key_class", "backend", "key_ref", "algorithm", "owner", "exists", "created",
                                "current_version", "current_version_created", "age_days", "cryptoperiod_days",
                                "next_due", "kms_latest_version", "min_decryption_version",
                                "min_encryption_version", "retirement", "behind"])


def versions(items: list[KeyClassEvidence], now: datetime) -> pd.DataFrame:
    rows = []
    for ev in items:
        kc, state = ev.key_class, ev.state
        period = min(kc.rotation.cryptoperiod, NIST_ORIGINATOR_USAGE)
        for number in range(1, state.latest_version + 1):
            version = state.versions.get(number)
            created = version.created_at if version else None
            retired = number < state.min_decryption_version
            status = "retired" if retired else ("enabled" if version else "unknown")
            if number in ev.deletion_dates:
                status = "pending deletion"
            rows.append({
                "key_class": kc.name, "version": number, "status": status, "created": _iso(created),
                "age_days": _days(now - created) if created else None,
                "originator_usage_end": _iso(created + period) if created else "",
                "recipient_usage_end": _iso(created + period + NIST_RECIPIENT_EXTRA) if created else "",
                "deletion_date": _iso(ev.deletion_dates.get(number)),
            })
    return _frame(rows, "ver", ["key_class", "version", "status", "created", "age_days", "originator_usage_end",
                                "recipient_usage_end", "deletion_date"])


def rotations(items: list[KeyClassEvidence], ledger: Ledger, period: Period) -> pd.DataFrame:
    """Every version creation on record, with the gap since the previous one against the cryptoperiod."""
    rows = []
    for ev in items:
        kc = ev.key_class
        previous = None
        for row in ledger.rows(key_class=kc.name, events_in=(lg.KEY_CREATED, lg.VERSION_CREATED)):
            when = _aware(row["recorded_at"])
            gap = when - previous if previous else None
            detail = json.loads(row["detail"] or "{}")
            rows.append({
                "key_class": kc.name, "time": _iso(when), "event": row["event"], "from_version": row["from_version"],
                "to_version": row["to_version"], "days_since_previous": _days(gap),
                "on_time": None if gap is None else gap <= kc.rotation.cryptoperiod,
                "in_period": period.contains(when), "reason": detail.get("reason") or "", "actor": row["actor"] or "",
                "dag_id": row["dag_id"] or "", "run_id": row["run_id"] or "",
            })
            previous = when
    frame = _frame(rows, "rot", ["key_class", "time", "event", "from_version", "to_version", "days_since_previous",
                                 "on_time", "in_period", "reason", "actor", "dag_id", "run_id"])
    return frame.astype({"from_version": "Int64", "to_version": "Int64"})  # a key's creation has no "from"


def coverage(items: list[KeyClassEvidence], ledger: Ledger) -> pd.DataFrame:
    rows = []
    for ev in items:
        reference = ledger.current_version(ev.key_class.name)
        for census in ev.censuses:
            for version, cov in census.coverage().items():
                files = sum(p.units for p in census.partitions.values() if p.oldest == version)
                rows.append({"key_class": ev.key_class.name, "dataset": census.dataset, "version": version,
                             "current": version == reference, **cov, "data_files": files})
            if census.errors:
                rows.append({"key_class": ev.key_class.name, "dataset": census.dataset, "version": None,
                             "current": False, "partitions": len(census.errors), "rows": 0, "bytes": 0,
                             "data_files": 0})
    return _frame(rows, "cov", ["key_class", "dataset", "version", "current", "partitions", "rows", "bytes",
                                "data_files"])


def coverage_history(items: list[KeyClassEvidence], ledger: Ledger, period: Period) -> pd.DataFrame:
    """Partitions per version after each run (each run and minute) that changed partitions in the period,
    replayed from the ledger. The first rows (at the period's start) are the state carried in from
    before it; each later row lists every series of its key class seen so far, 0 once it has no
    partitions left, so a series reads as a step function with no gaps."""
    rows = []
    for ev in items:
        latest: dict[tuple[str, str], int] = {}
        snapshots: list[tuple[datetime, dict[tuple[str, int], int]]] = []
        group = None
        changes = ledger.rows(key_class=ev.key_class.name, events_in=PARTITION_EVENTS)
        for row in sorted(changes, key=lambda r: (_aware(r["recorded_at"]), r["id"])):
            if row["status"] != "ok" or row["to_version"] is None:
                continue
            when = _aware(row["recorded_at"])
            latest[(row["dataset"], row["partition"])] = int(row["to_version"])
            counts: dict[tuple[str, int], int] = {}
            for (dataset, _), version in latest.items():
                counts[(dataset, version)] = counts.get((dataset, version), 0) + 1
            key = (row["run_id"], when.replace(second=0, microsecond=0))
            if key == group:
                snapshots[-1] = (when, counts)
            else:
                snapshots.append((when, counts))
                group = key
        before = [counts for when, counts in snapshots if when < period.start]
        shown = [(when, counts) for when, counts in snapshots if period.contains(when)]
        if before and not (shown and shown[0][0] == period.start):
            shown.insert(0, (period.start, before[-1]))
        seen: set[tuple[str, int]] = set()
        for when, counts in shown:
            seen.update(counts)
            for dataset, version in sorted(seen):
                rows.append({"time": when.strftime("%Y-%m-%dT%H:%M:%S"), "key_class": ev.key_class.name,
                             "dataset": dataset, "version": version, "partitions": counts.get((dataset, version), 0)})
    return _frame(rows, "hist", ["time", "key_class", "dataset", "version", "partitions"])


def retirements(items: list[KeyClassEvidence], ledger: Ledger, period: Period) -> pd.DataFrame:
    rows = []
    events = (lg.VERSIONS_RETIRED, lg.RETIREMENT_REFUSED, lg.RETIREMENT_NOT_POSSIBLE, lg.RETIREMENT_DECISION)
    for ev in items:
        for row in ledger.rows(key_class=ev.key_class.name, events_in=events):
            when = _aware(row["recorded_at"])
            if not period.contains(when):
                continue
            detail = json.loads(row["detail"] or "{}")
            approval = detail.get("approval") or (detail if row["event"] == lg.RETIREMENT_DECISION else {})
            pending = [_iso(d) for v, d in sorted(ev.deletion_dates.items())
                       if row["from_version"] and row["to_version"] and row["from_version"] <= v < row["to_version"]]
            rows.append({
                "key_class": ev.key_class.name, "time": _iso(when), "event": row["event"], "status": row["status"],
                "versions_below": row["to_version"], "approved_by": (approval or {}).get("approved_by") or "",
                "rotated_by": detail.get("rotated_by") or "",
                # the policy recorded with the decision; rows recorded before policies were: today's config
                "approval_required": (detail.get("policy") or {}).get(
                    "approval_required", ev.key_class.retire.approval_required),
                "separate_approver": (detail.get("policy") or {}).get(
                    "separate_approver", ev.key_class.retire.separate_approver),
                "trim": detail.get("trim"),
                "deletion_scheduled_for": ", ".join(pending),
                "reasons": "; ".join(detail.get("reasons") or []), "actor": row["actor"] or "",
                "dag_id": row["dag_id"] or "", "run_id": row["run_id"] or "",
            })
    frame = _frame(rows, "ret", ["key_class", "time", "event", "status", "versions_below", "approved_by",
                                 "rotated_by", "approval_required", "separate_approver", "trim",
                                 "deletion_scheduled_for", "reasons", "actor", "dag_id", "run_id"])
    return frame.astype({"versions_below": "Int64"})


def _partition(run: dict) -> str:
    """The partition a run worked on: its asset partition key, or the range asked for in its conf."""
    if run.get("partition_key"):
        return str(run["partition_key"])
    conf = run.get("conf") if isinstance(run.get("conf"), dict) else {}
    low, high = conf.get("partition_from"), conf.get("partition_to")
    return f"{low or ''}..{high or ''}" if low or high else ""


def policy_history(items: list[KeyClassEvidence], ledger: Ledger, period: Period) -> pd.DataFrame:
    """Every change of policy in the period, seen at the first decision taken under the new one (the
    policy each decision recorded, compared with the one recorded before it, however long ago)."""
    rows = []
    for ev in items:
        before: dict | None = None
        for row in ledger.rows(key_class=ev.key_class.name, events_in=POLICY_EVENTS):
            policy = json.loads(row["detail"] or "{}").get("policy")
            if not policy:
                continue
            if before is not None and policy.get("config_sha256") != before.get("config_sha256"):
                when = _aware(row["recorded_at"])
                changes = policy_changes(before, policy)
                if period.contains(when):
                    rows.append({
                        "key_class": ev.key_class.name, "time": _iso(when), "decision": row["event"],
                        "ledger_row": row["id"], "changed": "; ".join(t for t, _ in changes) or "other settings",
                        "weaker": "; ".join(t for t, weaker in changes if weaker),
                        "from_config": before.get("config_sha256") or "", "to_config": policy["config_sha256"],
                        "actor": row["actor"] or "", "run_id": row["run_id"] or "",
                    })
            before = policy
    return _frame(rows, "pol", ["key_class", "time", "decision", "ledger_row", "changed", "weaker", "from_config",
                                "to_config", "actor", "run_id"])


def runs(history: list[dict]) -> pd.DataFrame:
    """Runs that ran in the period (backfills of past intervals included), ordered by start."""
    rows = [{
        "dag_id": r.get("dag_id"), "run_id": r.get("dag_run_id"), "run_type": r.get("run_type"),
        "state": r.get("state"), "run_after": _iso(r.get("run_after")), "start": _iso(r.get("start_date")),
        "end": _iso(r.get("end_date")), "data_interval_start": _iso(r.get("data_interval_start")),
        "data_interval_end": _iso(r.get("data_interval_end")), "partition": _partition(r),
        "triggered_by": r.get("triggered_by") or "", "triggering_user": r.get("triggering_user_name") or "",
        "reason": ((r.get("conf") or {}).get("reason") or "") if isinstance(r.get("conf"), dict) else "",
    } for r in sorted(history, key=lambda r: (_iso(r.get("start_date")), r.get("dag_id") or "",
                                              r.get("dag_run_id") or ""))]
    return _frame(rows, "run", ["dag_id", "run_id", "run_type", "state", "run_after", "start", "end",
                                "data_interval_start", "data_interval_end", "partition", "triggered_by",
                                "triggering_user", "reason"])


def failures(items: list[KeyClassEvidence], ledger: Ledger, period: Period, tis: list[dict]) -> pd.DataFrame:
    """Failed or retried task instances (Airflow) and failures recorded in the ledger, in the period."""
    rows = []
    for t in tis:
        retried = int(t.get("try_number") or 0) > 1
        if t.get("state") == "failed" or retried:
            rows.append({"source": "airflow", "time": _iso(t.get("end_date") or t.get("start_date")),
                         "dag_id": t.get("dag_id"), "run_id": t.get("dag_run_id"), "task": t.get("task_id"),
                         "map_index": t.get("map_index"), "state": t.get("state"), "tries": t.get("try_number"),
                         "key_class": "", "detail": "retried" if retried and t.get("state") == "success" else ""})
    for ev in items:
        for row in ledger.rows(key_class=ev.key_class.name, events_in=FAILURE_EVENTS):
            when = _aware(row["recorded_at"])
            if not period.contains(when):
                continue
            detail = json.loads(row["detail"] or "{}")
            text = detail.get("error") or "; ".join(detail.get("reasons") or []) or row["status"]
            rows.append({"source": "ledger", "time": _iso(when), "dag_id": row["dag_id"] or "",
                         "run_id": row["run_id"] or "", "task": row["task_id"] or "", "map_index": None,
                         "state": row["event"], "tries": row["try_number"], "key_class": ev.key_class.name,
                         "detail": str(text)[:300] + (f" (partition {row['partition']})" if row["partition"] else "")})
    rows.sort(key=lambda r: r["time"])
    return _frame(rows, "fail", ["source", "time", "dag_id", "run_id", "task", "map_index", "state", "tries",
                                 "key_class", "detail"])


# Event-log rows Airflow writes itself when a task instance changes state (owner: the DAG's owner), not
# actions of a person.
TASK_STATE_EVENTS = frozenset({"queued", "scheduled", "running", "success", "failed", "skipped", "up_for_retry",
                               "up_for_reschedule", "upstream_failed", "deferred", "removed", "restarting"})


def ui_actions(log: list[dict]) -> pd.DataFrame:
    """What people did (trigger, clear, mark, pause, approve, ...): the event log without the task state
    changes Airflow records on its own."""
    log = [e for e in log if not (e.get("task_id") and e.get("event") in TASK_STATE_EVENTS)]
    rows = [{"when": _iso(e.get("when")), "event": e.get("event"), "user": e.get("owner") or "",
             "dag_id": e.get("dag_id") or "", "run_id": e.get("run_id") or "", "task": e.get("task_id") or "",
             "extra": str(e.get("extra") or "")[:200]} for e in log]
    return _frame(rows, "ui", ["when", "event", "user", "dag_id", "run_id", "task", "extra"])


def collect(items: list[KeyClassEvidence], ledger: Ledger, period: Period, history: AirflowHistory | None,
            now: datetime | None = None) -> Evidence:
    """Every evidence table for ``period``; Airflow's history is optional and its absence is stated."""
    now = now or datetime.now(UTC)
    history_error = None
    dag_runs: list[dict] = []
    tis: list[dict] = []
    log: list[dict] = []
    if history is None:
        history_error = "no Airflow API connection configured"
    else:
        try:
            dag_runs = history.dag_runs(period.start, period.end)
            tis = history.task_instances(period.start, period.end)
            log = history.event_log(period.start, period.end)
        except HistoryUnavailable as exc:
            history_error = str(exc)
    chain = ledger.verify()
    tables = {
        "key_inventory": key_inventory(items, ledger, now),
        "versions": versions(items, now),
        "rotations": rotations(items, ledger, period),
        "coverage": coverage(items, ledger),
        "coverage_history": coverage_history(items, ledger, period),
        "retirements": retirements(items, ledger, period),
        "policy_changes": policy_history(items, ledger, period),
        "runs": runs(dag_runs),
        "failures": failures(items, ledger, period, tis),
        "ui_actions": ui_actions(log),
    }
    detail = f"{chain.rows_checked} events, hash chain intact" if chain.ok else \
        f"hash chain broken at row {chain.first_broken_id}: {chain.reason}"
    return Evidence(period, now, tables, history_error, chain.ok, detail)
