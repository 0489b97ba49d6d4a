"""Censuses of unchanged partitions, kept for the plan and the key inventory page (not for the gate).

A partition's census depends only on what its folder holds, the versions the KMS has and what the engine did
to it; :func:`keyrotation.census.take_census` keys each census it takes by a fingerprint of exactly those
(each file's name, size and modification time from one listing of the dataset, the KMS's versions, and the
id of the ledger's last row for the partition) and keeps it here, in a table next to the ledger. A census
that may reuse them (``reuse``) reads only the partitions whose fingerprint changed: one listing and one
query instead of three reads per partition. The engine's own changes always show as a new ledger row, so a
store whose modification times are coarse (S3: seconds) cannot hide them. The retirement gate, the census
after a sweep and every engine step take fresh censuses: the cache only decides where a plan looks first,
and a fresh census refreshes it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from datetime import UTC, datetime

import sqlalchemy as sa

from keyrotation.census import PartitionCensus, UnmanagedFile
from keyrotation.ledger import Ledger, metadata

log = logging.getLogger(__name__)

cached_censuses = sa.Table(
    "census_cache",
    metadata,
    sa.Column("dataset", sa.String(128), primary_key=True),
    sa.Column("partition", sa.String(256), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("census", sa.Text, nullable=False),
    sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
)
_CHUNK = 500  # rows per statement, within SQLite's and PostgreSQL's parameter limits


def _encode(census: PartitionCensus) -> str:
    data = asdict(census)
    data["versions"] = sorted(census.versions)
    data["encrypted_columns"] = sorted(census.encrypted_columns) if census.encrypted_columns is not None else None
    data["unmanaged"] = [{**asdict(f), "versions": sorted(f.versions)} for f in census.unmanaged]
    data["leftovers"] = list(census.leftovers)
    return json.dumps(data, sort_keys=True)


def _decode(text: str) -> PartitionCensus:
    data = json.loads(text)
    data["versions"] = frozenset(data["versions"])
    if data["encrypted_columns"] is not None:
        data["encrypted_columns"] = frozenset(data["encrypted_columns"])
    data["unmanaged"] = tuple(UnmanagedFile(**{**f, "versions": frozenset(f["versions"])}) for f in data["unmanaged"])
    data["leftovers"] = tuple(data["leftovers"])
    return PartitionCensus(**data)


class CensusCache:
    """The kept censuses of one ledger's datasets, by partition and fingerprint."""

    def __init__(self, ledger: Ledger) -> None:
        self.db = ledger.db
        cached_censuses.create(self.db, checkfirst=True)

    def lookup(self, dataset: str, fingerprints: dict[str, str]) -> dict[str, PartitionCensus]:
        """The kept census of each partition whose fingerprint is still the one given."""
        found: dict[str, PartitionCensus] = {}
        if not fingerprints:
            return found
        with self.db.connect() as conn:
            rows = conn.execute(sa.select(cached_censuses.c.partition, cached_censuses.c.fingerprint,
                                          cached_censuses.c.census).where(cached_censuses.c.dataset == dataset))
            for partition, fingerprint, text in rows:
                if fingerprints.get(partition) == fingerprint:
                    found[partition] = _decode(text)
        return found

    def keep(self, dataset: str, taken: dict[str, tuple[str, PartitionCensus]]) -> None:
        """Keep each ``partition: (fingerprint, census)`` of ``taken`` (replacing what was kept for it). A
        ledger database that refuses the write costs the next census its reuse, nothing else."""
        if not taken:
            return
        now = datetime.now(UTC)
        names = list(taken)
        try:
            with self.db.begin() as conn:
                for start in range(0, len(names), _CHUNK):
                    part = names[start : start + _CHUNK]
                    conn.execute(cached_censuses.delete().where(cached_censuses.c.dataset == dataset,
                                                                cached_censuses.c.partition.in_(part)))
                    conn.execute(cached_censuses.insert(), [
                        {"dataset": dataset, "partition": p, "fingerprint": taken[p][0],
                         "census": _encode(taken[p][1]), "taken_at": now} for p in part])
        except sa.exc.SQLAlchemyError as exc:
            log.warning("%s: could not keep %d partition censuses for reuse (%s); the next census reads them "
                        "again", dataset, len(taken), type(exc).__name__)

    def forget(self, dataset: str, partitions: list[str]) -> None:
        """Drop what is kept for ``partitions`` (blocking now: never reused)."""
        if not partitions:
            return
        try:
            with self.db.begin() as conn:
                for start in range(0, len(partitions), _CHUNK):
                    conn.execute(cached_censuses.delete().where(
                        cached_censuses.c.dataset == dataset,
                        cached_censuses.c.partition.in_(partitions[start : start + _CHUNK])))
        except sa.exc.SQLAlchemyError as exc:
            log.warning("%s: could not drop %d kept partition censuses (%s)", dataset, len(partitions),
                        type(exc).__name__)
