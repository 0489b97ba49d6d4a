"""The docker-compose topology, natively on loopback: API server, scheduler, DAG processor and
triggerer with the CeleryExecutor, a PostgreSQL metadata database, a Redis broker and any number of
``airflow celery worker`` processes, each with a host name of its own (see worker_host.py).

Nothing here collides with anything else on the machine: the databases are created per run
(``keyrotation_scaleout_<random>``) and dropped at the end, and the broker uses a Redis database that
was empty when claimed, plus a queue of its own.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from live_airflow import AIRFLOW, ROOT, LiveAirflow

from keyrotation_dev.devserver import free_port

REDIS_URL = os.environ.get("KEYROTATION_TEST_REDIS", "redis://127.0.0.1:6379")
WORKER_HOST = Path(__file__).with_name("worker_host.py")


@contextmanager
def redis_broker() -> Iterator[str]:
    """A Redis database that held no key when claimed (a marker key claims it); emptied afterwards."""
    import redis

    marker, owner = "keyrotation:test:claimed", secrets.token_hex(8)
    candidates = list(range(1, 16))
    random.shuffle(candidates)
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.ConnectionError as exc:
        raise RuntimeError(f"no Redis on {REDIS_URL} for the Celery broker ({exc}); .ci/run starts it") from None
    for db in candidates:
        client = redis.Redis.from_url(f"{REDIS_URL}/{db}")
        if client.dbsize() == 0 and client.set(marker, owner, nx=True) and client.dbsize() == 1:
            break
        client.close()
    else:
        raise RuntimeError(f"no empty Redis database on {REDIS_URL} (1-15) to use as the broker")
    try:
        yield f"{REDIS_URL}/{db}"
    finally:
        if client.get(marker) == owner.encode():
            client.flushdb()
        client.close()


class CeleryAirflow(LiveAirflow):
    """LiveAirflow with the CeleryExecutor, PostgreSQL and Redis; workers started with :meth:`start_worker`."""

    def __init__(self, base: Path, dags: Path, extra_env: dict[str, str], *, database_url: str, broker_url: str,
                 queue: str | None = None) -> None:
        self.queue = queue or f"keyrotation-{secrets.token_hex(4)}"
        env = {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + database_url,
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(32),
            # Two workers with two slots each: the scheduler hands out no more than they run at once.
            "AIRFLOW__CORE__PARALLELISM": "4",
            # A worker that dies stops heartbeating: its running tasks fail (and retry) after this
            # (default 300 s) ...
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
            # ... and the tasks it had taken from the broker but not started yet stay queued until
            # this (default 600 s): the broker hands an unacknowledged message to another worker only
            # after its visibility timeout (24 h), so the scheduler queues them again itself.
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "60",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "5",
            **extra_env,
        }
        super().__init__(base, dags, env, database_url=database_url, triggerer=True)
        # Every component and task process imports Airflow: let them share compiled bytecode.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.workers: dict[str, subprocess.Popen] = {}

    def start_worker(self, name: str, concurrency: int = 2) -> subprocess.Popen:
        """``airflow celery worker`` as host ``name``, under a reaper (as in a container)."""
        env = {
            **self.env,
            "KEYROTATION_WORKER_HOSTNAME": name,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "worker_host.worker_hostname",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "PYTHONPATH": os.pathsep.join([self.env["PYTHONPATH"], str(ROOT / "tests")]),
        }
        log = open(self.home / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, str(WORKER_HOST), AIRFLOW, "celery", "worker", "--celery-hostname", f"{name}@%h",
             "--concurrency", str(concurrency), "--queues", self.queue, "--without-gossip", "--without-mingle"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers[name] = proc
        return proc

    def wait_workers_ready(self, timeout: float = 120) -> None:
        for name in self.workers:
            self.wait(lambda n=name: self.log_lines(n, " ready.") or self._worker_exited(n),
                      f"celery worker {name} ready", timeout=timeout, every=0.5)
            if self._worker_exited(name):
                raise RuntimeError(f"celery worker {name} exited:\n{self.log_tail(name)}")

    def _worker_exited(self, name: str) -> bool:
        return self.workers[name].poll() is not None

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL every process group of worker ``name`` (the worker, its pool and each task's own group,
        as when its machine dies); the reaper stays to collect them. Returns the pids killed."""
        reaper = psutil.Process(self.workers[name].pid)
        tree = reaper.children(recursive=True)
        groups = {os.getpgid(p.pid) for p in tree if p.is_running()}
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        gone, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"still alive after SIGKILL: {alive}"
        return [p.pid for p in tree]

    def stop(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
                proc.wait()
        super().stop()

    def task_instances(self, client, dag_id: str, run_id: str) -> list[dict]:  # noqa: ANN001
        """Every task instance of a run (mapped ones included), through the REST API."""
        out, offset = [], 0
        while True:
            page = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                              params={"limit": 100, "offset": offset}).json()
            out += page["task_instances"]
            offset += len(page["task_instances"])
            if not page["task_instances"] or offset >= page["total_entries"]:
                return out

    def tries(self, client, dag_id: str, run_id: str, task_id: str, map_index: int) -> list[dict]:  # noqa: ANN001
        resp = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/tries")
        resp.raise_for_status()
        return resp.json()["task_instances"]


__all__ = ["AIRFLOW", "CeleryAirflow", "redis_broker"]
