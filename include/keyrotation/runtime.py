"""One key class at run time: its config, its KMS backend and the ledger, and the datasets it
protects as stores, encryption and engines. Backends come in from the caller (the Airflow hooks,
a script or a test), so nothing here knows where credentials live."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa

from keyrotation.backends.base import KmsBackend
from keyrotation.census import Census, take_census
from keyrotation.config import Dataset, KeyClassConfig
from keyrotation.engine import Checkpoint, ReencryptionEngine
from keyrotation.formats.parquet_pme import ParquetEncryption
from keyrotation.ledger import Ledger, RunContext
from keyrotation.proof import proof_gaps
from keyrotation.retirement import RetirementPlan, plan_retirement
from keyrotation.stores.filesystems import Storage
from keyrotation.stores.partitions import PartitionStore

if TYPE_CHECKING:
    from keyrotation.object_engine import ObjectReencryptionEngine
    from keyrotation.sql_engine import SqlTableEngine


def _local_storage(_dataset: Dataset) -> Storage:
    return Storage()


@dataclass
class KeyClassRuntime:
    config: KeyClassConfig
    backend: KmsBackend
    ledger: Ledger
    #: The storage (credentials) of a dataset; the default reaches local paths and public URIs only.
    storage: Callable[[Dataset], Storage] = field(default=_local_storage)
    _sql_engines: dict[str, sa.Engine] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.config.key_class.name

    def store(self, dataset: str | Dataset) -> PartitionStore:
        ds = dataset if isinstance(dataset, Dataset) else self.config.dataset(dataset)
        return PartitionStore(ds.location, ds.partitioning, self.storage(ds))

    def pme(self, dataset: str | Dataset) -> ParquetEncryption:
        ds = dataset if isinstance(dataset, Dataset) else self.config.dataset(dataset)
        return ParquetEncryption(self.backend, ds.encrypted_columns)

    def sql_engine(self, ds: Dataset) -> sa.Engine:
        """One SQLAlchemy engine per sql_table dataset, from the connection's URL or the location."""
        if ds.name not in self._sql_engines:
            url = self.storage(ds).sql_url or ds.location
            self._sql_engines[ds.name] = sa.create_engine(url, pool_pre_ping=True)
        return self._sql_engines[ds.name]

    def engine(self, dataset: str, ctx: RunContext | None = None, checkpoint: Checkpoint | None = None
               ) -> ReencryptionEngine | ObjectReencryptionEngine | SqlTableEngine:
        """The engine of ``dataset``'s format: Parquet partitions (PME), SSE-KMS objects in S3, CMEK objects in
        GCS, or a SQL table."""
        ds = self.config.dataset(dataset)
        if ds.format == "sql_table":
            from keyrotation.sql_engine import SqlTableEngine

            return SqlTableEngine(self.name, ds, self.sql_engine(ds), self.backend, self.ledger, ctx)
        if ds.format == "sse_kms_objects":
            from keyrotation.object_engine import ObjectReencryptionEngine
            from keyrotation.stores.s3_objects import SseKmsObjectStore

            store = SseKmsObjectStore(self.storage(ds).s3_client(ds.location), ds.location, ds.partitioning)
            return ObjectReencryptionEngine(self.name, dataset, store, self.backend, self.ledger, ctx)
        if ds.format == "gcs_cmek_objects":
            from keyrotation.object_engine import ObjectReencryptionEngine
            from keyrotation.stores.gcs_objects import CmekObjectStore

            store = CmekObjectStore(self.storage(ds).gcs_client(ds.location), ds.location, ds.partitioning)
            return ObjectReencryptionEngine(self.name, dataset, store, self.backend, self.ledger, ctx)
        return ReencryptionEngine(self.name, dataset, self.store(dataset), self.pme(dataset), self.ledger, ctx,
                                  checkpoint, batch_rows=self.config.key_class.reencryption.batch_rows)

    def partitions(self, dataset: str) -> list[str]:
        engine = self.engine(dataset)
        return engine.store.list_partitions()

    def census(self, dataset: str, partitions: list[str] | None = None) -> Census:
        if self.config.dataset(dataset).format in ("sse_kms_objects", "gcs_cmek_objects", "sql_table"):
            return self.engine(dataset).census(partitions)
        return take_census(dataset, self.store(dataset), self.pme(dataset), partitions)

    def censuses(self) -> list[Census]:
        return [self.census(ds.name) for ds in self.config.datasets]

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
