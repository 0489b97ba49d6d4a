"""No key, token or plaintext value reaches a log, an XCom, a run's conf, the ledger or the report.

The full cycle runs through Airflow with canary data values and the OpenBao token; every data key
and KEK that passes through the backend is captured; then every place an operator or auditor could
look is scanned for all of them, raw, hex and base64 (at each of the three alignments).
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from pathlib import Path

import pytest

from helpers import CANARY, days, runtime, seed
from keyrotation.backends.vault_transit import VaultTransitBackend

pytestmark = pytest.mark.airflow


def forms(secret: bytes) -> set[str]:
    """The secret as text, hex and base64; base64 at each alignment, trimmed of its edge characters."""
    out = {secret.hex()}
    try:
        out.add(secret.decode())
    except UnicodeDecodeError:
        pass
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + secret).decode()
        core = encoded[(pad * 4 + 2) // 3 + 1 : -3]
        if len(core) >= 12:
            out.add(core)
    return out


def test_full_cycle_leaks_nothing(make_key_class, vault, openbao, airflow_db, tmp_path, capfd, caplog, monkeypatch):
    from keyrotation_airflow.operators.report import ComplianceReportOperator
    from keyrotation_factory import key_class_dags

    seen_keys: list[bytes] = []
    real_wrap, real_unwrap = VaultTransitBackend.wrap, VaultTransitBackend.unwrap

    def wrap(self, plaintext, version=None):
        seen_keys.append(plaintext)
        return real_wrap(self, plaintext, version)

    def unwrap(self, wrapped):
        key = real_unwrap(self, wrapped)
        seen_keys.append(key)
        return key

    monkeypatch.setattr(VaultTransitBackend, "wrap", wrap)
    monkeypatch.setattr(VaultTransitBackend, "unwrap", unwrap)

    rt = runtime(make_key_class(name="canary", mode="reencrypt", dataset="canary_data"), vault)
    dags = key_class_dags("canary")
    runs = [dags["rotate__canary"].test(run_conf={"force": False, "reason": "test: first version"})]
    seed(rt, "canary_data", days("2024-01-01", 3))
    runs.append(dags["rotate__canary"].test(run_conf={"force": True, "reason": "canary"}))
    runs.append(dags["reencrypt__canary_data"].test(run_conf={"scope": "sweep", "dry_run": False}))
    runs.append(dags["retire__canary"].test())
    assert [getattr(r.state, "value", r.state) for r in runs] == ["success"] * 4
    report = Path(ComplianceReportOperator(task_id="r", output_dir=str(tmp_path / "report"),
                                           key_classes=["canary"]).execute({})["html"])

    # The tasks ran in this process and their keys went through the spy: otherwise the scan proves nothing.
    assert len(seen_keys) >= 6
    needles = {"data value": forms(CANARY.encode()), "OpenBao token": forms(openbao.token.encode())}
    for i, key in enumerate(seen_keys):
        needles[f"plaintext key #{i}"] = forms(key)

    out, err = capfd.readouterr()
    haystacks = {"task output": out + err + caplog.text}
    assert "plan (sweep): 3 partitions" in haystacks["task output"]  # the task logs were captured
    logs = Path(os.environ["AIRFLOW_HOME"]) / "logs"
    for path in logs.rglob("*") if logs.exists() else []:
        if path.is_file():
            haystacks[str(path)] = path.read_text(errors="replace")
    with sqlite3.connect(Path(os.environ["AIRFLOW_HOME"]) / "airflow.db") as db:
        xcoms = db.execute("SELECT dag_id, task_id, value FROM xcom WHERE dag_id LIKE '%canary%'").fetchall()
        confs = db.execute("SELECT conf FROM dag_run WHERE dag_id LIKE '%canary%'").fetchall()
    assert xcoms, "no XCom rows found to scan"
    haystacks["xcom"] = json.dumps([str(v) for v in xcoms])
    haystacks["dag run conf"] = json.dumps([str(c) for c in confs])
    haystacks["ledger"] = json.dumps([{k: str(v) for k, v in r.items()} for r in rt.ledger.rows()])
    for path in report.parent.iterdir():
        haystacks[str(path)] = report_text(path)

    leaks = [(what, where) for what, variants in needles.items() for where, text in haystacks.items()
             if any(v in text for v in variants)]
    assert leaks == []


def test_the_scan_finds_a_planted_leak():
    """The needles match a key printed as base64 in the middle of a log line."""
    key = os.urandom(32)
    line = "debug: kek=" + base64.b64encode(b"xx" + key).decode() + " done"
    assert any(v in line for v in forms(key))
    assert any(v in f"value {CANARY}-000000001" for v in forms(CANARY.encode()))


def report_text(path: Path) -> str:
    """What a reader of a report artifact sees: tables as text, the PDF's text, raw bytes otherwise."""
    import shutil
    import subprocess

    import pandas as pd

    if path.suffix == ".parquet":
        return pd.read_parquet(path).to_csv()
    raw = path.read_bytes().decode("latin-1")
    if path.suffix == ".pdf":
        assert shutil.which("pdftotext"), "pdftotext (Debian poppler-utils) is needed to read the PDF report"
        raw += subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True, check=True).stdout
    return raw
