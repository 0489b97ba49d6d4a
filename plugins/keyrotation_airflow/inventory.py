"""The key inventory view: a FastAPI app mounted in the Airflow API server by the keyrotation plugin.

Per key class: backend and key, current version, age against the cryptoperiod (coloured), next due,
the census per version as a bar, and the last runs of its DAGs with links. Every request needs an
Airflow login with read access to DAGs (plugin apps are not protected by Airflow unless they ask).
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse

from keyrotation.config import list_key_classes, load_key_class
from keyrotation.errors import KeyRotationError
from keyrotation.ledger import Ledger
from keyrotation.runtime import KeyClassRuntime
from keyrotation.status import behind

CURRENT, OLDER, UNREADABLE = "#59a14f", "#f28e2b", "#444"


def _requires_dag_read() -> list:
    from airflow.api_fastapi.core_api.security import requires_access_dag

    return [Depends(requires_access_dag("GET"))]


def _last_runs(dag_ids: list[str]) -> dict[str, list[dict]]:
    """The last runs of each DAG, from the metadata DB (this code runs in the API server, not in a task)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    out: dict[str, list[dict]] = {}
    with create_session() as session:
        for dag_id in dag_ids:
            runs = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id)
                                   .order_by(DagRun.run_after.desc()).limit(3)).all()
            out[dag_id] = [{"run_id": r.run_id, "state": str(r.state), "run_type": str(r.run_type),
                            "when": r.run_after} for r in runs]
    return out


def _status(age_s: float | None, due_s: float, period_s: float, behind_reason: str | None = None
            ) -> tuple[str, str]:
    if age_s is None:
        return "#999", "no current version"
    if age_s > period_s:
        return "#e15759", "past its cryptoperiod"
    if behind_reason:
        return "#e15759", behind_reason
    if age_s >= due_s:
        return "#f28e2b", "due for rotation"
    return "#59a14f", "within policy"


def _key_class_section(name: str, ledger: Ledger, now: datetime) -> str:
    from keyrotation_airflow.hooks.kms import kms_hook
    from keyrotation_airflow.task_runtime import dataset_storage

    try:
        config = load_key_class(name)
        kc = config.key_class
        rt = KeyClassRuntime(config, kms_hook(kc, "report").get_backend(kc), ledger,
                             storage=dataset_storage(kc, "report"))
        state = rt.backend.key_state()
        censuses = rt.censuses(reuse=True)  # unchanged partitions from the last census: a page, not a gate
        reference = ledger.current_reference(name)
        current = int(reference["to_version"]) if reference else None
    except (KeyRotationError, OSError, ValueError) as exc:
        return f"<section><h2>{html.escape(name)}</h2><p class='error'>{html.escape(str(exc))}</p></section>"
    created = state.created_at(current) if current else None
    age = (now - created).total_seconds() if created else None
    since = reference["recorded_at"] if reference else None
    colour, verdict = _status(age, kc.rotation.due_after.total_seconds(), kc.rotation.cryptoperiod.total_seconds(),
                              behind(kc, current, since, censuses, now))
    age_text = f"{age / 86400:.1f} days" if age is not None else "n/a"
    next_due = (created + kc.rotation.due_after).date().isoformat() if created else "now"
    bars = []
    for census in censuses:
        total = max(1, len(census.partitions) + len(census.errors))
        segments = "".join(
            f"<span class='seg' style='width:{100 * n / total:.1f}%;"
            f"background:{CURRENT if current is not None and v >= current else OLDER}' "
            f"title='v{v}: {n} partitions'>v{v}: {n}</span>"
            for v, n in census.by_version().items()
        )
        if census.errors:
            segments += (f"<span class='seg' style='width:{100 * len(census.errors) / total:.1f}%;"
                         f"background:{UNREADABLE}'>unreadable: {len(census.errors)}</span>")
        bars.append(f"<div class='dataset'>{html.escape(census.dataset)} "
                    f"({len(census.partitions)} partitions)<div class='bar'>{segments}</div></div>")
    dag_ids = [f"rotate__{name}", *(f"reencrypt__{d.name}" for d in config.datasets), f"retire__{name}"]
    rows = []
    for dag_id, runs in _last_runs(dag_ids).items():
        links = ", ".join(
            f"<a href='/dags/{dag_id}/runs/{html.escape(r['run_id'])}'>{html.escape(r['state'])}</a> "
            f"<small>{html.escape(r['run_type'])} {r['when']:%Y-%m-%d %H:%M}</small>" for r in runs) or "no runs"
        rows.append(f"<li><a href='/dags/{dag_id}'>{dag_id}</a>: {links}</li>")
    return (
        f"<section><h2>{html.escape(name)} <span class='badge' style='background:{colour}'>{verdict}</span></h2>"
        f"<table><tr><th>backend</th><td>{html.escape(kc.backend)}: {html.escape(kc.key_ref)}</td>"
        f"<th>current version</th><td>v{current or '-'} (KMS latest v{state.latest_version}, "
        f"min decryption v{state.min_decryption_version})</td></tr>"
        f"<tr><th>age</th><td style='color:{colour}'>{age_text} of {kc.rotation.cryptoperiod.days} days</td>"
        f"<th>next due</th><td>{next_due}</td></tr></table>"
        f"<h3>Census per version</h3>{''.join(bars) or '<p>no datasets</p>'}"
        f"<h3>Last runs</h3><ul>{''.join(rows)}</ul></section>"
    )


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}section{border:1px solid #ddd;border-radius:6px;
padding:12px 16px;margin-bottom:18px}table{border-collapse:collapse}th{text-align:left;padding:2px 10px 2px 0;
color:#555;font-weight:600}td{padding:2px 24px 2px 0}.bar{display:flex;height:22px;width:600px;border-radius:4px;
overflow:hidden;margin:4px 0 10px}.seg{color:#fff;font-size:12px;line-height:22px;padding-left:6px;white-space:nowrap;
overflow:hidden}.badge{color:#fff;font-size:13px;border-radius:10px;padding:2px 10px;vertical-align:middle}
.error{color:#b00}
"""


def create_app() -> FastAPI:
    app = FastAPI(title="Key inventory", dependencies=_requires_dag_read())

    @app.get("/inventory", response_class=HTMLResponse)
    def inventory() -> Any:
        now = datetime.now(UTC)
        ledger = Ledger()
        sections = "".join(_key_class_section(name, ledger, now) for name in list_key_classes())
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>Key inventory</title>"
                f"<style>{STYLE}</style></head><body><h1>Key inventory</h1>"
                f"<p>As of {now:%Y-%m-%d %H:%M} UTC: ledger, KMS metadata and each dataset's census.</p>"
                f"{sections or '<p>No key classes configured.</p>'}</body></html>")

    return app
