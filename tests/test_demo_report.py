"""`make demo` ends with a report whose numbers are cross-checked here, each against a source that is not
the report's code: the KMS (Transit's HTTP API), the data itself (read back by ``tests/oracle.py`` with its
own KMS client and compared with the generated source), the ledger and Airflow's metadata database (SQL).

The demo runs as ``make demo`` runs it (``scripts/demo.py``, the shipped key classes with the demo's relaxed
retire policy, the real DAGs by ``dag.test()``, the report reading the run history from an API server), only
smaller, and against an OpenBao started here so that the KMS can be asked afterwards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import yaml
from oracle import (
    PARTITION_EVENTS,
    TransitKms,
    aware,
    days,
    ledger_events,
    ledger_partition_counts,
    read_dataset,
    same_rows,
    sql_rows,
)

from keyrotation_dev.devserver import OpenBaoDevServer
from keyrotation_dev.sample_data import DATASET_WRITERS  # the source the demo generated its data from

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS, ROWS = 4, 300
pytestmark = [pytest.mark.airflow, pytest.mark.slow]
KEY_CLASSES = {"customer_pii": ("customer-pii", "customers"), "payment_tokens": ("payment-tokens", "payments")}
TASK_STATES = ("queued", "scheduled", "running", "success", "failed", "skipped", "up_for_retry", "up_for_reschedule",
               "upstream_failed", "deferred", "removed", "restarting")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("demo")
    with OpenBaoDevServer(log_path=str(home.parent / "demo-openbao.log")) as bao:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("include", "plugins", "dags")),
               "KEYROTATION_DEMO_HOME": str(home), "KEYROTATION_DEMO_PARTITIONS": str(PARTITIONS),
               "KEYROTATION_DEMO_ROWS": str(ROWS), "KEYROTATION_DEMO_VAULT_CONN": bao.airflow_connection_uri()}
        for name in ("AIRFLOW_HOME", "KEYROTATION_HOME", "KEYROTATION_LEDGER_URL", "KEYROTATION_CONFIG_DIR"):
            env.pop(name, None)
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], env=env, capture_output=True,
                              text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        [folder] = sorted((home / "reports").iterdir())
        yield Demo(home, folder, done.stdout, TransitKms(bao.url, bao.token))


class Demo:
    def __init__(self, home: Path, folder: Path, stdout: str, kms: TransitKms) -> None:
        self.home, self.folder, self.stdout, self.kms = home, folder, stdout, kms
        self.ledger_db = home / "ledger.db"
        self.airflow_db = home / "airflow" / "airflow.db"
        [self.report_row] = ledger_events(self.ledger_db, events=["report_written"])
        self.report_at = aware(self.report_row["recorded_at"])
        self.month = datetime(self.report_at.year, self.report_at.month, 1, tzinfo=UTC)
        self.datasets = {ds: read_dataset(home / "data" / ds, kms) for _, ds in KEY_CLASSES.values()}
        self.config = {kc: yaml.safe_load((home / "config" / f"{kc}.yaml").read_text()) for kc in KEY_CLASSES}

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.folder / f"{name}.parquet")

    def html_table(self, first_id: str) -> pd.DataFrame:
        """The table of the HTML report whose first row is ``first_id`` (what an auditor reads)."""
        html = (self.folder / "report.html").read_text()
        [table] = [t for t in pd.read_html(io.StringIO(html)) if len(t) and t["id"].iloc[0] == first_id]
        return table.set_index("id")


def test_the_data_is_the_source_under_the_current_version_and_the_old_one_is_retired(demo):
    """The oracle first: every partition decrypts (with the KMS, through pyarrow's own reader) to the rows the
    generator made, its keys wrapped only by the current version, which is the KMS's latest; the old version no
    longer decrypts."""
    for key_class, (key_ref, dataset) in KEY_CLASSES.items():
        key = demo.kms.key(key_ref)
        assert (key["latest_version"], key["min_decryption_version"], key["min_encryption_version"]) == (2, 2, 2)
        source = dict(DATASET_WRITERS[dataset](PARTITIONS, ROWS))
        facts = demo.datasets[dataset]
        assert sorted(facts) == sorted(source)
        for partition, got in facts.items():
            assert got.versions == {2} and got.master_keys == {key_ref}, (key_class, partition)
            assert same_rows(got.table, source[partition]), (key_class, partition)
        first = next(iter(facts.values()))
        material = json.loads((demo.home / "data" / dataset / f"dt={first.partition}" /
                               f"_KEY_MATERIAL_FOR_{first.files[0]}.json").read_text())
        wrapped = json.loads(next(iter(material.values())))["wrappedKEK"]
        # the same key under v1 (a ciphertext the retired version made) is refused by the KMS now
        old = wrapped.replace("vault:v2:", "vault:v1:", 1)
        with pytest.raises(RuntimeError, match="HTTP 400"):
            demo.kms.unwrap_key(old, key_ref)


def test_key_inventory_and_versions_are_the_kms_and_the_ledger(demo):
    inventory = demo.table("key_inventory").set_index("key_class")
    html = demo.html_table("inv-1").set_index("key_class")
    versions = demo.table("versions")
    assert sorted(inventory.index) == sorted(KEY_CLASSES)
    for key_class, (key_ref, _) in KEY_CLASSES.items():
        key = demo.kms.key(key_ref)
        [reference] = ledger_events(demo.ledger_db, key_class, ["reference_updated"])[-1:]
        created = datetime.fromtimestamp(key["keys"][str(key["latest_version"])], UTC)
        rotation = demo.config[key_class]["key_class"]["rotation"]
        period = int(rotation["cryptoperiod"].rstrip("d"))
        due = int(rotation.get("rotate_after", rotation["cryptoperiod"]).rstrip("d"))  # rotated ahead of the end
        expected = {
            "exists": True, "key_ref": key_ref, "algorithm": "AES-256-GCM", "current_version": reference["to_version"],
            "kms_latest_version": key["latest_version"], "min_decryption_version": key["min_decryption_version"],
            "min_encryption_version": key["min_encryption_version"], "cryptoperiod_days": period,
            "current_version_created": created.isoformat(timespec="seconds"),
            "next_due": (created + timedelta(days=due)).isoformat(timespec="seconds"), "behind": "",
        }
        row = inventory.loc[key_class]
        assert {k: row[k] for k in expected} == expected, key_class
        assert reference["to_version"] == key["latest_version"]
        assert 0 <= row["age_days"] <= days(datetime.now(UTC) - created)
        shown = html.loc[key_class]
        assert [int(shown[c]) for c in ("current_version", "kms_latest_version", "min_decryption_version",
                                        "cryptoperiod_days")] == [
            expected["current_version"], key["latest_version"], key["min_decryption_version"], period]
        mine = versions[versions["key_class"] == key_class].set_index("version")
        assert list(mine.index) == list(range(1, key["latest_version"] + 1))
        for number in mine.index:
            retired = number < key["min_decryption_version"]
            assert mine.loc[number, "status"] == ("retired" if retired else "enabled"), (key_class, number)
            if not retired:
                made = datetime.fromtimestamp(key["keys"][str(number)], UTC)
                assert mine.loc[number, "created"] == made.isoformat(timespec="seconds")


def test_rotations_and_retirements_are_the_ledgers_rows(demo):
    rotations = demo.table("rotations")
    retirements = demo.table("retirements")
    for key_class, (key_ref, _) in KEY_CLASSES.items():
        rows = ledger_events(demo.ledger_db, key_class, ["key_created", "version_created"])
        mine = rotations[rotations["key_class"] == key_class]
        assert [(r["event"], r["from_version"], r["to_version"], r["run_id"], json.loads(r["detail"])["reason"])
                for r in rows] == [(r.event, None if pd.isna(r.from_version) else r.from_version, r.to_version,
                                    r.run_id, r.reason) for r in mine.itertuples()]
        assert [r["event"] for r in rows] == ["key_created", "version_created"]
        retired = ledger_events(demo.ledger_db, key_class, ["versions_retired"])
        mine = retirements[retirements["key_class"] == key_class]
        assert [(r["event"], r["to_version"], r["run_id"]) for r in retired] == [
            (r.event, r.versions_below, r.run_id) for r in mine.itertuples()]
        assert mine["versions_below"].tolist() == [demo.kms.key(key_ref)["min_decryption_version"]]
        # the demo's relaxed policy, as its config says: no approval asked for, none recorded
        assert mine["approval_required"].tolist() == [demo.config[key_class]["key_class"]["retire"][
            "approval_required"]] == [False]
        assert mine["approved_by"].tolist() == [""]
    assert len(demo.html_table("rot-1")) == len(rotations) == 4
    assert len(demo.html_table("ret-1")) == len(retirements) == 2


def test_coverage_is_the_oracles_census(demo):
    coverage = demo.table("coverage")
    html = demo.html_table("cov-1")
    expected = []
    for key_class, (_, dataset) in KEY_CLASSES.items():
        facts = demo.datasets[dataset]
        for version in sorted({min(f.versions) for f in facts.values()}):
            under = [f for f in facts.values() if min(f.versions) == version]
            expected.append((key_class, dataset, version, version == 2, len(under), sum(f.rows for f in under),
                             sum(f.bytes for f in under), sum(len(f.files) for f in under)))
    assert expected == [(key_class, dataset, 2, True, PARTITIONS, PARTITIONS * ROWS, expected[i][6], PARTITIONS)
                        for i, (key_class, (_, dataset)) in enumerate(KEY_CLASSES.items())]
    columns = ["key_class", "dataset", "version", "current", "partitions", "rows", "bytes", "data_files"]
    assert [tuple(r) for r in coverage[columns].itertuples(index=False)] == expected
    assert [tuple(r) for r in html[columns].itertuples(index=False)] == expected
    text = subprocess.run(["pdftotext", "-layout", str(demo.folder / "report.pdf"), "-"], capture_output=True,
                          text=True, check=True).stdout
    printed = [line.split()[1:] for line in text.splitlines() if re.match(r"\s*cov-\d+\s", line)]
    assert printed == [[str(v) for v in row] for row in expected]


def test_coverage_over_time_is_the_ledger_replayed(demo):
    history = demo.table("coverage_history")
    for key_class, (_, dataset) in KEY_CLASSES.items():
        mine = history[history["key_class"] == key_class]
        for when, group in mine.groupby("time"):
            counts = ledger_partition_counts(demo.ledger_db, key_class, aware(when) + timedelta(seconds=1))
            assert {int(r.version): int(r.partitions) for r in group.itertuples()} == {
                v: counts.get(v, 0) for v in group["version"]}, (key_class, when)
        last = mine[mine["time"] == mine["time"].max()]
        census = demo.datasets[dataset]
        assert {int(r.version): int(r.partitions) for r in last.itertuples() if r.partitions} == {
            2: len(census)}
        changes = ledger_events(demo.ledger_db, key_class, PARTITION_EVENTS)
        assert len(changes) == 2 * PARTITIONS  # written, then rewrapped or re-encrypted


def test_runs_failures_and_actions_are_airflows_own_records(demo):
    """From Airflow's metadata database by SQL: the runs that ran in the period (the report's own run was still
    running when it was written), no failed or retried task, and the people's actions in the event log."""
    low, high = demo.month, demo.report_at
    ours = ("rotate__", "reencrypt__", "retire__", "compliance_report", "ledger_checkpoint")
    runs = [r for r in sql_rows(demo.airflow_db, "SELECT dag_id, run_id, run_type, state, start_date, end_date "
                                                 "FROM dag_run ORDER BY start_date")
            if r["dag_id"].startswith(ours) and aware(r["start_date"]) and aware(r["start_date"]) < high
            and (r["end_date"] is None or aware(r["end_date"]) >= low)]
    reported = demo.table("runs").set_index("run_id")
    assert sorted(reported.index) == sorted(r["run_id"] for r in runs)
    assert len(runs) == 2 * 2 + 2 + 2 + 1  # two rotations and a retirement per key class, two sweeps, the report
    for r in runs:
        row = reported.loc[r["run_id"]]
        if r["run_id"] == demo.report_row["run_id"]:
            assert (row["state"], row["end"]) == ("running", "")  # as it was when the report was written
            assert aware(r["end_date"]) > demo.report_at
            continue
        assert (row["dag_id"], row["run_type"], row["state"], row["start"], row["end"]) == (
            r["dag_id"], r["run_type"], r["state"], aware(r["start_date"]).isoformat(timespec="seconds"),
            aware(r["end_date"]).isoformat(timespec="seconds"))
    assert len(demo.html_table("run-1")) == len(runs)

    marks = ",".join("?" * len(TASK_STATES))
    bad = sql_rows(demo.airflow_db, "SELECT * FROM task_instance WHERE state = 'failed' OR try_number > 1")
    assert demo.table("failures").empty and bad == []
    assert ledger_events(demo.ledger_db, events=["partition_failed", "validation_failed", "retirement_refused"]) == []
    actions = [a for a in sql_rows(demo.airflow_db, f"SELECT * FROM log WHERE NOT (task_id IS NOT NULL AND event IN "
                                                    f"({marks}))", TASK_STATES)
               if (a["dag_id"] or "").startswith(ours) and low <= aware(a["dttm"]) < high]
    assert len(demo.table("ui_actions")) == len(actions)
    assert sql_rows(demo.airflow_db, f"SELECT count(*) AS n FROM log WHERE event IN ({marks})", TASK_STATES)[0]["n"] \
        > 0  # the task state changes Airflow logged are there, and are not counted as people's actions


