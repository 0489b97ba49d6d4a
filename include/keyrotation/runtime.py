"""One key class at run time: its config, its KMS backend and the ledger, and the datasets it
protects as stores, encryption and engines. Backends come in from the caller (the Airflow hooks,
a script or a test), so nothing here knows where credentials live."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from keyrotation.backends.base import KmsBackend
from keyrotation.census import Census, take_census
from keyrotation.census_cache import CensusCache
from keyrotation.config import Dataset, KeyClassConfig
from keyrotation.formats.parquet_pme import ParquetEncryption
from keyrotation.ledger import Ledger, RunContext
from keyrotation.parquet_engine import Checkpoint, ParquetEngine
from keyrotation.partition_engine import PartitionEngine
from keyrotation.proof import proof_gaps
from keyrotation.retirement import RetirementPlan, plan_retirement
from keyrotation.stores.filesystems import Storage
from keyrotation.stores.partitions import PartitionStore


def _local_storage(_dataset: Dataset) -> Storage:
    return Storage()


# The engines of the formats a dataset may have. The object and SQL engines import their clients
# (boto3, google-cloud-storage, psycopg2) only when a dataset of theirs is used.
def _parquet_engine(rt: KeyClassRuntime, ds: Dataset, ctx: RunContext | None,
                    checkpoint: Checkpoint | None) -> PartitionEngine:
    return ParquetEngine(rt.name, ds.name, rt.store(ds), rt.pme(ds), rt.ledger, ctx, checkpoint,
                              batch_rows=rt.config.key_class.reencryption.batch_rows)


def _sse_kms_objects_engine(rt: KeyClassRuntime, ds: Dataset, ctx: RunContext | None,
                            _checkpoint: Checkpoint | None) -> PartitionEngine:
    from keyrotation.object_engine import ObjectEngine
    from keyrotation.stores.s3_objects import SseKmsObjectStore

    store = SseKmsObjectStore(rt.storage(ds).s3_client(ds.location), ds.location, ds.partitioning)
    return ObjectEngine(rt.name, ds.name, store, rt.backend, rt.ledger, ctx)


def _gcs_cmek_objects_engine(rt: KeyClassRuntime, ds: Dataset, ctx: RunContext | None,
                             _checkpoint: Checkpoint | None) -> PartitionEngine:
    from keyrotation.object_engine import ObjectEngine
    from keyrotation.stores.gcs_objects import CmekObjectStore

    store = CmekObjectStore(rt.storage(ds).gcs_client(ds.location), ds.location, ds.partitioning)
    return ObjectEngine(rt.name, ds.name, store, rt.backend, rt.ledger, ctx)


def _sql_table_engine(rt: KeyClassRuntime, ds: Dataset, ctx: RunContext | None,
                      _checkpoint: Checkpoint | None) -> PartitionEngine:
    from keyrotation.sql_engine import SqlTableEngine
    from keyrotation.stores.sql_table import SqlTableStore

    return SqlTableEngine(rt.name, ds.name, SqlTableStore(rt.sql_db(ds), ds), rt.backend, rt.ledger, ctx)


EngineFactory = Callable[["KeyClassRuntime", Dataset, RunContext | None, Checkpoint | None], PartitionEngine]
#: The engine of each dataset format (:attr:`Dataset.format`).
ENGINES: dict[str, EngineFactory] = {
    "parquet": _parquet_engine,
    "sse_kms_objects": _sse_kms_objects_engine,
    "gcs_cmek_objects": _gcs_cmek_objects_engine,
    "sql_table": _sql_table_engine,
}


@dataclass
class KeyClassRuntime:
    config: KeyClassConfig
    backend: KmsBackend
    ledger: Ledger
    #: The storage (credentials) of a dataset; the default reaches local paths and public URIs only.
    storage: Callable[[Dataset], Storage] = field(default=_local_storage)
    _sql_dbs: dict[str, sa.Engine] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.config.key_class.name

    def store(self, dataset: str | Dataset) -> PartitionStore:
        ds = dataset if isinstance(dataset, Dataset) else self.config.dataset(dataset)
        return PartitionStore(ds.location, ds.partitioning, self.storage(ds))

    def pme(self, dataset: str | Dataset) -> ParquetEncryption:
        ds = dataset if isinstance(dataset, Dataset) else self.config.dataset(dataset)
        return ParquetEncryption(self.backend, ds.encrypted_columns)

    def sql_db(self, ds: Dataset) -> sa.Engine:
        """One SQLAlchemy engine per sql_table dataset, from the connection's URL or the location."""
        if ds.name not in self._sql_dbs:
            url = self.storage(ds).sql_url or ds.location
            self._sql_dbs[ds.name] = sa.create_engine(url, pool_pre_ping=True)
        return self._sql_dbs[ds.name]

    def engine(self, dataset: str, ctx: RunContext | None = None, checkpoint: Checkpoint | None = None
               ) -> PartitionEngine:
        """The engine of ``dataset``'s format (:data:`ENGINES`); ``checkpoint`` reaches the Parquet engine's
        commit steps (the tests' crash points)."""
        ds = self.config.dataset(dataset)
        return ENGINES[ds.format](self, ds, ctx, checkpoint)

    def partitions(self, dataset: str) -> list[str]:
        return self.engine(dataset).list_partitions()

    def census(self, dataset: str, partitions: list[str] | None = None, reuse: bool = False) -> Census:
        """The census of ``dataset`` (of ``partitions``, else every partition); ``reuse``: censuses of unchanged
        partitions kept from an earlier census (for plans and pages; see :mod:`keyrotation.census_cache`)."""
        return take_census(self.engine(dataset), partitions, CensusCache(self.ledger), reuse)

    def censuses(self, reuse: bool = False) -> list[Census]:
        return [self.census(ds.name, reuse=reuse) for ds in self.config.datasets]

    def evidence(self, censuses: list[Census]) -> dict[str, dict[str, dict]]:
        """What the ledger proves of each census's partitions (:meth:`Ledger.partition_evidence`), by dataset."""
        return {c.dataset: self.ledger.partition_evidence(c.dataset) for c in censuses}

    def unfinished(self, census: Census, target_version: int) -> dict[str, str]:
        """Partitions a run must visit although their keys may be under ``target_version`` already, with why:
        not proven by a validation since their last change (a crash after the commit, a validation that
        failed or never ran), or holding what an interrupted run left (staging names, an earlier generation)."""
        out = proof_gaps(census, self.ledger.partition_evidence(census.dataset), target_version)
        for name, partition in census.partitions.items():
            if partition.leftovers:
                out.setdefault(name, "an interrupted run left " + ", ".join(partition.leftovers))
            stray = {f.name for f in partition.unmanaged if f.kind != "other"}
            if stray and stray & self.ledger.partition_files(census.dataset, name):
                out.setdefault(name, "an earlier generation is still on disk")
        return dict(sorted(out.items()))

    def retirement_plan(self) -> RetirementPlan | None:
        """The versions due for retirement now, counted back from the ledger's reference."""
        return plan_retirement(self.config.key_class, self.backend.key_state(), self.ledger.current_version(self.name))

    def current_for(self) -> timedelta:
        """How long the ledger's reference has been current (zero when there is none)."""
        reference = self.ledger.current_reference(self.name)
        if reference is None:
            return timedelta(0)
        return datetime.now(UTC) - reference["recorded_at"]

    def target_version(self) -> int:
        """The version data must be brought under: the ledger's reference, else the KMS's latest."""
        version = self.ledger.current_version(self.name)
        return version if version is not None else self.backend.key_state().latest_version
