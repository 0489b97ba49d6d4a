"""The compliance report: per key class, current version, age against the cryptoperiod, data
coverage per version and retirements, as CSV files and one HTML page, built from the ledger,
the KMS's own metadata and the census."""

from __future__ import annotations

import csv
import hashlib
import html
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from keyrotation import ledger as lg
from keyrotation.backends.base import KeyState
from keyrotation.census import Census
from keyrotation.config import KeyClass
from keyrotation.ledger import Ledger


@dataclass
class KeyClassEvidence:
    key_class: KeyClass
    state: KeyState
    censuses: list[Census]


def _days(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 86400:.1f}"


def _iso(value: datetime | None) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds") if value else ""


def build_rows(evidence: list[KeyClassEvidence], ledger: Ledger, now: datetime | None = None
               ) -> tuple[list[dict], list[dict], list[dict]]:
    """(key class rows, coverage rows, retirement rows)."""
    now = now or datetime.now(UTC)
    classes, coverage, retirements = [], [], []
    for ev in evidence:
        kc, state = ev.key_class, ev.state
        reference = ledger.current_version(kc.name)
        created = state.created_at(reference) if reference else None
        age = (now - created).total_seconds() if created else None
        period = kc.rotation.cryptoperiod
        rotations = ledger.rows(key_class=kc.name, events_in=(lg.VERSION_CREATED, lg.KEY_CREATED))
        old = sum(len(c.under(reference)) for c in ev.censuses) if reference else None
        status = "PASS"
        if reference is None or age is None:
            status = "FAIL: no current version on record"
        elif age > period.total_seconds():
            status = f"FAIL: current version older than the {period.days}-day cryptoperiod"
        elif old:
            status = f"WARN: {old} partitions under older versions"
        elif any(c.errors for c in ev.censuses):
            status = "WARN: unreadable partitions"
        classes.append({
            "key_class": kc.name, "status": status, "backend": kc.backend, "key_ref": kc.key_ref, "owner": kc.owner,
            "current_version": reference or "", "kms_latest_version": state.latest_version,
            "min_decryption_version": state.min_decryption_version,
            "current_version_created": _iso(created), "age_days": _days(age),
            "cryptoperiod_days": period.days, "next_due": _iso(created + kc.rotation.due_after) if created else "",
            "rotations_on_record": len(rotations),
            "last_rotation": _iso(rotations[-1]["recorded_at"].replace(tzinfo=UTC)) if rotations else "",
            "partitions_under_old_versions": "" if old is None else old,
            "retirement": "by the retire DAG" if kc.retires_versions else
            "not possible: the KMS keeps every old version (AWS KMS key material, on_demand strategy)",
        })
        for census in ev.censuses:
            for version, cov in census.coverage().items():
                coverage.append({"key_class": kc.name, "dataset": census.dataset, "version": version,
                                 "current": version == reference, **cov})
        for row in ledger.rows(key_class=kc.name, events_in=(lg.VERSIONS_RETIRED, lg.RETIREMENT_REFUSED,
                                                               lg.RETIREMENT_NOT_POSSIBLE)):
            detail = json.loads(row["detail"] or "{}")
            retirements.append({
                "key_class": kc.name, "time": _iso(row["recorded_at"].replace(tzinfo=UTC)), "event": row["event"],
                "versions_below": row["to_version"],
                "approved_by": (detail.get("approval") or {}).get("approved_by") or "",
                "reasons": "; ".join(detail.get("reasons") or []),
                "dag_id": row["dag_id"] or "", "run_id": row["run_id"] or "",
            })
    return classes, coverage, retirements


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _table(title: str, rows: list[dict]) -> str:
    if not rows:
        return f"<h2>{html.escape(title)}</h2><p>None.</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<h2>{html.escape(title)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(evidence: list[KeyClassEvidence], ledger: Ledger, out_dir: str | Path,
                 now: datetime | None = None) -> Path:
    """Write ``key_classes.csv``, ``coverage.csv``, ``retirements.csv`` and ``report.html``; return the HTML path."""
    now = now or datetime.now(UTC)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes, coverage, retirements = build_rows(evidence, ledger, now)
    _write_csv(out / "key_classes.csv", classes)
    _write_csv(out / "coverage.csv", coverage)
    _write_csv(out / "retirements.csv", retirements)
    body = (_table("Key classes", classes) + _table("Data coverage per key version", coverage)
            + _table("Retirements", retirements))
    digest = hashlib.sha256(body.encode()).hexdigest()
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Key rotation compliance report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}</style></head><body>"
        f"<h1>Key rotation compliance report</h1><p>Generated {_iso(now)} from the ledger "
        f"({html.escape(ledger.engine.url.render_as_string(hide_password=True))}), the KMS metadata and the "
        f"census of each dataset's key material.</p>{body}<p>Content SHA-256: <code>{digest}</code></p></body></html>"
    )
    path = out / "report.html"
    path.write_text(page)
    return path
