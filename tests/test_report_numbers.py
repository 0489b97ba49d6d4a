"""The report's numbers against independent computations: coverage over time against a straight
query of the ledger's table, and the runs of a period against the run list the test serves from a
loopback Airflow API (with Airflow's own filter semantics)."""

from __future__ import annotations

import io
import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pandas as pd
import pytest
from oracle import ledger_partition_counts

from keyrotation.backends.base import KeyState, KeyVersion
from keyrotation.ledger import Ledger, RunContext
from keyrotation.reports import AirflowHistory, KeyClassEvidence, Period, build_report
from keyrotation.reports.charts import coverage_series

AUGUST = Period(datetime(2025, 8, 1, tzinfo=UTC), datetime(2025, 9, 1, tzinfo=UTC))
NOW = datetime(2025, 9, 2, tzinfo=UTC)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _table(built, name: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(built.files[f"{name}.parquet"]))


def _state(kc) -> KeyState:
    made = NOW - timedelta(days=10)
    return KeyState(key_ref=kc.key_ref, exists=True, latest_version=2, min_decryption_version=1,
                    min_encryption_version=1, versions={1: KeyVersion(1, made), 2: KeyVersion(2, made)})


def test_coverage_over_time_carries_each_series_forward_between_changes(make_key_class, tmp_path):
    """payment_tokens was written (30 partitions under v1) before the period and changed once in it;
    another key class changed twice. At every time of the chart each series must equal the ledger's
    count at that time, not drop to 0 at the other key class's changes."""
    tokens = make_key_class(name="payment_tokens", dataset="tokens").key_class
    other = make_key_class(name="other_pii", dataset="people").key_class
    db = str(tmp_path / "numbers.db")
    ledger = Ledger(f"sqlite:///{db}")
    ctx = RunContext(dag_id="rotate__x", run_id="r", actor="scheduler")
    for i in range(30):
        ledger.record("partition_written", "payment_tokens", RunContext(run_id="w1"), dataset="tokens",
                      partition=f"2025-06-{i + 1:02d}", to_version=1, at=at("2025-07-20"))
    for i in range(4):
        ledger.record("partition_written", "other_pii", RunContext(run_id="w2"), dataset="people",
                      partition=f"p{i}", to_version=1, at=at("2025-08-05"))
    for i in range(5):
        ledger.record("partition_rewrapped", "payment_tokens", ctx, dataset="tokens",
                      partition=f"2025-06-{i + 1:02d}", from_version=1, to_version=2, at=at("2025-08-10"))
    for i in range(4):
        ledger.record("partition_rewrapped", "other_pii", RunContext(run_id="w3"), dataset="people",
                      partition=f"p{i}", from_version=1, to_version=2, at=at("2025-08-15"))

    items = [KeyClassEvidence(kc, _state(kc), []) for kc in (tokens, other)]
    built = build_report(items, ledger, AUGUST, history=None, now=NOW)
    history = _table(built, "coverage_history")
    series = coverage_series(history)
    times = [at(t) for t in series.index]
    assert times == [at("2025-08-01"), at("2025-08-05"), at("2025-08-10"), at("2025-08-15")]
    assert list(series.columns) == ["other_pii v1", "other_pii v2", "payment_tokens v1", "payment_tokens v2"]
    for when, row in zip(times, series.itertuples(index=False), strict=True):
        for name, value in zip(series.columns, row, strict=True):
            key_class, version = name.rsplit(" v", 1)
            assert value == ledger_partition_counts(db, key_class, when).get(int(version), 0), (when, name)
    # The defect the auditor saw: v1 of payment_tokens is 30 until it changes, 25 after.
    assert list(series["payment_tokens v1"]) == [30, 30, 25, 25]
    # The table itself: the state carried in at the period's start, and a series that empties reads 0.
    first = history[history["time"] == "2025-08-01T00:00:00"]
    assert [(r.key_class, r.version, r.partitions) for r in first.itertuples()] == [("payment_tokens", 1, 30)]
    last = history[(history["time"] == "2025-08-15T00:00:00")]
    assert [(r.version, r.partitions) for r in last.itertuples()] == [(1, 0), (2, 4)]


