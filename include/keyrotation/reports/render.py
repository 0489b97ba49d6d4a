"""The report's artifacts: ``report.html`` (charts inline), ``report.pdf`` (the same sections),
and every evidence table as CSV and Parquet for the auditor's own analysis. The content hash is
the SHA-256 of the findings and every table as CSV, so two reports of the same evidence match."""

from __future__ import annotations

import base64
import hashlib
import html
import io

import pandas as pd

from keyrotation.reports.charts import CHART_DPI
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


PDF_FONT, PDF_BOLD, PDF_FONT_SIZE, PDF_MIN_FONT_SIZE = "Helvetica", "Helvetica-Bold", 7.0, 5.0
PDF_CELL_PADDING = 8.0  # points: 3 each side (set on the tables) plus room for the grid
PDF_MAX_COLUMN = 260.0  # points: a free-text column wraps beyond this


def fit_columns(rows: list[list[str]], available: float, font_size: float) -> list[float] | None:
    """Column widths (points) for ``rows`` (header first) within ``available``: each column as wide as its
    longest text where all fit, else at least its longest cell word (so no value is cut; headers may
    break) with the room left shared by how much each would wrap; None if even that does not fit."""
    from reportlab.pdfbase.pdfmetrics import stringWidth

    longest_word, natural = [], []
    for col in range(len(rows[0])):
        cells = [str(row[col]) for row in rows[1:]]
        words = [stringWidth(w, PDF_FONT, font_size) for text in cells for w in text.split()]
        words += [stringWidth(part, PDF_BOLD, font_size) for part in _header_parts(rows[0][col])]
        longest_word.append(max(words) + PDF_CELL_PADDING)
        longest_text = max([stringWidth(rows[0][col], PDF_BOLD, font_size)]
                           + [stringWidth(t, PDF_FONT, font_size) for t in cells])
        natural.append(max(longest_word[-1], min(PDF_MAX_COLUMN, longest_text) + PDF_CELL_PADDING))
    if sum(natural) <= available:
        return natural
    if sum(longest_word) > available:
        return None
    extra = available - sum(longest_word)
    wanted = [n - w for n, w in zip(natural, longest_word, strict=True)]
    return [w + extra * want / sum(wanted) for w, want in zip(longest_word, wanted, strict=True)]


def _header_parts(name: str) -> list[str]:
    """Where a column name may wrap: after each underscore."""
    parts = name.split("_")
    return [p + "_" for p in parts[:-1]] + [parts[-1]]


def _header_markup(name: str, width: float, font_size: float) -> str:
    """The column name wrapped after underscores to fit ``width``, as Paragraph markup."""
    from reportlab.pdfbase.pdfmetrics import stringWidth

    lines = [""]
    for part in _header_parts(name):
        if lines[-1] and stringWidth(lines[-1] + part, PDF_BOLD, font_size) > width - PDF_CELL_PADDING:
            lines.append("")
        lines[-1] += part
    return "<br/>".join(html.escape(line) for line in lines)


def _pdf_value(value: object) -> str:
    text = html.unescape(_cell(value))
    # Timestamps are UTC throughout (the report says so): the offset only widens every column.
    return text[:-6] if len(text) == 25 and text.endswith("+00:00") and text[10] == "T" else text