def test_findings_follow_from_the_independent_facts(demo):
    findings = demo.table("findings")
    status = {(r.control, r.key_class): r.status for r in findings.itertuples()}
    counts = {s: int((findings["status"] == s).sum()) for s in ("PASS", "WARN", "FAIL")}
    assert f"findings: {counts['PASS']} PASS, {counts['WARN']} WARN, {counts['FAIL']} FAIL" in demo.stdout
    assert len(demo.html_table("find-1")) == len(findings)
    for key_class, (key_ref, dataset) in KEY_CLASSES.items():
        key = demo.kms.key(key_ref)
        census = demo.datasets[dataset]
        expected = {
            "INV-1": "PASS",  # the key answers
            "CP-1": "PASS",  # its latest version is minutes old
            "ENC-1": "PASS" if key["min_encryption_version"] >= key["min_decryption_version"] else "FAIL",
            "DATA-1": "PASS" if all(f.versions == {key["latest_version"]} for f in census.values()) else "FAIL",
            "RET-1": "PASS",  # approval not required by the demo's policy, and none was given
            "POL-1": "PASS",  # one config all along: one config hash on every decision
            "SOD-1": "PASS",
        }
        hashes = {json.loads(r["detail"])["policy"]["config_sha256"] for r in ledger_events(demo.ledger_db, key_class)
                  if "policy" in json.loads(r["detail"] or "{}")}
        assert len(hashes) == 1, hashes
        assert {c: status[(c, key_class)] for c in expected} == expected, key_class
    events_before = len([r for r in ledger_events(demo.ledger_db) if r["id"] < demo.report_row["id"]])
    log = findings[findings["control"] == "LOG-1"].iloc[0]
    runs = len(demo.table("runs"))
    assert (log["status"], log["detail"]) == (
        "PASS", f"ledger: {events_before} events, hash chain intact; Airflow history: {runs} runs, "
                f"{len(demo.table('ui_actions'))} UI actions")
    assert f"ledger: sqlite:///{demo.ledger_db} ({events_before + 1} events, hash chain intact" in demo.stdout


def test_the_artifacts_are_those_the_ledger_recorded(demo):
    detail = json.loads(demo.report_row["detail"])
    for name, digest in detail["artifacts"].items():
        assert hashlib.sha256((demo.folder / name).read_bytes()).hexdigest() == digest, name
    assert sorted(detail["artifacts"]) == sorted(p.name for p in demo.folder.iterdir())
    assert (demo.folder / "CONTENT_SHA256").read_text().strip() == detail["content_hash"]
    assert re.search(rf"content SHA-256 {detail['content_hash']}", demo.stdout)
    assert sorted(detail["key_classes"]) == sorted(KEY_CLASSES) and detail["previous"] is None
