"""Airflow's log server on loopback only, for ``make up`` (one machine).

Airflow 3.3.2 binds the worker log server (``airflow scheduler`` with a local executor) and the
triggerer's to every interface (``serve_logs`` passes ``host=""`` to uvicorn; there is no option for the
host, only ``[logging] worker_log_server_port`` and ``trigger_log_server_port``). ``make up`` starts
the scheduler and the triggerer with ``--skip-serve-logs`` and runs the same app here instead, on
127.0.0.1 and both ports, with ``[core] hostname_callable`` set to :func:`hostname`, so that the API
server asks 127.0.0.1 for the logs of a running or deferred task.

``python -m keyrotation_airflow.loopback serve-logs PORT [PORT ...]``
"""

from __future__ import annotations

import socket
import sys

LOOPBACK = "127.0.0.1"


def hostname() -> str:
    """``[core] hostname_callable`` for a deployment on one machine whose log server listens on loopback."""
    return LOOPBACK


def serve_logs(ports: list[int]) -> None:
    """Serve the task and trigger log files (Airflow's own log server app) on 127.0.0.1 at ``ports``."""
    import uvicorn
    from airflow.configuration import conf

    sockets = []
    for port in sorted(set(ports)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sockets.append(sock)
    config = uvicorn.Config("airflow.utils.serve_logs.log_server:get_app", factory=True, log_config=None,
                            access_log=False,
                            log_level=conf.get("logging", "uvicorn_logging_level", fallback="info").lower())
    uvicorn.Server(config).run(sockets=sockets)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "serve-logs" or not all(a.isdigit() for a in argv[1:]):
        print("usage: python -m keyrotation_airflow.loopback serve-logs PORT [PORT ...]", file=sys.stderr)
        return 2
    serve_logs([int(a) for a in argv[1:]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
