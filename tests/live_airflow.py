"""A running Airflow for tests that drive it as an operator does: API server, scheduler and DAG
processor (LocalExecutor), on loopback ports, with the simple auth manager's users, on a PostgreSQL
metadata database of its own (:func:`postgres_databases`).

Not SQLite: with a scheduler, a DAG processor, a triggerer, task processes and the API server all
writing, SQLite's single writer lock made requests fail now and then ("database is locked": a
backfill answered 503, an unpause 500), and a manual trigger was refused in CI (stop 29), most
likely so. Airflow's own advice is PostgreSQL for anything concurrent."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from keyrotation_dev.devserver import free_port

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW = str(Path(sys.executable).parent / "airflow")
PG_ADMIN_URL = os.environ.get("KEYROTATION_TEST_PG_ADMIN", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


@contextmanager
def postgres_databases(prefix: str, *suffixes: str) -> Iterator[list[str]]:
    """Fresh databases ``<prefix>_<random><suffix>`` on the machine's server; dropped afterwards."""
    import sqlalchemy as sa

    stem = f"{prefix}_{secrets.token_hex(4)}"
    names = [stem + suffix for suffix in suffixes]
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        base = PG_ADMIN_URL.rsplit("/", 1)[0]
        yield [f"{base}/{name}" for name in names]
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class LiveAirflow:
    def __init__(self, base: Path, dags: Path, extra_env: dict[str, str], *, database_url: str,
                 triggerer: bool = False) -> None:
        self.components = ["api-server", "scheduler", "dag-processor"] + (["triggerer"] if triggerer else [])
        self.home = base / "airflow"
        self.database_url = database_url
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(16).hex(),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("include", "plugins", "dags")),
            **extra_env,
        }
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []

    def cli(self, *args: str) -> str:
        done = subprocess.run([AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return done.stdout

    def start(self, timeout: float = 120) -> LiveAirflow:
        self.cli("db", "migrate")
        self.cli("dags", "reserialize")
        for name in self.components:
            args = [name, "--port", str(self.port)] if name == "api-server" else [name]
            log = open(self.home / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
            self.logs.append(log)
            # Each component in a session of its own, so that stop() ends its children too (the scheduler's
            # log server and task runners would outlive it otherwise).
            self.procs.append(subprocess.Popen([AIRFLOW, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"API server not healthy after {timeout}s:\n{self.log_tail('api-server')}")
            time.sleep(1)
        return self

    def stop(self) -> None:
        """Terminate every component with its children, and kill what is still up after 10 s in all (a
        triggerer or scheduler finishing its loop; nothing of a test's state is lost by it)."""
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)
            proc.wait(10)
        for log in self.logs:
            log.close()

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.home / f"{name}.log"
        return path.read_text()[-chars:] if path.exists() else ""

    def log_lines(self, name: str, containing: str) -> list[str]:
        path = self.home / f"{name}.log"
        if not path.exists():
            return []
        with path.open(errors="replace") as log:
            return [line for line in log if containing in line]

    def token(self, user: str = "admin") -> str:
        passwords = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
        resp = httpx.post(f"{self.url}/auth/token", json={"username": user, "password": passwords[user]}, timeout=10)
        resp.raise_for_status()
        return resp.json()["access_token"]

    def client(self, user: str = "admin") -> httpx.Client:
        # Generous: a request that waits on a row lock held by the scheduler or a task still gets its answer.
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token(user)}"}, timeout=90)

    @staticmethod
    def trigger(client: httpx.Client, dag_id: str, conf: dict | None = None) -> dict:
        """A manual run of ``dag_id`` (no logical date), as the UI's Trigger button makes it; the new run."""
        resp = client.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        assert resp.status_code == 200, f"trigger {dag_id}: {resp.status_code} {resp.text}"
        return resp.json()

    def wait(self, check, what: str, timeout: float = 180, every: float = 1.0):  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached after {timeout}s\nscheduler:\n{self.log_tail('scheduler')}")
            time.sleep(every)
