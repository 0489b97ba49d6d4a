"""The compliance report, for auditors: evidence tables from the ledger, the KMS metadata, the
census and Airflow's run history (REST API); findings per control; HTML with charts, PDF, and
CSV/Parquet of every table; written to a local folder or an object store, and recorded in the
ledger with each artifact's SHA-256."""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from keyrotation import ledger as lg
from keyrotation.ledger import Ledger, RunContext
from keyrotation.reports.airflow_history import AirflowHistory, HistoryUnavailable
from keyrotation.reports.charts import all_charts
from keyrotation.reports.evidence import Evidence, KeyClassEvidence, Period, collect
from keyrotation.reports.findings import CONTROLS, findings
from keyrotation.reports.render import content_hash, render_html, render_pdf, table_files
from keyrotation.stores.filesystems import Storage

__all__ = ["CONTROLS", "DEFAULT_MIN_INTERVAL", "REPORT_SKIPPED", "AirflowHistory", "BuiltReport", "Evidence",
           "HistoryUnavailable", "KeyClassEvidence", "Period", "PreviousReport", "ReportResult", "build_report",
           "changed_key_classes", "previous_report", "skip_reason", "write_report"]

#: Ledger event of a report not written because the previous one is too recent (asset-triggered runs).
REPORT_SKIPPED = "report_skipped"
#: After an audit event, no new report on a key class if the previous report covering it is younger than this.
DEFAULT_MIN_INTERVAL = timedelta(hours=1)


@dataclass(frozen=True)
class PreviousReport:
    """The last report recorded in the ledger: each report names it, so the reports form a chain."""

    ledger_id: int
    written_at: datetime
    period: str
    location: str
    html_path: str
    html_sha256: str
    pdf_sha256: str
    content_hash: str
    key_classes: tuple[str, ...] | None = None  # None: a report that did not record them (taken as all)

    def covers(self, key_class: str) -> bool:
        return self.key_classes is None or key_class in self.key_classes

    def summary(self) -> dict:
        return {"ledger_id": self.ledger_id, "written_at": self.written_at.isoformat(timespec="seconds"),
                "period": self.period, "location": self.location, "html": self.html_path,
                "html_sha256": self.html_sha256, "pdf_sha256": self.pdf_sha256, "content_hash": self.content_hash}


def _previous(row: dict) -> PreviousReport:
    detail = json.loads(row["detail"] or "{}")
    artifacts = detail.get("artifacts") or {}
    when = row["recorded_at"]
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    covered = detail.get("key_classes")
    return PreviousReport(int(row["id"]), when, str(detail.get("period") or ""), str(detail.get("location") or ""),
                          str(detail.get("html") or ""), str(artifacts.get("report.html") or ""),
                          str(artifacts.get("report.pdf") or ""), str(detail.get("content_hash") or ""),
                          None if covered is None else tuple(covered))


def previous_report(ledger: Ledger, key_class: str | None = None) -> PreviousReport | None:
    """The most recent ``report_written`` event of the ledger (that covered ``key_class`` if given), with
    its artifacts' SHA-256."""
    for row in reversed(ledger.rows(events_in=(lg.REPORT_WRITTEN,))):
        previous = _previous(row)
        if key_class is None or previous.covers(key_class):
            return previous
    return None


def changed_key_classes(ledger: Ledger, key_classes: list[str]) -> list[str]:
    """The key classes among ``key_classes`` with ledger events since the last report that covered each
    (any event if none did): what an audit event without a key class in its extra stands for."""
    changed = []
    for name in key_classes:
        previous = previous_report(ledger, name)
        rows = ledger.rows(key_class=name)
        if any(r["event"] not in (lg.REPORT_WRITTEN, REPORT_SKIPPED)
               and (previous is None or int(r["id"]) > previous.ledger_id) for r in rows):
            changed.append(name)
    return changed


def skip_reason(ledger: Ledger, now: datetime, min_interval: timedelta, key_class: str | None = None) -> str | None:
    """Why an audit-triggered report (on ``key_class`` if given) should not be written now: the previous
    report (that covered it) is younger than ``min_interval``; None to write it."""
    previous = previous_report(ledger, key_class)
    if previous is None or min_interval <= timedelta(0):
        return None
    age = now - previous.written_at
    if age >= min_interval:
        return None
    subject = f"key class {key_class}: previous report covering it" if key_class else "previous report"
    return (f"{subject} written {int(age.total_seconds() // 60)} min ago "
            f"({previous.written_at.isoformat(timespec='seconds')}, {previous.html_path}), less than the minimum "
            f"interval of {int(min_interval.total_seconds() // 60)} min between reports after audit events")


@dataclass
class ReportResult:
    location: str
    html_path: str
    content_hash: str
    artifacts: dict[str, dict]  # name -> {"path", "sha256", "bytes"}
    findings: dict[str, int]  # status -> count

    def summary(self) -> dict:
        return {"location": self.location, "html": self.html_path, "content_hash": self.content_hash,
                "findings": self.findings, "artifacts": {n: a["sha256"] for n, a in self.artifacts.items()}}


@dataclass
class BuiltReport:
    files: dict[str, bytes]  # file name -> content
    content_hash: str
    findings: dict[str, int]  # status -> count
    previous: dict | None = None  # the report before this one, as its ``PreviousReport.summary()``


def build_report(items: list[KeyClassEvidence], ledger: Ledger, period: Period,
                 history: AirflowHistory | None = None, now: datetime | None = None) -> BuiltReport:
    """Every artifact of the report, by file name."""
    ev = collect(items, ledger, period, history, now or datetime.now(UTC))
    previous = previous_report(ledger)
    ev.previous = previous.summary() if previous else None
    found = findings(ev)
    charts = all_charts(ev.tables)
    digest = content_hash(found, ev.tables)
    files = {
        "report.html": render_html(ev, found, charts, digest).encode(),
        "report.pdf": render_pdf(ev, found, charts, digest),
        **charts,
        **table_files(found, ev.tables),
        "CONTENT_SHA256": f"{digest}\n".encode(),
    }
    counts = found["status"].value_counts().to_dict()
    return BuiltReport(files, digest, {s: int(counts.get(s, 0)) for s in ("PASS", "WARN", "FAIL")}, ev.previous)


def write_report(items: list[KeyClassEvidence], ledger: Ledger, location: str, period: Period, *,
                 history: AirflowHistory | None = None, storage: Storage | None = None,
                 ctx: RunContext | None = None, now: datetime | None = None) -> ReportResult:
    """Build the report and write it under ``location`` (a folder, ``s3://`` or ``gs://``); record the
    artifacts' paths and hashes in the ledger."""
    built = build_report(items, ledger, period, history, now)
    fs, root = (storage or Storage()).filesystem(location)
    fs.create_dir(root, recursive=True)
    artifacts = {}
    for name, data in sorted(built.files.items()):
        path = posixpath.join(root, name)
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        artifacts[name] = {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    result = ReportResult(location, artifacts["report.html"]["path"], built.content_hash, artifacts, built.findings)
    ledger.record(lg.REPORT_WRITTEN, "*", ctx, detail={"period": str(period), **result.summary(),
                                                       "key_classes": sorted(i.key_class.name for i in items),
                                                       "previous": built.previous})
    return result
