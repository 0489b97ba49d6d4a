"""The compliance report from a seeded history: rotations on time and one late, a failure, a retirement
with approval, data still under an old version. Findings and evidence are checked cell by cell; the
HTML renders in headless Chromium with its charts, and the PDF has the same sections, page by page."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from helpers import CANARY, days, runtime, seed
from keyrotation import ledger as lg
from keyrotation.backends.base import KeyState, KeyVersion
from keyrotation.ledger import RunContext
from keyrotation.reports import KeyClassEvidence, Period, build_report, write_report
from keyrotation.reports.render import SECTIONS

AUGUST = Period(datetime(2025, 8, 1, tzinfo=UTC), datetime(2025, 9, 1, tzinfo=UTC))
NOW = datetime.now(UTC)  # the KMS versions were made now; the ledger history is backdated


def at(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=UTC)


@pytest.fixture
def seeded(make_key_class, vault, tmp_path):
    """Key class 'audited' (cryptoperiod 90 days) with a year of history in its ledger."""
    config = make_key_class(name="audited", dataset="audited_data", grace="0s")
    rt = runtime(config, vault)
    seed(rt, "audited_data", days("2025-07-01", 3))  # written under v1 (now), recorded now
    rt.backend.rotate()
    rt.backend.rotate()
    ctx = RunContext(dag_id="rotate__audited", run_id="scheduled__x", actor="scheduler")
    rt.ledger.record(lg.KEY_CREATED, "audited", ctx, to_version=1, at=at("2025-01-05"))
    rt.ledger.record(lg.VERSION_CREATED, "audited", ctx, from_version=1, to_version=2, at=at("2025-03-20"),
                     detail={"reason": "scheduled"})
    rt.ledger.record(lg.VERSION_CREATED, "audited", RunContext(actor="alice", dag_id="rotate__audited",
                                                                run_id="manual__late"),
                     from_version=2, to_version=3, at=at("2025-08-10"), detail={"reason": "overdue"})
    rt.ledger.record(lg.REFERENCE_UPDATED, "audited", ctx, from_version=1, to_version=3, at=at("2025-08-10"))
    for day in ("2025-07-01", "2025-07-02", "2025-07-03"):
        rt.ledger.record(lg.PARTITION_WRITTEN, "audited", ctx, dataset="audited_data", partition=day, to_version=1,
                         at=at("2025-08-01"))
    for day in ("2025-07-01", "2025-07-03"):
        rt.ledger.record(lg.PARTITION_REWRAPPED, "audited", ctx, dataset="audited_data", partition=day,
                         from_version=1, to_version=3, at=at("2025-08-12"))
    rt.ledger.record(lg.PARTITION_FAILED, "audited", RunContext(dag_id="reencrypt__audited_data", run_id="r1",
                                                                 task_id="reencrypt"),
                     status="failed", dataset="audited_data", partition="2025-07-02", at=at("2025-08-11"),
                     detail={"error": "partition 2025-07-02: cannot read part-00001.parquet"})
    rt.ledger.record(lg.VERSIONS_RETIRED, "audited", RunContext(dag_id="retire__audited", run_id="r2"),
                     from_version=1, to_version=2, actor="bob", at=at("2025-08-20"),
                     detail={"trim": False, "approval": {"approved": True, "approved_by": "bob"}})
    return rt


def evidence(rt) -> list[KeyClassEvidence]:
    return [KeyClassEvidence(rt.config.key_class, rt.backend.key_state(), rt.censuses())]


def test_seeded_history_gives_the_expected_findings_cell_by_cell(seeded, tmp_path):
    rt = seeded
    built = build_report(evidence(rt), rt.ledger, AUGUST, history=None, now=NOW)
    findings = _table(built, "findings")
    by_control = {row.control: row for row in findings.itertuples()}
    assert list(findings["control"]) == ["INV-1", "CP-1", "CP-2", "CP-3", "ROT-1", "ENC-1", "DATA-1", "RET-1",
                                         "POL-1", "SOD-1", "OPS-1", "LOG-1"]
    expected = {"INV-1": "PASS", "CP-1": "PASS", "CP-2": "PASS", "CP-3": "PASS", "ROT-1": "FAIL", "ENC-1": "PASS",
                "DATA-1": "FAIL", "RET-1": "PASS", "POL-1": "PASS", "SOD-1": "PASS", "OPS-1": "WARN",
                "LOG-1": "WARN"}
    assert {c: r.status for c, r in by_control.items()} == expected
    assert built.findings == {"PASS": 8, "WARN": 2, "FAIL": 2}
    assert "1 of 1 rotations in the period came later than 90 days after the previous version: v3 after " \
           "143.0 days" in by_control["ROT-1"].detail
    # Behind: v3 became the reference in the seeded August, the data is still partly under older versions.
    assert by_control["DATA-1"].detail.startswith("behind: 3 partitions still under versions older than v3 (or "
                                                  "blocking) ")
    assert by_control["DATA-1"].detail.endswith(" after it became current (policy: 7.0 days)")
    assert "approved by: bob" in by_control["RET-1"].detail
    assert by_control["OPS-1"].detail == "1 failed or retried items in the period"
    assert "no Airflow API connection configured" in by_control["LOG-1"].detail
    assert "hash chain intact" in by_control["LOG-1"].detail

    rotations = _table(built, "rotations")
    assert list(rotations["to_version"]) == [1, 2, 3]
    assert list(rotations["days_since_previous"].fillna(-1)) == [-1, 74.0, 143.0]
    assert [None if pd.isna(v) else v for v in rotations["on_time"]] == [None, True, False]
    assert list(rotations["in_period"]) == [False, False, True]
    late = rotations.iloc[2]
    assert (late["actor"], late["reason"], late["run_id"]) == ("alice", "overdue", "manual__late")
    assert by_control["ROT-1"].evidence == late["id"] == "rot-3"

    retirements = _table(built, "retirements")
    assert [(r.event, r.versions_below, r.approved_by) for r in retirements.itertuples()] == [
        ("versions_retired", 2, "bob")]
    failures = _table(built, "failures")
    assert [(f.source, f.state, f.key_class) for f in failures.itertuples()] == [
        ("ledger", "partition_failed", "audited")]
    assert "cannot read part-00001.parquet (partition 2025-07-02)" in failures.iloc[0]["detail"]
    coverage = _table(built, "coverage")
    assert [(c.version, c.current, c.partitions, c.rows) for c in coverage.itertuples()] == [(1, False, 3, 150)]
    history = _table(built, "coverage_history")
    assert [(h.time, h.version, h.partitions) for h in history.itertuples()] == [
        ("2025-08-01T00:00:00", 1, 3), ("2025-08-12T00:00:00", 1, 1), ("2025-08-12T00:00:00", 3, 2)]
    inventory = _table(built, "key_inventory").iloc[0]
    assert (inventory["algorithm"], inventory["current_version"], inventory["kms_latest_version"]) == \
        ("AES-256-GCM", 3, 3)
    versions = _table(built, "versions")
    assert list(versions["status"]) == ["enabled"] * 3

    # The same evidence gives the same content hash; a different period does not.
    again = build_report(evidence(rt), rt.ledger, AUGUST, history=None, now=NOW)
    assert again.content_hash == built.content_hash
    july = Period(datetime(2025, 7, 1, tzinfo=UTC), datetime(2025, 8, 1, tzinfo=UTC))
    assert build_report(evidence(rt), rt.ledger, july, history=None, now=NOW).content_hash != built.content_hash


def test_controls_fail_on_overdue_keys_long_cryptoperiods_and_unapproved_retirements(seeded):
    rt = seeded
    kc = rt.config.key_class.model_copy(update={
        "rotation": rt.config.key_class.rotation.model_copy(update={"cryptoperiod": timedelta(days=1000)}),
        "retire": rt.config.key_class.retire.model_copy(update={"approval_required": True}),
    })
    old = NOW - timedelta(days=1200)
    state = KeyState(key_ref=kc.key_ref, exists=True, latest_version=3, min_decryption_version=2,
                     min_encryption_version=0, versions={v: KeyVersion(v, old) for v in (2, 3)})
    rt.ledger.record(lg.VERSIONS_RETIRED, "audited", RunContext(actor="scheduler"), from_version=1, to_version=2,
                     at=at("2025-08-21"), detail={"approval": None})
    built = build_report([KeyClassEvidence(kc, state, rt.censuses())], rt.ledger, AUGUST, now=NOW)
    status = {r.control: (r.status, r.detail) for r in _table(built, "findings").itertuples()}
    assert status["CP-1"] == ("FAIL", "v3 is 1200.0 days old; cryptoperiod 1000 days")
    assert status["CP-2"] == ("FAIL", "cryptoperiod 1000 days; originator-usage period at most 730 days")
    assert status["CP-3"][0] == "PASS"  # 1200 days is within 730 + 1095
    assert status["ENC-1"][0] == "FAIL"  # min_encryption_version 0 lets retired v1 encrypt
    assert status["RET-1"] == ("FAIL", "1 retirements without the required approval")


def _table(built, name: str) -> pd.DataFrame:
    import io

    return pd.read_parquet(io.BytesIO(built.files[f"{name}.parquet"]))


def test_report_renders_in_chromium_with_charts_and_the_pdf_has_the_same_sections(seeded, tmp_path):
    from browser import Browser, chromium_binary

    rt = seeded
    result = write_report(evidence(rt), rt.ledger, str(tmp_path / "report"), AUGUST, now=NOW,
                          ctx=RunContext(dag_id="compliance_report", run_id="test"))
    out = tmp_path / "report"
    expected = {"report.html", "report.pdf", "key_age.png", "coverage_over_time.png", "runs_by_outcome.png",
                "CONTENT_SHA256", *(f"{n}.{ext}" for n in ["findings", *(s for s, _ in SECTIONS)]
                                    for ext in ("csv", "parquet"))}
    assert {p.name for p in out.iterdir()} == expected
    [recorded] = rt.ledger.rows(events_in=(lg.REPORT_WRITTEN,))
    assert result.artifacts["report.pdf"]["sha256"] in recorded["detail"]
    assert (out / "CONTENT_SHA256").read_text().strip() == result.content_hash
    assert all(CANARY not in (out / name).read_bytes().decode("latin-1") for name in expected)

    if not chromium_binary() or not shutil.which("pdftoppm"):
        if os.environ.get("CI"):
            pytest.fail("chromium and poppler-utils are needed: .ci/run installs them")
        pytest.skip("chromium or pdftoppm is not installed")
    titles = ["Findings", "Charts", *(title for _, title in SECTIONS)]
    with Browser(width=1400, height=1000) as browser:
        text = browser.open((out / "report.html").as_uri())
        images = browser.call("Runtime.evaluate", returnByValue=True, expression=(
            "[...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0, i.naturalWidth])"))
        shot = browser.screenshot(tmp_path / "report.png")
    assert all(title in text for title in titles), [t for t in titles if t not in text]
    assert "Period covered: 2025-08-01 to 2025-08-31" in text and result.content_hash in text
    charts = images["result"]["value"]
    assert [c[0] for c in charts] == ["Key age vs cryptoperiod", "Coverage per version over time", "Runs by outcome"]
    assert all(c[1] and c[2] > 300 for c in charts), charts
    assert shot.stat().st_size > 50_000
    if os.environ.get("KEYROTATION_SCREENSHOTS"):  # `make screenshots` refreshes the README's image
        shutil.copy(shot, Path(os.environ["KEYROTATION_SCREENSHOTS"]) / "report.png")

    pages = tmp_path / "pages"
    pages.mkdir()
    subprocess.run(["pdftoppm", "-png", "-r", "40", str(out / "report.pdf"), str(pages / "page")], check=True)
    assert len(list(pages.glob("page-*.png"))) >= 3
    pdf_text = subprocess.run(["pdftotext", str(out / "report.pdf"), "-"], capture_output=True, text=True,
                              check=True).stdout
    assert all(title in pdf_text for title in titles), [t for t in titles if t not in pdf_text]
    assert result.content_hash in pdf_text.replace("\n", "")


def test_the_period_comes_from_params_the_data_interval_or_the_month_so_far():
    from types import SimpleNamespace

    from keyrotation.errors import ConfigError
    from keyrotation_airflow.operators.report import report_period

    scheduled = {"dag_run": SimpleNamespace(run_type="scheduled"),
                 "data_interval_start": datetime(2025, 6, 1, tzinfo=UTC),
                 "data_interval_end": datetime(2025, 7, 1, tzinfo=UTC)}
    assert str(report_period(None, None, scheduled)) == "2025-06-01 to 2025-06-30"
    assert str(report_period("2025-02-01", "2025-02-28", scheduled)) == "2025-02-01 to 2025-02-28"
    manual = {**scheduled, "dag_run": SimpleNamespace(run_type="manual")}
    month = report_period(None, None, manual)
    assert month.start.day == 1 and month.start.month == datetime.now(UTC).month
    with pytest.raises(ConfigError, match="go together"):
        report_period("2025-02-01", None, manual)
    with pytest.raises(ConfigError, match="period_start: 2025-03-01 is after period_end 2025-02-01"):
        report_period("2025-03-01", "2025-02-01", manual)
    with pytest.raises(ConfigError, match="'March'/'2025-04-01' are not dates"):
        report_period("March", "2025-04-01", manual)


def test_the_report_can_be_written_to_s3(seeded, moto):
    from keyrotation.stores.filesystems import AwsCredentials, Storage

    rt = seeded
    moto.client("s3").create_bucket(Bucket="audit-reports")
    storage = Storage(AwsCredentials(moto.access_key, moto.secret_key, region_name=moto.region, endpoint_url=moto.url))
    result = write_report(evidence(rt), rt.ledger, "s3://audit-reports/2025-08", AUGUST, storage=storage, now=NOW)
    listed = moto.client("s3").list_objects_v2(Bucket="audit-reports", Prefix="2025-08/")["Contents"]
    assert {o["Key"].split("/")[-1] for o in listed} >= {"report.html", "report.pdf", "findings.parquet"}
    body = moto.client("s3").get_object(Bucket="audit-reports", Key="2025-08/report.pdf")["Body"].read()
    import hashlib

    assert hashlib.sha256(body).hexdigest() == result.artifacts["report.pdf"]["sha256"]
    assert result.html_path == "audit-reports/2025-08/report.html"


LONG_KEY_REF = "projects/keyrotation-prod/locations/europe-west1/keyRings/payments-eu/cryptoKeys/card-tokens-2025"
LONG_RUN_ID = "scheduled__2025-08-10T00:00:00+00:00__rotation_after_cryptoperiod_policy_change_0123456789"


def _words(pdf: Path) -> list[list[tuple[float, float, float, float, str]]]:
    """Each page's words with their boxes, from ``pdftotext -bbox``: (x_min, y_min, x_max, y_max, word)."""
    import re

    out = subprocess.run(["pdftotext", "-bbox", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    pages = []
    for page in out.split("<page ")[1:]:
        pages.append([(float(a), float(b), float(c), float(d), w) for a, b, c, d, w in re.findall(
            r'<word xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="([\d.]+)">([^<]*)</word>', page)])
    return pages


def _right_margin_clear(png: Path) -> bool:
    """No text or lines in the outer 0.76 cm of the page's 1 cm right margin (15 px at 50 dpi)."""
    from PIL import Image

    image = Image.open(png).convert("L")
    return image.crop((image.size[0] - 15, 0, *image.size)).getextrema()[0] > 200


def test_the_pdf_is_readable_page_by_page_whole_cells_no_overflow_charts_at_full_size(tmp_path):
    """Every table's header and a sample cell in the PDF's text; a long key ref and run id whole; no two
    words overlapping and no text in the right margin of any rendered page; wide tables in landscape."""
    from PIL import Image
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen.canvas import Canvas

    from keyrotation.config import KeyClass
    from keyrotation.ledger import Ledger

    if not shutil.which("pdftoppm") or not shutil.which("pdftotext"):
        if os.environ.get("CI"):
            pytest.fail("poppler-utils is needed: .ci/run installs it")
        pytest.skip("pdftoppm or pdftotext is not installed")
    ledger = Ledger(f"sqlite:///{tmp_path / 'pdf.db'}")
    kc = KeyClass(name="card_tokens", backend="gcp_kms", key_ref=LONG_KEY_REF, conn_id="gcp",
                  rotation={"cryptoperiod": "90d"})
    ctx = RunContext(dag_id="rotate__card_tokens", run_id=LONG_RUN_ID, actor="scheduler")
    ledger.record(lg.KEY_CREATED, kc.name, ctx, to_version=1, at=at("2025-01-05"))
    ledger.record(lg.VERSION_CREATED, kc.name, ctx, from_version=1, to_version=2, at=at("2025-08-10"),
                  detail={"reason": "scheduled"})
    ledger.record(lg.REFERENCE_UPDATED, kc.name, ctx, from_version=1, to_version=2, at=at("2025-08-10"))
    for day in range(1, 13):
        ledger.record(lg.PARTITION_WRITTEN, kc.name, ctx, dataset="card_tokens_eu", partition=f"2025-07-{day:02}",
                      to_version=1, at=at("2025-08-01"))
    ledger.record(lg.PARTITION_FAILED, kc.name, RunContext(dag_id="reencrypt__card_tokens_eu", run_id=LONG_RUN_ID,
                                                          task_id="reencrypt"), status="failed",
                  dataset="card_tokens_eu", partition="2025-07-02", at=at("2025-08-11"),
                  detail={"error": "partition 2025-07-02: cannot read part-00001.parquet"})
    made = datetime(2025, 8, 10, tzinfo=UTC)
    state = KeyState(key_ref=LONG_KEY_REF, exists=True, latest_version=2, min_decryption_version=1,
                     min_encryption_version=1, versions={1: KeyVersion(1, made), 2: KeyVersion(2, made)})
    built = build_report([KeyClassEvidence(kc, state, [])], ledger, AUGUST, now=datetime(2025, 9, 2, tzinfo=UTC))
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(built.files["report.pdf"])

    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True,
                          check=True).stdout
    assert LONG_KEY_REF in text and LONG_RUN_ID in text  # each on one line: not wrapped, not cut
    raw = subprocess.run(["pdftotext", "-raw", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    # Column names may wrap after an underscore; in content order (-raw) their lines follow each other.
    flat, dense = " ".join(text.split()), "".join(raw.split())
    for name, title in [("findings", "Findings"), *SECTIONS]:
        table = pd.read_csv(io.BytesIO(built.files[f"{name}.csv"]), dtype=str)
        assert title in flat, title
        if not len(table):
            continue
        assert all(h in dense for h in table.columns), (name, [h for h in table.columns if h not in dense])
        # The first row's first cells, whole (timestamps are shown without the +00:00).
        sample = [" ".join(v.removesuffix("+00:00").split()) for v in table.iloc[0].dropna()[:4]]
        assert all(v in flat for v in sample), (name, sample)

    pages = _words(pdf)
    for number, words in enumerate(pages, 1):
        for i, (x0, y0, x1, y1, word) in enumerate(words):
            for a0, b0, a1, b1, other in words[i + 1:]:
                overlap = min(x1, a1) - max(x0, a0) > 0.5 and min(y1, b1) - max(y0, b0) > 0.5
                assert not overlap, f"page {number}: {word!r} overlaps {other!r}"

    out = tmp_path / "pages"
    out.mkdir()
    subprocess.run(["pdftoppm", "-png", "-r", "50", str(pdf), str(out / "page")], check=True)
    rendered = sorted(out.glob("page-*.png"))
    assert len(rendered) == len(pages) >= 3
    landscape_pages = 0
    for path in rendered:
        width, height = Image.open(path).size
        landscape_pages += width > height
        assert _right_margin_clear(path), f"{path.name}: text or lines in the right margin"
    assert 0 < landscape_pages < len(rendered)  # wide tables landscape, the rest portrait

    # Charts at the size matplotlib drew them (110 px per inch), so their 8-point labels print at 8 points.
    listing = subprocess.run(["pdfimages", "-list", str(pdf)], capture_output=True, text=True, check=True).stdout
    ppi = [float(line.split()[12]) for line in listing.splitlines()[2:] if line.split()[2] == "image"]
    assert len(ppi) == 3 and all(109 <= p <= 111 for p in ppi), ppi

    # The margin check sees a cell that runs off the page (reportlab draws it as such a cell would).
    canvas = Canvas(str(tmp_path / "overflow.pdf"), pagesize=A4)
    canvas.drawString(A4[0] - 120, 400, LONG_KEY_REF)
    canvas.save()
    subprocess.run(["pdftoppm", "-png", "-r", "50", str(tmp_path / "overflow.pdf"), str(out / "overflow")],
                   check=True)
    assert not _right_margin_clear(next(out.glob("overflow*.png")))
