"""The compliance report, for auditors: evidence tables from the ledger, the KMS metadata, the
census and Airflow's run history (REST API); findings per control; HTML with charts, PDF, and
CSV/Parquet of every table; written to a local folder or an object store, and recorded in the
ledger with each artifact's SHA-256."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from datetime import UTC, datetime

from keyrotation import ledger as lg
from keyrotation.ledger import Ledger, RunContext
from keyrotation.reports.airflow_history import AirflowHistory, HistoryUnavailable
from keyrotation.reports.charts import all_charts
from keyrotation.reports.evidence import Evidence, KeyClassEvidence, Period, collect
from keyrotation.reports.findings import CONTROLS, findings
from keyrotation.reports.render import content_hash, render_html, render_pdf, table_files
from keyrotation.stores.filesystems import Storage

__all__ = ["CONTROLS", "AirflowHistory", "BuiltReport", "Evidence", "HistoryUnavailable", "KeyClassEvidence", "Period",
           "ReportResult", "build_report", "write_report"]


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


def build_report(items: list[KeyClassEvidence], ledger: Ledger, period: Period,
                 history: AirflowHistory | None = None, now: datetime | None = None) -> BuiltReport:
    """Every artifact of the report, by file name."""
    ev = collect(items, ledger, period, history, now or datetime.now(UTC))
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
    return BuiltReport(files, digest, {s: int(counts.get(s, 0)) for s in ("PASS", "WARN", "FAIL")})


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
    ledger.record(lg.REPORT_WRITTEN, "*", ctx, detail={"period": str(period), **result.summary()})
    return result
