"""Airflow's run history through its REST API (``/api/v2``), for the compliance report.

In Airflow 3 tasks cannot read the metadata database, so the report asks the API server, as a
read-only user (the ``viewer`` role is enough): DAG runs and who triggered them, task instances
(failures and retries), and the event log of actions taken in the UI (triggers, approvals).
Every list is paginated; nothing here writes.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import requests

from keyrotation.errors import KeyRotationError

log = logging.getLogger(__name__)
#: DAGs of this package: the report reads only their history.
DAG_PREFIXES = ("rotate__", "reencrypt__", "retire__", "compliance_report")


class HistoryUnavailable(KeyRotationError):
    """The Airflow API server could not be reached or refused the report's user."""


class AirflowHistory:
    """A read-only client of the Airflow 3 REST API, authenticated with a token from ``/auth/token``.

    :param base_url: The API server, e.g. ``http://localhost:8080``.
    :param username: A user with read access (the simple auth manager's ``viewer`` role, say).
    :param password: Its password; never logged.
    """

    def __init__(self, base_url: str, username: str, password: str, *, page_size: int = 100,
                 timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self._password = password
        self.page_size = page_size
        self.timeout = timeout
        self._session = requests.Session()
        self._token: str | None = None
        self.requests = 0

    def __repr__(self) -> str:
        return f"AirflowHistory({self.base_url!r}, user={self.username!r})"

    def _authenticate(self) -> None:
        try:
            resp = self._session.post(f"{self.base_url}/auth/token", json={"username": self.username,
                                                                          "password": self._password},
                                      timeout=self.timeout)
        except requests.RequestException as exc:
            raise HistoryUnavailable(f"Airflow API at {self.base_url}: cannot reach it: {exc}") from None
        if resp.status_code not in (200, 201):
            raise HistoryUnavailable(f"Airflow API at {self.base_url}: user {self.username!r} not authenticated "
                                     f"(HTTP {resp.status_code})")
        self._token = resp.json()["access_token"]

    def get(self, path: str, params: dict[str, Any] | None = None) -> dict:
        if self._token is None:
            self._authenticate()
        try:
            resp = self._session.get(f"{self.base_url}{path}", params=params, timeout=self.timeout,
                                     headers={"Authorization": f"Bearer {self._token}"})
        except requests.RequestException as exc:
            raise HistoryUnavailable(f"Airflow API at {self.base_url}: GET {path} failed: {exc}") from None
        self.requests += 1
        if resp.status_code != 200:
            raise HistoryUnavailable(f"Airflow API at {self.base_url}: GET {path} answered HTTP {resp.status_code}: "
                                     f"{resp.text[:200]}")
        return resp.json()

    def paginate(self, path: str, key: str, params: dict[str, Any] | None = None) -> list[dict]:
        """Every item of a list endpoint, page by page (``limit``/``offset``, up to ``total_entries``)."""
        items: list[dict] = []
        offset = 0
        while True:
            page = self.get(path, {**(params or {}), "limit": self.page_size, "offset": offset})
            batch = page.get(key) or []
            items.extend(batch)
            offset += len(batch)
            if not batch or offset >= int(page.get("total_entries", offset)):
                return items

    @staticmethod
    def _ours(dag_id: str | None) -> bool:
        return bool(dag_id) and dag_id.startswith(DAG_PREFIXES)

    def dag_runs(self, start: datetime, end: datetime) -> list[dict]:
        """Runs of this package's DAGs whose ``run_after`` falls in [start, end)."""
        runs = self.paginate("/api/v2/dags/~/dagRuns", "dag_runs",
                             {"run_after_gte": start.isoformat(), "run_after_lt": end.isoformat(),
                              "order_by": "run_after"})
        return [r for r in runs if self._ours(r.get("dag_id"))]

    def task_instances(self, start: datetime, end: datetime) -> list[dict]:
        tis = self.paginate("/api/v2/dags/~/dagRuns/~/taskInstances", "task_instances",
                            {"run_after_gte": start.isoformat(), "run_after_lt": end.isoformat()})
        return [t for t in tis if self._ours(t.get("dag_id"))]

    def event_log(self, start: datetime, end: datetime) -> list[dict]:
        """The audit log of actions on this package's DAGs: triggers, approvals, clears, pauses."""
        logs = self.paginate("/api/v2/eventLogs", "event_logs",
                             {"after": start.isoformat(), "before": end.isoformat(), "order_by": "when"})
        return [e for e in logs if self._ours(e.get("dag_id"))]
