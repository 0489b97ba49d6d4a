"""The report's artifacts: ``report.html`` (charts inline), ``report.pdf`` (the same sections),
and every evidence table as CSV and Parquet for the auditor's own analysis. The content hash is
the SHA-256 of the findings and every table as CSV, so two reports of the same evidence match."""

from __future__ import annotations

import base64
import hashlib
import html
import io

import pandas as pd

from keyrotation.reports.evidence import Evidence

SECTIONS = [
    ("key_inventory", "Key inventory"),
    ("versions", "Key versions and cryptoperiods"),
    ("rotations", "Rotations"),
    ("coverage", "Data coverage per version"),
    ("coverage_history", "Data coverage over time"),
    ("retirements", "Retirements and destructions"),
    ("policy_changes", "Policy changes (seen at the first decision under the new policy)"),
    ("runs", "Runs and who triggered them"),
    ("failures", "Failures and retries"),
    ("ui_actions", "Actions in the Airflow UI (event log)"),
]
CHART_TITLES = {"key_age.png": "Key age vs cryptoperiod", "coverage_over_time.png": "Coverage per version over time",
                "runs_by_outcome.png": "Runs by outcome"}
STATUS_COLORS = {"PASS": "#1e8449", "WARN": "#b9770e", "FAIL": "#c0392b"}
PDF_ROWS = 60  # per table; the CSV and Parquet files hold every row


