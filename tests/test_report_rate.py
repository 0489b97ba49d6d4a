"""Reports at a sensible rate, and as a chain: a report triggered by an audit event is skipped (and
the skip recorded with its reason) while the previous report is younger than the minimum interval;
scheduled and manual runs always write; each report names the previous one and its SHA-256, checked
here against the files on disk."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from keyrotation import ledger as lg
from keyrotation.ledger import Ledger, RunContext
from keyrotation.reports import Period, write_report

AUGUST = Period(datetime(2025, 8, 1, tzinfo=UTC), datetime(2025, 9, 1, tzinfo=UTC))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_report_names_the_previous_one_and_its_sha256(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'chain.db'}")
    first = write_report([], ledger, str(tmp_path / "one"), AUGUST, ctx=RunContext(run_id="one"))
    second = write_report([], ledger, str(tmp_path / "two"), AUGUST, ctx=RunContext(run_id="two"))
    third = write_report([], ledger, str(tmp_path / "three"), AUGUST, ctx=RunContext(run_id="three"))
    assert first.html_path and second.html_path and third.html_path

    assert "Previous report: none on record" in (tmp_path / "one" / "report.html").read_text()
    rows = ledger.rows(events_in=(lg.REPORT_WRITTEN,))
    assert json.loads(rows[0]["detail"])["previous"] is None
    for before, after, row, prev_row in (("one", "two", rows[1], rows[0]), ("two", "three", rows[2], rows[1])):
        html_hash, pdf_hash = _sha256(tmp_path / before / "report.html"), _sha256(tmp_path / before / "report.pdf")
        content = (tmp_path / before / "CONTENT_SHA256").read_text().strip()
        page = (tmp_path / after / "report.html").read_text()
        assert f"Previous report: {tmp_path / before / 'report.html'}" in page
        assert f"report.html SHA-256 {html_hash}" in page and f"report.pdf SHA-256 {pdf_hash}" in page
        assert f"content SHA-256 {content}" in page and f"ledger event {prev_row['id']}" in page
        previous = json.loads(row["detail"])["previous"]
        assert (previous["ledger_id"], previous["html_sha256"], previous["pdf_sha256"]) == (
            prev_row["id"], html_hash, pdf_hash)
        if shutil.which("pdftotext"):
            text = subprocess.run(["pdftotext", str(tmp_path / after / "report.pdf"), "-"], capture_output=True,
                                  text=True, check=True).stdout.replace("\n", "")
            assert html_hash in text and pdf_hash in text


def _context(run_type: str) -> dict:
    ti = SimpleNamespace(dag_id="compliance_report", run_id=f"{run_type}__x", task_id="write_report", try_number=1)
    return {"ti": ti, "dag_run": SimpleNamespace(run_type=run_type, triggering_user_name=None)}


@pytest.fixture
def operator_ledger(tmp_path, monkeypatch):
    import keyrotation_airflow.operators.report as report

    url = f"sqlite:///{tmp_path / 'rate.db'}"
    monkeypatch.setenv("KEYROTATION_LEDGER_URL", url)
    monkeypatch.setattr(report, "list_key_classes", lambda: [])
    return Ledger(url)


def _operator(tmp_path: Path, name: str, **kwargs):
    from keyrotation_airflow.operators.report import ComplianceReportOperator

    return ComplianceReportOperator(task_id="write_report", output_dir=str(tmp_path / name), api_conn_id="",
                                    period_start="2025-08-01", period_end="2025-08-31", **kwargs)


def test_an_audit_triggered_report_is_skipped_within_the_interval_other_runs_always_write(operator_ledger, tmp_path):
    from airflow.sdk.exceptions import AirflowSkipException

    ledger = operator_ledger
    _operator(tmp_path, "monthly").execute(_context("scheduled"))
    with pytest.raises(AirflowSkipException, match="previous report written 0 min ago .* less than the minimum "
                                                   "interval of 60 min"):
        _operator(tmp_path, "audit1").execute(_context("asset_triggered"))
    assert not (tmp_path / "audit1").exists()
    [skipped] = ledger.rows(events_in=("report_skipped",))
    assert (skipped["status"], skipped["run_id"]) == ("skipped", "asset_triggered__x")
    assert str(tmp_path / "monthly" / "report.html") in json.loads(skipped["detail"])["reason"]

    # Manual and scheduled runs write whatever the interval; an audit-triggered one with the limit off too.
    _operator(tmp_path, "manual").execute(_context("manual"))
    _operator(tmp_path, "scheduled").execute(_context("scheduled"))
    _operator(tmp_path, "nolimit", min_interval_minutes=0).execute(_context("asset_triggered"))
    written = [r["run_id"] for r in ledger.rows(events_in=(lg.REPORT_WRITTEN,))]
    assert written == ["scheduled__x", "manual__x", "scheduled__x", "asset_triggered__x"]
    assert len(ledger.rows(events_in=("report_skipped",))) == 1


def test_an_audit_triggered_report_is_written_once_the_previous_one_is_old_enough(operator_ledger, tmp_path):
    ledger = operator_ledger
    ledger.record(lg.REPORT_WRITTEN, "*", RunContext(run_id="old"), at=datetime.now(UTC) - timedelta(minutes=31),
                  detail={"period": "p", "location": "x", "html": "x/report.html", "content_hash": "c",
                          "artifacts": {"report.html": "h", "report.pdf": "p"}})
    from airflow.sdk.exceptions import AirflowSkipException

    with pytest.raises(AirflowSkipException):
        _operator(tmp_path, "a").execute(_context("asset_triggered"))
    _operator(tmp_path, "b", min_interval_minutes="30").execute(_context("asset_triggered"))
    assert (tmp_path / "b" / "report.html").exists()
    assert "Previous report: x/report.html" in (tmp_path / "b" / "report.html").read_text()
