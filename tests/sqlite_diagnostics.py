"""What a SQLite ``disk I/O error`` met in a test process looked like, written to ``var/sqlite-io-errors.log``.

Two-worker runs (``TEST_WORKERS=2``) once failed four tests of one worker with that error on the worker's Airflow
metadata DB for about 40 s; it has not been seen in one process. The record keeps what the error itself does not
say: SQLite's extended code, the test and thread that met it, the database file and its folder as they were then,
and every file descriptor the process held (a descriptor closed under SQLite, or a file swapped under it, shows
there).
"""

from __future__ import annotations

import datetime
import os
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa

LOG = Path(__file__).resolve().parents[1] / "var" / "sqlite-io-errors.log"


def _descriptors() -> list[str]:
    lines = []
    for fd in sorted(os.listdir("/proc/self/fd"), key=int) if os.path.isdir("/proc/self/fd") else []:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            info = os.fstat(int(fd))
            lines.append(f"  fd {fd}: {target} (inode {info.st_ino})")
        except OSError as exc:
            lines.append(f"  fd {fd}: {exc.strerror}")
    return lines


def _database(url: Any) -> list[str]:
    path = Path(url.database) if url is not None and url.get_backend_name() == "sqlite" and url.database else None
    if path is None:
        return []
    lines = [f"database {path}"]
    try:
        lines.append(f"  inode {path.stat().st_ino}, {path.stat().st_size} bytes")
    except OSError as exc:
        lines.append(f"  stat: {exc.strerror}")
    try:
        lines += [f"  folder holds {name}" for name in sorted(os.listdir(path.parent))]
    except OSError as exc:
        lines.append(f"  folder: {exc.strerror}")
    return lines


def _record(context: Any) -> None:
    error = context.original_exception
    if "disk I/O error" not in str(error):
        return
    try:
        url = context.engine.url if context.engine is not None else None
        lines = [
            f"== {datetime.datetime.now(datetime.UTC).isoformat()} pid {os.getpid()} "
            f"worker {os.environ.get('PYTEST_XDIST_WORKER', '-')} thread {threading.current_thread().name}",
            f"test {os.environ.get('PYTEST_CURRENT_TEST', '-')}",
            f"error {type(error).__name__}: {error} (sqlite code {getattr(error, 'sqlite_errorcode', '?')}, "
            f"{getattr(error, 'sqlite_errorname', '?')})",
            f"statement {(context.statement or '')[:200]!r}",
            f"threads {sorted(t.name for t in threading.enumerate())}",
            *_database(url),
            "descriptors:",
            *_descriptors(),
        ]
        LOG.parent.mkdir(exist_ok=True)
        with LOG.open("a") as log:
            log.write("\n".join(lines) + "\n")
    except Exception as exc:  # noqa: BLE001 - the record must never replace the error it records
        try:
            with LOG.open("a") as log:
                log.write(f"== record failed: {type(exc).__name__}: {exc}\n")
        except OSError:
            pass


def install() -> None:
    """Every SQLAlchemy engine of this process records its ``disk I/O error``s (and raises them as before)."""
    if not sa.event.contains(sa.engine.Engine, "handle_error", _record):
        sa.event.listen(sa.engine.Engine, "handle_error", _record)
