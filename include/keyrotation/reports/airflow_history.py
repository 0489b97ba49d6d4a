"""Airflow's run history through its REST API (``/api/v2``), for the compliance report.

In Airflow 3 tasks cannot read the metadata database, so the report asks the API server, as a
read-only user (the ``viewer`` role is enough): DAG runs and who triggered them, task instances
(failures and retries), and the event log of actions taken in the UI (triggers, approvals).
Every list is paginated; nothing here writes.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import requests

from keyrotation.errors import KeyRotationError

log = logging.getLogger(__name__)
#: DAGs of this package: the report reads only their history.
DAG_PREFIXES = ("rotate__", "reencrypt__", "retire__", "compliance_report")


def _when(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def ran_during(item: dict, start: datetime, end: datetime) -> bool:
    """Whether a run or task instance (as the API returns it) ran at some time in [start, end): it
    started before ``end`` and ended at or after ``start``, or has not ended. Not started: no."""
    began, ended = _when(item.get("start_date")), _when(item.get("end_date"))
    return began is not None and began < end and (ended is None or ended >= start)


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
        """Runs of this package's DAGs that ran during [start, end): started before ``end`` and ended at
        or after ``start`` (or still running). Selected by when they ran, not by ``run_after``, which
        for a backfill lies in the past it covers."""
        runs = self.paginate("/api/v2/dags/~/dagRuns", "dag_runs",
                             {"start_date_lt": end.isoformat(), "end_date_gte": start.isoformat(),
                              "order_by": "id"})
        return [r for r in runs if self._ours(r.get("dag_id")) and ran_during(r, start, end)]

    def task_instances(self, start: datetime, end: datetime) -> list[dict]:
        """Task instances of this package's DAGs that ran during [start, end), as for :meth:`dag_runs`."""
        tis = self.paginate("/api/v2/dags/~/dagRuns/~/taskInstances", "task_instances",
                            {"start_date_lt": end.isoformat(), "end_date_gte": start.isoformat()})
        return [t for t in tis if self._ours(t.get("dag_id")) and ran_during(t, start, end)]

    def event_log(self, start: datetime, end: datetime) -> list[dict]:
        """The audit log of actions on this package's DAGs: triggers, approvals, clears, pauses."""
        logs = self.paginate("/api/v2/eventLogs", "event_logs",
                             {"after": start.isoformat(), "before": end.isoformat(), "order_by": "when"})
        return [e for e in logs if self._ours(e.get("dag_id"))]