class FakeAirflowApi(BaseHTTPRequestHandler):
    """``/auth/token`` and the list endpoints the report reads, filtering like Airflow 3's API server:
    ``<field>_gte/_gt/_lte/_lt`` range filters where, for ``start_date`` and ``end_date``, a missing
    value passes a lower bound and passes an upper bound only if now is within it; ``limit``/``offset``."""

    runs: list[dict] = []
    queries: list[dict] = []

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass

    def _send(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send({"access_token": "t"}, 201)

    def do_GET(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        key = {"/api/v2/dags/~/dagRuns": "dag_runs", "/api/v2/dags/~/dagRuns/~/taskInstances": "task_instances",
               "/api/v2/eventLogs": "event_logs"}.get(url.path)
        if key is None:
            self._send({"detail": "not found"}, 404)
            return
        type(self).queries.append({"path": url.path, **query})
        items = list(self.runs) if key == "dag_runs" else []
        for name, bound in query.items():
            field, _, op = name.rpartition("_")
            if op not in ("gte", "gt", "lte", "lt"):
                continue
            limit = at(bound.replace("+00:00", ""))
            items = [i for i in items if _passes(i.get(field), op, limit, field in ("start_date", "end_date"))]
        offset, size = int(query.get("offset", 0)), int(query.get("limit", 100))
        self._send({key: items[offset:offset + size], "total_entries": len(items)})


def _passes(value: str | None, op: str, limit: datetime, nullable: bool) -> bool:
    if value is None:
        if not nullable:
            return False
        return True if op in ("gte", "gt") else datetime.now(UTC) <= limit
    value = at(value.replace("Z", ""))
    return {"gte": value >= limit, "gt": value > limit, "lte": value <= limit, "lt": value < limit}[op]


def _run(dag_id: str, run_id: str, run_type: str, run_after: str, start: str | None, end: str | None, **extra) -> dict:
    return {"dag_id": dag_id, "dag_run_id": run_id, "run_type": run_type, "run_after": run_after + "Z",
            "start_date": start and start + "Z", "end_date": end and end + "Z",
            "state": "success" if end else ("running" if start else "queued"), "triggered_by": "timetable",
            "triggering_user_name": None, "conf": {}, "data_interval_start": None, "data_interval_end": None,
            "partition_key": None, **extra}


RUNS = [
    # a backfill of January 2023 executed in August 2025
    _run("reencrypt__tokens", "backfill__2023-01-01", "backfill", "2023-01-02T00:00:00", "2025-08-05T10:00:00",
         "2025-08-05T10:20:00", triggered_by="backfill", triggering_user_name="carol",
         data_interval_start="2023-01-01T00:00:00Z", data_interval_end="2023-01-02T00:00:00Z",
         conf={"reason": "restore"}),
    _run("rotate__tokens", "scheduled__2025-08-10", "scheduled", "2025-08-10T00:00:00", "2025-08-10T00:00:05",
         "2025-08-10T00:01:00", data_interval_start="2025-08-09T00:00:00Z",
         data_interval_end="2025-08-10T00:00:00Z"),
    # queued on 31 July, ran across midnight
    _run("retire__tokens", "manual__late-july", "manual", "2025-07-31T23:50:00", "2025-07-31T23:55:00",
         "2025-08-01T00:10:00", triggered_by="ui", triggering_user_name="alice",
         conf={"partition_from": "2025-06-01", "partition_to": "2025-06-30"}),
    _run("rotate__tokens", "scheduled__2025-07-10", "scheduled", "2025-07-10T00:00:00", "2025-07-10T00:00:05",
         "2025-07-10T00:01:00"),
    # due in August, never started
    _run("rotate__tokens", "scheduled__2025-08-31", "scheduled", "2025-08-31T23:59:00", None, None),
    _run("reencrypt__tokens", "asset__still-running", "asset_triggered", "2025-08-30T00:00:00",
         "2025-08-30T00:00:10", None, triggered_by="asset"),
    # due in August, ran in September
    _run("compliance_report", "scheduled__late", "scheduled", "2025-08-31T23:58:00", "2025-09-01T00:05:00",
         "2025-09-01T00:06:00"),
    _run("somebody_elses_dag", "manual__x", "manual", "2025-08-15T00:00:00", "2025-08-15T00:00:01",
         "2025-08-15T00:00:02"),
]


@pytest.fixture
def fake_api():
    FakeAirflowApi.runs, FakeAirflowApi.queries = RUNS, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAirflowApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_runs_are_those_that_ran_in_the_period_backfills_included(fake_api, tmp_path):
    # Independently of the report's code: started before the period's end, ended at or after its start
    # (or not yet ended), and a DAG of this package.
    expected = [r["dag_run_id"] for r in RUNS
                if r["dag_id"].startswith(("rotate__", "reencrypt__", "retire__", "compliance_report"))
                and r["start_date"] and at(r["start_date"][:-1]) < AUGUST.end
                and (r["end_date"] is None or at(r["end_date"][:-1]) >= AUGUST.start)]
    assert sorted(expected) == ["asset__still-running", "backfill__2023-01-01", "manual__late-july",
                                "scheduled__2025-08-10"]

    history = AirflowHistory(fake_api, "viewer", "secret", page_size=2)
    selected = history.dag_runs(AUGUST.start, AUGUST.end)
    assert sorted(r["dag_run_id"] for r in selected) == sorted(expected)

    built = build_report([], Ledger(f"sqlite:///{tmp_path / 'runs.db'}"), AUGUST, history=history, now=NOW)
    runs = _table(built, "runs").set_index("run_id")
    assert sorted(runs.index) == sorted(expected)
    backfill = runs.loc["backfill__2023-01-01"]
    assert (backfill["run_type"], backfill["triggered_by"], backfill["triggering_user"], backfill["start"],
            backfill["data_interval_start"], backfill["data_interval_end"], backfill["reason"]) == (
        "backfill", "backfill", "carol", "2025-08-05T10:00:00+00:00", "2023-01-01T00:00:00+00:00",
        "2023-01-02T00:00:00+00:00", "restore")
    late = runs.loc["manual__late-july"]
    assert (late["triggered_by"], late["triggering_user"], late["partition"]) == (
        "ui", "alice", "2025-06-01..2025-06-30")
    assert runs.loc["asset__still-running", "end"] == ""
    # Every list the report read was filtered on when things ran, not on run_after.
    assert not any(k.startswith("run_after") for q in FakeAirflowApi.queries for k in q)
