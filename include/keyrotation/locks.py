"""Per-partition leases, so two runs never change the same partition at once.

A scheduled run, a backfill and a sweep may reach the same partition together. Each change takes a
lease first: a row in ``partition_leases`` (next to the ledger, in the same database, so every
worker sees it). A lease ends when released, when it expires, or, on the same host, when the
process that holds it is gone (a task killed with SIGKILL and re-run there need not wait).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from keyrotation.errors import PartitionError
from keyrotation.ledger import Ledger, metadata

leases = sa.Table(
    "partition_leases",
    metadata,
    sa.Column("dataset", sa.String(128), primary_key=True),
    sa.Column("partition", sa.String(256), primary_key=True),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)


class PartitionLocked(PartitionError):
    """Another run holds the partition's lease."""


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _holder_is_gone(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _live(row: sa.Row, now: datetime) -> bool:
    """Whether a lease row still holds: not expired, and its holder (on this host) still running."""
    return _aware(row.expires_at) > now and not _holder_is_gone(row.owner)


class PartitionLeases:
    def __init__(self, ledger: Ledger, ttl: timedelta = timedelta(minutes=30)) -> None:
        self.db = ledger.db
        self.ttl = ttl
        leases.create(self.db, checkfirst=True)

    def _try_acquire(self, dataset: str, partition: str, owner: str) -> str | None:
        """Take the lease; return None on success, else the current holder."""
        now = datetime.now(UTC)
        with self.db.begin() as conn:
            row = conn.execute(sa.select(leases).where(leases.c.dataset == dataset,
                                                       leases.c.partition == partition)).first()
            if row is not None:
                if _live(row, now):
                    return f"{row.owner} until {_aware(row.expires_at).isoformat(timespec='seconds')}"
                conn.execute(leases.delete().where(leases.c.dataset == dataset, leases.c.partition == partition,
                                                   leases.c.owner == row.owner))
            try:
                conn.execute(leases.insert().values(dataset=dataset, partition=partition, owner=owner,
                                                    expires_at=now + self.ttl))
            except sa.exc.IntegrityError:
                return "another run (taken just now)"
        return None

    @contextmanager
    def hold(self, dataset: str, partition: str, wait: float = 600.0, poll: float = 0.5) -> Iterator[str]:
        """Hold the partition's lease for the ``with`` block, waiting up to ``wait`` seconds for it."""
        owner = _owner()
        deadline = time.monotonic() + wait
        while (holder := self._try_acquire(dataset, partition, owner)) is not None:
            if time.monotonic() >= deadline:
                raise PartitionLocked(partition, f"is being changed by {holder}; waited {wait:.0f}s")
            time.sleep(poll)
        try:
            yield owner
        finally:
            with self.db.begin() as conn:
                conn.execute(leases.delete().where(leases.c.dataset == dataset, leases.c.partition == partition,
                                                   leases.c.owner == owner))

    @contextmanager
    def hold_many(self, dataset: str, partitions: list[str]) -> Iterator[list[str]]:
        """Take the leases of ``partitions`` in one transaction and hold them for the ``with`` block; yields
        the partitions taken, in order: one another run holds is left out (not waited for) for the caller to
        take with :meth:`hold`. Released in one transaction."""
        owner = _owner()
        wanted = list(dict.fromkeys(partitions))
        try:
            taken = self._acquire_many(dataset, wanted, owner)
        except sa.exc.IntegrityError:  # another run took one of them between our read and our insert
            taken = [p for p in wanted if self._try_acquire(dataset, p, owner) is None]
        try:
            yield taken
        finally:
            if taken:
                with self.db.begin() as conn:
                    conn.execute(leases.delete().where(leases.c.dataset == dataset, leases.c.owner == owner))

    def _acquire_many(self, dataset: str, wanted: list[str], owner: str) -> list[str]:
        """Take the free leases of ``wanted`` in one transaction; the partitions taken, in order."""
        now = datetime.now(UTC)
        taken: list[str] = []
        if wanted:
            with self.db.begin() as conn:
                held = {}
                for start in range(0, len(wanted), 500):  # within SQLite's and PostgreSQL's parameter limits
                    part = wanted[start : start + 500]
                    held.update({row.partition: row for row in conn.execute(sa.select(leases).where(
                        leases.c.dataset == dataset, leases.c.partition.in_(part)))})
                stale = []
                for partition in wanted:
                    row = held.get(partition)
                    if row is not None and _live(row, now):
                        continue
                    if row is not None:
                        stale.append(row)
                    taken.append(partition)
                for row in stale:
                    conn.execute(leases.delete().where(leases.c.dataset == dataset, leases.c.partition == row.partition,
                                                       leases.c.owner == row.owner))
                if taken:
                    conn.execute(leases.insert(), [{"dataset": dataset, "partition": p, "owner": owner,
                                                    "expires_at": now + self.ttl} for p in taken])
        return taken
