"""One Celery worker "host" on this machine, for tests/celery_airflow.py.

Two things a container gives a worker that two processes on one machine do not have:

* its own host name: Airflow records ``[core] hostname_callable`` on each task instance, so
  :func:`worker_hostname` answers ``$KEYROTATION_WORKER_HOSTNAME`` (set per worker) and the REST API
  shows which worker ran what;
* an init process that reaps orphans (dumb-init in the Airflow image): run as a script,
  ``python worker_host.py COMMAND...`` starts COMMAND in a session of its own, becomes the child
  subreaper, reaps every process orphaned under it and exits with COMMAND's code. Killing the
  worker's process groups then leaves no zombie whose pid still looks alive (a partition lease is
  freed as soon as its holder's pid is gone).

Light on imports: Airflow imports :func:`worker_hostname` in every task process of the worker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def worker_hostname() -> str:
    return os.environ.get("KEYROTATION_WORKER_HOSTNAME") or socket.getfqdn()


def _become_subreaper() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap(command: list[str]) -> int:
    _become_subreaper()
    child = subprocess.Popen(command, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    code = None
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:  # nothing left to reap
            break
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            child.returncode = code
    return code if code is not None and code >= 0 else 128 - (code or 0)


if __name__ == "__main__":
    sys.exit(reap(sys.argv[1:]))
