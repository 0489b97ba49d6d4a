"""`make up` as a small real deployment: scripts/up.py in a temporary home on free ports, with the shipped
key classes. Every listener on loopback; each role connection's OpenBao token has that role's policy only
(the root token in no connection); the report's user reads and cannot trigger; a forced rotation of
customer_pii goes through re-encryption to a retirement waiting (deferred) for its grace period, with no
approval asked yet and nothing failed; then `make down` (the same code path) leaves no process behind."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import hvac
import psutil
import pytest

from keyrotation.policies import ROLES
from keyrotation_dev.devserver import free_port

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
UP = [sys.executable, str(ROOT / "scripts" / "up.py")]
KEY_CLASSES = ("customer_pii", "payment_tokens")  # the shipped ones
LOOPBACK = {"127.0.0.1", "::1"}
TERMINAL = {"success", "failed"}


class Up:
    """scripts/up.py running in ``home``; its output in ``home.parent / 'up.log'``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.ports = {name: free_port() for name in ("api", "bao", "worker_log", "trigger_log")}
        # The suite's own Airflow and key class settings (conftest.py) stay out: this is `make up` as shipped.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "KEYROTATION_", "GRPC_"))}
        self.env.update({
            "KEYROTATION_UP_HOME": str(home),
            "KEYROTATION_UP_API_PORT": str(self.ports["api"]),
            "KEYROTATION_BAO_PORT": str(self.ports["bao"]),
            "KEYROTATION_UP_WORKER_LOG_PORT": str(self.ports["worker_log"]),
            "KEYROTATION_UP_TRIGGER_LOG_PORT": str(self.ports["trigger_log"]),
        })
        self.url = f"http://127.0.0.1:{self.ports['api']}"
        self.log_path = home.parent / "up.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(UP, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.seen: dict[int, float] = {}  # every process of the tree seen: pid -> start time

    def diagnostics(self) -> str:
        out = [f"--- up.log\n{self.log_path.read_text(errors='replace')[-3000:]}"]
        for log in sorted((self.home / "logs").glob("*.log")):
            out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}")
        return "\n".join(out)

    def wait(self, check: Callable[[], Any], what: str, timeout: float = 150, every: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"scripts/up.py exited ({self.proc.returncode}) waiting for {what}\n{self.diagnostics()}")
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not after {timeout:.0f} s\n{self.diagnostics()}")
            time.sleep(every)

    def tree(self) -> list[psutil.Process]:
        """The running processes of the deployment: scripts/up.py, its descendants, and everything in the
        sessions of the components it recorded (which includes task processes and orphans)."""
        state = json.loads((self.home / "up.json").read_text())
        sids = {entry["pid"] for entry in state["components"].values()}
        procs = {p.pid: p for p in [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]}
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) in sids:
                    procs[p.pid] = p
            except (OSError, psutil.Error):
                continue
        for p in procs.values():
            try:
                self.seen.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass
        return list(procs.values())

    def listening(self) -> set[int]:
        """The ports the process tree listens on (TCP) or has bound (UDP); fails on one not on loopback."""
        ports = set()
        for process in self.tree():
            try:
                sockets = process.net_connections(kind="inet")
            except psutil.Error:
                continue
            for s in sockets:
                if s.laddr and (s.status == psutil.CONN_LISTEN or s.type == socket.SOCK_DGRAM):
                    assert s.laddr.ip in LOOPBACK, f"{process.cmdline()} listens on {s.laddr}"
                    ports.add(s.laddr.port)
        return ports

    def healthy(self) -> bool:
        try:
            health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        return all((health.get(part) or {}).get("status") == "healthy"
                   for part in ("metadatabase", "scheduler", "triggerer", "dag_processor"))

    def client(self, user: str) -> httpx.Client:
        passwords = json.loads((self.home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
        resp = httpx.post(f"{self.url}/auth/token", json={"username": user, "password": passwords[user]}, timeout=30)
        resp.raise_for_status()
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {resp.json()['access_token']}"},
                            timeout=30)

    def down(self) -> subprocess.CompletedProcess:
        done = subprocess.run([*UP, "down"], env=self.env, capture_output=True, text=True, timeout=150)
        try:
            self.proc.wait(60)
        finally:
            self.log.close()
        return done


def _runs(client: httpx.Client, dag_id: str) -> list[dict]:
    return client.get(f"/api/v2/dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "run_after"}).json()[
        "dag_runs"]


def _after(run: dict, moment: str) -> bool:
    return datetime.fromisoformat(run["run_after"]) > datetime.fromisoformat(moment)


def _ti_state(client: httpx.Client, dag_id: str, run_id: str, task_id: str) -> str | None:
    resp = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
    return resp.json().get("state") if resp.status_code == 200 else None


@pytest.fixture
def up(tmp_path):
    deployment = Up(tmp_path / "up")
    yield deployment
    if deployment.proc.poll() is None:  # a failed test: stop it all the same
        deployment.down()


def test_make_up_is_a_small_real_deployment(up):
    started = time.monotonic()
    up.wait(up.healthy, "API server, scheduler, DAG processor and triggerer healthy", timeout=240)
    print(f"healthy after {time.monotonic() - started:.0f} s")

    # Every listening socket of the started process tree is on loopback, the four ports included.
    assert set(up.ports.values()) <= up.listening(), up.ports

    # Each role connection (in the environment of the components that run tasks) has its role's token.
    init = json.loads((up.home / "openbao" / "init.json").read_text())
    for secret in ("init.json", "tokens.json"):
        assert stat.S_IMODE((up.home / "openbao" / secret).stat().st_mode) == 0o600
    passwords_file = up.home / "airflow" / "simple_auth_manager_passwords.json.generated"
    assert stat.S_IMODE(passwords_file.stat().st_mode) == 0o600
    state = json.loads((up.home / "up.json").read_text())
    connections: dict[str, dict] = {}
    for name, entry in state["components"].items():
        if name in ("scheduler", "triggerer"):
            environ = psutil.Process(entry["pid"]).environ()
            connections.update({k.removeprefix("AIRFLOW_CONN_").lower(): json.loads(v)
                                for k, v in environ.items() if k.startswith("AIRFLOW_CONN_")})
    for process in up.tree():  # the root token in no connection of any process
        try:
            environ = process.environ()
        except psutil.Error:
            continue
        assert not any(init["root_token"] in v for k, v in environ.items() if k.startswith("AIRFLOW_CONN_"))
    expected = {f"vault_keyrotation_{kc}_{role}": (kc, role) for kc in KEY_CLASSES for role in ROLES}
    assert set(connections) == {*expected, "keyrotation_airflow_api", "keyrotation_anchor"}, sorted(connections)
    for conn_id, (kc, role) in expected.items():
        token = connections[conn_id]["password"]
        assert token != init["root_token"]
        me = hvac.Client(url=f"http://127.0.0.1:{up.ports['bao']}", token=token).auth.token.lookup_self()["data"]
        assert sorted(me["policies"]) == sorted([f"keyrotation-{kc}-{role}", "keyrotation-token-self"]), me
        assert me["period"] == 24 * 3600 and me["renewable"] and not me.get("identity_policies"), me
    # The ledger's anchor: HMAC and verify with its own key, nothing else (tests/test_least_privilege.py).
    anchor = hvac.Client(url=f"http://127.0.0.1:{up.ports['bao']}", token=connections["keyrotation_anchor"]["password"])
    me = anchor.auth.token.lookup_self()["data"]
    assert sorted(me["policies"]) == ["keyrotation-ledger-anchor-verifier", "keyrotation-ledger-anchor-writer",
                                      "keyrotation-token-self"], me
    assert me["period"] == 24 * 3600 and me["renewable"] and not me.get("identity_policies"), me
    assert anchor.secrets.transit.read_key("keyrotation-ledger-anchor")["data"]["type"] == "aes256-gcm96"
    api = connections["keyrotation_airflow_api"]
    assert (api["conn_type"], api["host"], api["port"], api["login"]) == ("http", "127.0.0.1", up.ports["api"],
                                                                          "report")

    with up.client("admin") as admin, up.client("report") as report:
        up.wait(lambda: admin.get("/api/v2/dags/rotate__customer_pii").status_code == 200, "DAGs parsed")
        # The report's user reads the run history and cannot start anything.
        assert report.get("/api/v2/dags/~/dagRuns").status_code == 200
        assert report.get("/api/v2/eventLogs").status_code == 200
        refused = report.post("/api/v2/dags/rotate__customer_pii/dagRuns", json={"logical_date": None,
                                                                                "conf": {"force": True}})
        assert refused.status_code == 403, refused.text
        # Unpaused now: the run of its last scheduled tick (not due: skipped) goes while the first sweeps run.
        assert admin.patch("/api/v2/dags/rotate__customer_pii", json={"is_paused": False}).status_code == 200

        # The first scheduled sweep of reencrypt__customers (created active) and the retire run its census
        # starts end before the rotation: a census gate that saw the data before the sweep would wait 5 min.
        first = up.wait(lambda: [r for r in _runs(admin, "reencrypt__customers") if r["state"] in TERMINAL],
                        "the first scheduled reencrypt__customers run")[0]
        up.wait(lambda: [r for r in _runs(admin, "retire__customer_pii") if _after(r, first["run_after"])
                         and r["state"] in TERMINAL], "the retire__customer_pii run after the first sweep")

        resp = admin.post("/api/v2/dags/rotate__customer_pii/dagRuns",
                          json={"logical_date": None, "conf": {"force": True, "reason": "test"}})
        assert resp.status_code == 200, resp.text
        rotation = resp.json()

        def finished(dag_id: str, run_id: str) -> str | None:
            run = admin.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()
            return run["state"] if run["state"] in TERMINAL else None

        assert up.wait(lambda: finished("rotate__customer_pii", rotation["dag_run_id"]), "the rotation") == "success"
        sweep = up.wait(lambda: [r for r in _runs(admin, "reencrypt__customers")
                                 if r["run_type"] == "asset_triggered" and _after(r, rotation["run_after"])],
                        "the sweep the rotation starts")[0]
        assert up.wait(lambda: finished("reencrypt__customers", sweep["dag_run_id"]), "the sweep") == "success"
        retire = up.wait(lambda: [r for r in _runs(admin, "retire__customer_pii") if _after(r, sweep["run_after"])],
                         "the retire run after the sweep")[0]
        # Grace period of 7 days: waited for in the triggerer, not failed; nobody asked to approve yet.
        up.wait(lambda: _ti_state(admin, "retire__customer_pii", retire["dag_run_id"], "wait_grace_period")
                == "deferred", "wait_grace_period deferred")
        assert _ti_state(admin, "retire__customer_pii", retire["dag_run_id"], "approve") is None
        # The ledger's anchor (created active): a checkpoint, which the auditor's command, with the anchor
        # token, accepts.
        checkpoint = up.wait(lambda: [r for r in _runs(admin, "ledger_checkpoint") if r["state"] in TERMINAL],
                             "the first ledger_checkpoint run")[0]
        assert checkpoint["state"] == "success", checkpoint
        audit = subprocess.run(
            [sys.executable, "-m", "keyrotation.ledger", "verify", "--url", f"sqlite:///{up.home / 'ledger.db'}",
             "--checkpoints", str(up.home / "ledger-checkpoints.jsonl")], cwd=ROOT / "include", capture_output=True,
            text=True, env={**os.environ, "VAULT_ADDR": f"http://127.0.0.1:{up.ports['bao']}",
                            "VAULT_TOKEN": connections["keyrotation_anchor"]["password"]})
        assert audit.returncode == 0 and "matches the checkpoint of" in audit.stdout, audit.stdout + audit.stderr
        # The report reads the run history out of the box (issue 17: LOG-1 was WARN under make up): the first
        # report, started by the first sweep's audit event.
        report = up.wait(lambda: [r for r in _runs(admin, "compliance_report") if r["state"] in TERMINAL],
                         "the first compliance_report run")[0]
        assert report["state"] == "success", report
        written = sorted((up.home / "reports").glob("*/findings.csv"))
        assert written, sorted((up.home / "reports").glob("*"))
        [log1] = [row for row in csv.DictReader(io.StringIO(written[0].read_text())) if row["control"] == "LOG-1"]
        assert log1["status"] == "PASS" and re.fullmatch(
            r"ledger: \d+ events, hash chain intact; Airflow history: \d+ runs, \d+ UI actions", log1["detail"]), log1
        failed = admin.get("/api/v2/dags/~/dagRuns", params={"state": "failed"}).json()
        assert failed["total_entries"] == 0, failed
        bad_tis = admin.get("/api/v2/dags/~/dagRuns/~/taskInstances",
                            params={"state": ["failed", "up_for_retry", "upstream_failed"]}).json()
        assert bad_tis["total_entries"] == 0, bad_tis
        assert admin.get("/api/v2/dags/~/dagRuns/~/hitlDetails").json()["hitl_details"] == []
    key = hvac.Client(url=f"http://127.0.0.1:{up.ports['bao']}",
                      token=connections["vault_keyrotation_customer_pii_report"]["password"]).secrets.transit
    assert key.read_key("customer-pii")["data"]["latest_version"] == 2

    # make down: scripts/up.py down, as the Makefile's target runs it.
    assert set(up.ports.values()) <= up.listening(), up.ports  # the tree once more, with its task workers
    done = up.down()
    assert done.returncode == 0 and "did not stop" not in done.stdout, done.stdout + done.stderr
    assert up.proc.returncode == 0, up.diagnostics()
    assert not (up.home / "up.json").exists()
    left = []
    for pid, created in up.seen.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(process.cmdline()))
        except psutil.Error:
            continue
    assert not left, left
    print(f"wall time {time.monotonic() - started:.0f} s, {len(up.seen)} processes seen")
