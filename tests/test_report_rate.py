"""Reports at a sensible rate, and as a chain: a report triggered by audit events covers the key
classes they are about, less each one whose previous report covering it is younger than the minimum
interval (each skip recorded with its reason); scheduled, backfill and manual runs always cover every
key class; each report names the previous one and its SHA-256, checked here against the files on disk."""

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


def _context(run_type: str, *extras: dict) -> dict:
    ti = SimpleNamespace(dag_id="compliance_report", run_id=f"{run_type}__x", task_id="write_report", try_number=1)
    events = {"keyrotation.audit": [SimpleNamespace(extra=e) for e in extras]} if extras else {}
    return {"ti": ti, "dag_run": SimpleNamespace(run_type=run_type, triggering_user_name=None),
            "triggering_asset_events": events}


KEY_CLASSES = ("alpha", "beta", "gamma")


def _runtime(name: str, role: str):
    from keyrotation.backends.base import KeyState, KeyVersion
    from keyrotation.config import KeyClass

    kc = KeyClass(name=name, backend="vault_transit", key_ref=f"{name}-key", conn_id="vault",
                  rotation={"cryptoperiod": "90d"})
    made = datetime.now(UTC) - timedelta(days=1)
    state = KeyState(key_ref=kc.key_ref, exists=True, latest_version=1, min_decryption_version=1,
                     min_encryption_version=1, versions={1: KeyVersion(1, made)})
    backend = SimpleNamespace(key_state=lambda: state, deletion_dates=dict)  # Transit deletes no version
    return SimpleNamespace(config=SimpleNamespace(key_class=kc), backend=backend, censuses=lambda: [])


@pytest.fixture
def operator_ledger(tmp_path, monkeypatch):
    import keyrotation_airflow.operators.report as report

    url = f"sqlite:///{tmp_path / 'rate.db'}"
    monkeypatch.setenv("KEYROTATION_LEDGER_URL", url)
    monkeypatch.setattr(report, "list_key_classes", lambda: list(KEY_CLASSES))
    monkeypatch.setattr(report, "key_class_runtime", _runtime)
    return Ledger(url)


def _operator(tmp_path: Path, name: str, **kwargs):
    from keyrotation_airflow.operators.report import ComplianceReportOperator

    return ComplianceReportOperator(task_id="write_report", output_dir=str(tmp_path / name), api_conn_id="",
                                    period_start="2025-08-01", period_end="2025-08-31", **kwargs)


def _written(ledger: Ledger) -> list[tuple[str, list[str]]]:
    return [(r["run_id"], json.loads(r["detail"])["key_classes"]) for r in ledger.rows(events_in=(lg.REPORT_WRITTEN,))]


def _skips(ledger: Ledger) -> list[tuple[str, str]]:
    return [(r["key_class"], json.loads(r["detail"])["reason"]) for r in ledger.rows(events_in=("report_skipped",))]


def test_the_rate_limit_is_per_key_class_and_other_runs_always_write_all(operator_ledger, tmp_path):
    from airflow.sdk.exceptions import AirflowSkipException

    ledger = operator_ledger
    _operator(tmp_path, "first_alpha").execute(_context("asset_triggered", {"key_class": "alpha"}))
    assert _written(ledger) == [("asset_triggered__x", ["alpha"])]
    page = (tmp_path / "first_alpha" / "report.html").read_text()
    assert "alpha-key" in page and "beta-key" not in page

    # alpha again within the interval: skipped, with the reason naming alpha and the report that covered it.
    with pytest.raises(AirflowSkipException, match="no key class"):
        _operator(tmp_path, "again_alpha").execute(_context("asset_triggered", {"key_class": "alpha"}))
    assert not (tmp_path / "again_alpha").exists()
    [(kc, reason), (star, _)] = _skips(ledger)
    assert (kc, star) == ("alpha", "*")
    assert reason.startswith("key class alpha: previous report covering it written 0 min ago")
    assert str(tmp_path / "first_alpha" / "report.html") in reason and "minimum interval of 60 min" in reason

    # beta is not held back by alpha's report; alpha and beta together: only beta is reported on.
    _operator(tmp_path, "beta").execute(_context("asset_triggered", {"key_class": "alpha"}, {"key_class": "beta"}))
    assert _written(ledger)[-1] == ("asset_triggered__x", ["beta"])
    assert [k for k, _ in _skips(ledger)] == ["alpha", "*", "alpha"]

    # Manual, scheduled and backfill runs report on every key class whatever the interval.
    for run_type in ("manual", "scheduled", "backfill"):
        _operator(tmp_path, run_type).execute(_context(run_type))
    assert _written(ledger)[-3:] == [(f"{t}__x", list(KEY_CLASSES)) for t in ("manual", "scheduled", "backfill")]
    # Now every key class has a report younger than the interval; with the limit off an audit event writes.
    with pytest.raises(AirflowSkipException):
        _operator(tmp_path, "gamma").execute(_context("asset_triggered", {"key_class": "gamma"}))
    _operator(tmp_path, "nolimit", min_interval_minutes=0).execute(_context("asset_triggered", {"key_class": "gamma"}))
    assert _written(ledger)[-1] == ("asset_triggered__x", ["gamma"])
    assert len(_written(ledger)) == 6


def test_an_event_without_a_key_class_reports_on_those_with_ledger_events_since_their_last_report(
        operator_ledger, tmp_path):
    from airflow.sdk.exceptions import AirflowSkipException

    ledger = operator_ledger
    old = datetime.now(UTC) - timedelta(minutes=90)
    ledger.record(lg.REPORT_WRITTEN, "*", RunContext(run_id="old"), at=old,
                  detail={"period": "p", "location": "x", "html": "x/report.html", "content_hash": "c",
                          "key_classes": list(KEY_CLASSES), "artifacts": {"report.html": "h", "report.pdf": "p"}})
    # A retirement of beta (retire_versions' audit event carries no extra): the report covers beta only.
    ledger.record(lg.VERSIONS_RETIRED, "beta", RunContext(run_id="retire"), detail={"versions": [1]})
    _operator(tmp_path, "after_retire").execute(_context("asset_triggered", {}))
    assert _written(ledger)[-1] == ("asset_triggered__x", ["beta"])
    assert "Previous report: x/report.html" in (tmp_path / "after_retire" / "report.html").read_text()

    # Nothing new on any key class since: nothing to report.
    with pytest.raises(AirflowSkipException):
        _operator(tmp_path, "nothing").execute(_context("asset_triggered", {}))
    assert _skips(ledger)[-1][0] == "*"
    # A new event on beta, within the interval of beta's report: skipped; on gamma: reported.
    ledger.record(lg.VERSIONS_RETIRED, "beta", RunContext(run_id="retire2"), detail={"versions": [2]})
    ledger.record(lg.VERSIONS_RETIRED, "gamma", RunContext(run_id="retire3"), detail={"versions": [1]})
    _operator(tmp_path, "gamma").execute(_context("asset_triggered", {}))
    assert _written(ledger)[-1] == ("asset_triggered__x", ["gamma"])
    assert _skips(ledger)[-1][0] == "beta"
    # Once beta's report is older than the interval (here 0.01 min), beta is due again.
    import time

    time.sleep(1)
    _operator(tmp_path, "beta_due", min_interval_minutes="0.01").execute(_context("asset_triggered", {}))
    assert _written(ledger)[-1] == ("asset_triggered__x", ["beta"])