def content_hash(findings: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> str:
    digest = hashlib.sha256(findings.to_csv(index=False).encode())
    for name, _title in SECTIONS:
        digest.update(name.encode())
        digest.update(tables[name].to_csv(index=False).encode())
    return digest.hexdigest()


def table_files(findings: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> dict[str, bytes]:
    out = {}
    for name, frame in {"findings": findings, **tables}.items():
        out[f"{name}.csv"] = frame.to_csv(index=False).encode()
        out[f"{name}.parquet"] = _parquet(frame)
    return out


def _parquet(frame: pd.DataFrame) -> bytes:
    """The table as Parquet, types inferred per column; a column of mixed types is kept as text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    for column in frame.columns:
        try:
            columns[column] = pa.array(frame[column], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[column] = pa.array(frame[column].map(lambda v: None if pd.isna(v) else str(v)), pa.string())
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def previous_text(ev: Evidence) -> str:
    """The sentence naming the report before this one and its SHA-256s (plain text)."""
    prev = ev.previous
    if not prev:
        return "Previous report: none on record (this is the first of the series)."
    return (f"Previous report: {prev['html']} (period {prev['period']}, written {prev['written_at']}, ledger event "
            f"{prev['ledger_id']}); report.html SHA-256 {prev['html_sha256']}, report.pdf SHA-256 "
            f"{prev['pdf_sha256']}, content SHA-256 {prev['content_hash']}.")


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return html.escape(str(value))


def _html_table(frame: pd.DataFrame, anchors: bool = True) -> str:
    if not len(frame):
        return "<p class='none'>None in the period.</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    rows = []
    for record in frame.to_dict("records"):
        cells = []
        for column, value in record.items():
            if column == "status" and value in STATUS_COLORS:
                cells.append(f"<td class='status' style='color:{STATUS_COLORS[value]}'>{value}</td>")
            elif column == "evidence" and value:
                links = " ".join(f"<a href='#{html.escape(i)}'>{html.escape(i)}</a>" for i in str(value).split())
                cells.append(f"<td>{links}</td>")
            else:
                cells.append(f"<td>{_cell(value)}</td>")
        row_id = f" id='{html.escape(str(record.get('id')))}'" if anchors and record.get("id") else ""
        rows.append(f"<tr{row_id}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_html(ev: Evidence, findings: pd.DataFrame, charts: dict[str, bytes], digest: str) -> str:
    counts = findings["status"].value_counts().to_dict()
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("PASS", "WARN", "FAIL"))
    history = (f"Airflow run history: <b>not read</b> ({html.escape(ev.history_error)})" if ev.history_error
               else f"Airflow run history: {len(ev.tables['runs'])} runs read through the REST API")
    images = "".join(
        f"<figure><img alt='{html.escape(CHART_TITLES[name])}' src='data:image/png;base64,"
        f"{base64.b64encode(png).decode()}'><figcaption>{html.escape(CHART_TITLES[name])}</figcaption></figure>"
        for name, png in charts.items())
    sections = "".join(f"<h2 id='section-{name}'>{html.escape(title)}</h2>{_html_table(ev.tables[name])}"
                       for name, title in SECTIONS)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Key rotation compliance report</title>"
        "<style>body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:12px;vertical-align:top}th{background:#f3f3f3}"
        "tr:target{background:#fff3c4}.status{font-weight:bold}figure{display:inline-block;margin:0 1em 1em 0}"
        "img{max-width:640px;border:1px solid #ddd}.none{color:#777}</style></head><body>"
        f"<h1>Key rotation compliance report</h1>"
        f"<p>Period covered: <b>{ev.period}</b> (UTC). Generated {ev.generated_at.isoformat(timespec='seconds')}"
        f" from the ledger ({html.escape(ev.ledger_detail)}), each KMS's metadata, the census of each dataset's "
        f"key material, and Airflow's run history. {history}.</p>"
        f"<p>Findings: {summary}. Content SHA-256: <code>{digest}</code></p>"
        f"<p id='previous-report'>{html.escape(previous_text(ev))}</p>"
        f"<h2 id='section-findings'>Findings</h2>{_html_table(findings)}"
        f"<h2 id='section-charts'>Charts</h2>{images}{sections}</body></html>"
    )


def render_pdf(ev: Evidence, findings: pd.DataFrame, charts: dict[str, bytes], digest: str) -> bytes:
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4, landscape
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import cm
    from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    styles = getSampleStyleSheet()
    small = styles["BodyText"].clone("small", fontSize=6.5, leading=8)
    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=landscape(A4), leftMargin=1 * cm, rightMargin=1 * cm,
                            topMargin=1 * cm, bottomMargin=1 * cm, title="Key rotation compliance report")

    def table(frame: pd.DataFrame) -> list:
        if not len(frame):
            return [Paragraph("None in the period.", styles["BodyText"])]
        shown = frame.head(PDF_ROWS)
        data = [[Paragraph(html.escape(str(c)), small) for c in shown.columns]]
        data += [[Paragraph(_cell(v), small) for v in row] for row in shown.itertuples(index=False)]
        width = (landscape(A4)[0] - 2 * cm) / len(shown.columns)
        flow = Table(data, colWidths=[width] * len(shown.columns), repeatRows=1)
        flow.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
                                  ("BACKGROUND", (0, 0), (-1, 0), colors.whitesmoke),
                                  ("VALIGN", (0, 0), (-1, -1), "TOP")]))
        more = [] if len(frame) <= PDF_ROWS else [Paragraph(
            f"{len(frame) - PDF_ROWS} more rows in the CSV and Parquet files.", small)]
        return [flow, *more]

    counts = findings["status"].value_counts().to_dict()
    history = f"not read ({ev.history_error})" if ev.history_error else f"{len(ev.tables['runs'])} runs read"
    story = [
        Paragraph("Key rotation compliance report", styles["Title"]),
        Paragraph(html.escape(f"Period covered: {ev.period} (UTC). Generated "
                              f"{ev.generated_at.isoformat(timespec='seconds')}. Ledger: {ev.ledger_detail}. "
                              f"Airflow run history: {history}."), styles["BodyText"]),
        Paragraph(html.escape(f"Findings: {counts.get('PASS', 0)} PASS, {counts.get('WARN', 0)} WARN, "
                              f"{counts.get('FAIL', 0)} FAIL. Content SHA-256: {digest}"), styles["BodyText"]),
        Paragraph(html.escape(previous_text(ev)), styles["BodyText"]),
        Paragraph("Findings", styles["Heading2"]), *table(findings),
        Paragraph("Charts", styles["Heading2"]),
    ]
    for name, png in charts.items():
        story.append(Paragraph(html.escape(CHART_TITLES[name]), styles["Heading4"]))
        image = Image(io.BytesIO(png))
        scale = min(1.0, 16 * cm / image.drawWidth)
        image.drawWidth, image.drawHeight = image.drawWidth * scale, image.drawHeight * scale
        story += [image, Spacer(1, 0.3 * cm)]
    for name, title in SECTIONS:
        story += [Paragraph(html.escape(title), styles["Heading2"]), *table(ev.tables[name])]
    doc.build(story)
    return buf.getvalue()
