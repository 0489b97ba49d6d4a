"""The hook that reaches Airflow's own REST API, read-only, for the compliance report's run history."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from keyrotation.reports import AirflowHistory


class AirflowApiHook(BaseHook):
    """
    Reads Airflow's run history (DAG runs, task instances, event log) through ``/api/v2``.

    The connection (``http`` type) holds the API server's URL (host with scheme, and port) and a
    read-only user's login and password; the token comes from ``/auth/token``. Tasks cannot read the
    metadata database in Airflow 3, so this is how a task learns what ran and who triggered it.

    :param api_conn_id: The connection to the API server.
    """

    conn_name_attr = "api_conn_id"
    default_conn_name = "keyrotation_airflow_api"
    conn_type = "http"
    hook_name = "Airflow REST API (key rotation reports)"

    def __init__(self, api_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.api_conn_id = api_conn_id

    def get_conn(self) -> AirflowHistory:
        conn = self.get_connection(self.api_conn_id)
        host = conn.host or "localhost"
        if "://" not in host:
            host = f"{conn.schema or 'http'}://{host}"
        url = f"{host}:{conn.port}" if conn.port else host
        return AirflowHistory(url, conn.login or "", conn.password or "")