def render_pdf(ev: Evidence, findings: pd.DataFrame, charts: dict[str, bytes], digest: str) -> bytes:
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A3, A4, landscape
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import cm
    from reportlab.platypus import (
        BaseDocTemplate,
        Frame,
        Image,
        NextPageTemplate,
        PageBreak,
        PageTemplate,
        Paragraph,
        Spacer,
        Table,
        TableStyle,
    )

    styles = getSampleStyleSheet()
    margin = 1 * cm
    # A table too wide for A4 landscape even with its columns fitted gets an A3 landscape page.
    sizes = {"portrait": A4, "landscape": landscape(A4), "wide": landscape(A3)}
    usable = {name: size[0] - 2 * margin for name, size in sizes.items()}
    buf = io.BytesIO()
    doc = BaseDocTemplate(buf, pagesize=A4, leftMargin=margin, rightMargin=margin, topMargin=margin,
                          bottomMargin=margin, title="Key rotation compliance report")
    doc.addPageTemplates([PageTemplate(id=name, pagesize=size, frames=[Frame(
        margin, margin, size[0] - 2 * margin, size[1] - 2 * margin, id=name, leftPadding=0, rightPadding=0)])
        for name, size in sizes.items()])
    story: list = []
    orientation = ["portrait"]

    def turn(to: str) -> None:
        if to != orientation[0]:
            story.extend([NextPageTemplate(to), PageBreak()])
            orientation[0] = to

    def table(title: str, frame: pd.DataFrame) -> None:
        if not len(frame):
            story.extend([Paragraph(html.escape(title), styles["Heading2"]),
                          Paragraph("None in the period.", styles["BodyText"])])
            return
        shown = frame.head(PDF_ROWS)
        rows = [[str(c) for c in shown.columns]] + [[_pdf_value(v) for v in row]
                                                    for row in shown.itertuples(index=False)]
        size, widths, page, wrap = PDF_FONT_SIZE, None, "portrait", "LTR"
        while widths is None:
            # Portrait where the table fits without cutting a word, else landscape (A4, A3), else a smaller font.
            for page in ("portrait", "landscape", "wide"):
                widths = fit_columns(rows, usable[page], size)
                if widths is not None:
                    break
            if widths is None:
                if size <= PDF_MIN_FONT_SIZE:
                    # Too wide even so: share the width by content and let long values break anywhere.
                    page, wrap = "wide", "CJK"
                    natural = fit_columns(rows, float("inf"), size) or []
                    widths = [usable[page] * n / sum(natural) for n in natural]
                    break
                size -= 0.5
        if page == "portrait" and fit_columns(rows, usable["landscape"], size) != widths:
            page, widths = "landscape", fit_columns(rows, usable["landscape"], size)  # fewer cells wrapped
        turn(page)
        cell = styles["BodyText"].clone(f"cell{size}", fontName=PDF_FONT, fontSize=size, leading=size * 1.25,
                                        wordWrap=wrap)
        head = cell.clone(f"head{size}", fontName=PDF_BOLD)
        data = [[Paragraph(_header_markup(c, w, size), head) for c, w in zip(rows[0], widths, strict=True)]]
        data += [[Paragraph(html.escape(c), cell) for c in row] for row in rows[1:]]
        flow = Table(data, colWidths=widths, repeatRows=1, hAlign="LEFT")
        flow.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
                                  ("BACKGROUND", (0, 0), (-1, 0), colors.whitesmoke),
                                  ("VALIGN", (0, 0), (-1, -1), "TOP"),
                                  ("LEFTPADDING", (0, 0), (-1, -1), 3), ("RIGHTPADDING", (0, 0), (-1, -1), 3)]))
        more = [] if len(frame) <= PDF_ROWS else [Paragraph(
            f"{len(frame) - PDF_ROWS} more rows in the CSV and Parquet files.", cell)]
        story.extend([Paragraph(html.escape(title), styles["Heading2"]), flow, *more])

    counts = findings["status"].value_counts().to_dict()
    history = f"not read ({ev.history_error})" if ev.history_error else f"{len(ev.tables['runs'])} runs read"
    # Long unbroken tokens (hashes, paths) may break anywhere in the front matter's prose.
    prose = styles["BodyText"].clone("prose", wordWrap="CJK")
    story += [
        Paragraph("Key rotation compliance report", styles["Title"]),
        Paragraph(html.escape(f"Period covered: {ev.period} (UTC). Generated "
                              f"{ev.generated_at.isoformat(timespec='seconds')}. Ledger: {ev.ledger_detail}. "
                              f"Airflow run history: {history}."), styles["BodyText"]),
        Paragraph(html.escape(f"Findings: {counts.get('PASS', 0)} PASS, {counts.get('WARN', 0)} WARN, "
                              f"{counts.get('FAIL', 0)} FAIL. Content SHA-256: {digest}"), prose),
        Paragraph(html.escape(previous_text(ev)), prose),
        Paragraph("Charts", styles["Heading2"]),
    ]
    for name, png in charts.items():
        story.append(Paragraph(html.escape(CHART_TITLES[name]), styles["Heading4"]))
        image = Image(io.BytesIO(png))
        # At the size matplotlib drew it (CHART_DPI pixels per inch): its 8-point labels stay 8 points.
        scale = min(72 / CHART_DPI, usable["portrait"] / image.drawWidth)
        image.drawWidth, image.drawHeight = image.drawWidth * scale, image.drawHeight * scale
        image.hAlign = "LEFT"
        story += [image, Spacer(1, 0.3 * cm)]
    table("Findings", findings)
    for name, title in SECTIONS:
        table(title, ev.tables[name])
    doc.build(story)
    return buf.getvalue()
