"""One key class at run time: its config, its KMS backend and the ledger, and the datasets it
protects as stores, encryption and engines. Backends come in from the caller (the Airflow hooks,
a script or a test), so nothing here knows where credentials live."""

from __future__ import annotations

from dataclasses import dataclass

from keyrotation.backends.base import KmsBackend
from keyrotation.census import Census, take_census
from keyrotation.config import Dataset, KeyClassConfig
from keyrotation.engine import Checkpoint, ReencryptionEngine
from keyrotation.formats.parquet_pme import ParquetEncryption
from keyrotation.ledger import Ledger, RunContext
from keyrotation.retirement import RetirementPlan, plan_retirement
from keyrotation.stores.partitions import PartitionStore


@dataclass
class KeyClassRuntime:
    config: KeyClassConfig
    backend: KmsBackend
    ledger: Ledger

    @property
    def name(self) -> str:
        return self.config.key_class.name

    def store(self, dataset: str | Dataset) -> PartitionStore:
        ds = dataset if isinstance(dataset, Dataset) else self.config.dataset(dataset)
        return PartitionStore(ds.location, ds.partitioning)

    def pme(self, dataset: str | Dataset) -> ParquetEncryption:
        ds = dataset if isinstance(dataset, Dataset) else self.config.dataset(dataset)
        return ParquetEncryption(self.backend, ds.encrypted_columns)

    def engine(self, dataset: str, ctx: RunContext | None = None,
               checkpoint: Checkpoint | None = None) -> ReencryptionEngine:
        return ReencryptionEngine(self.name, dataset, self.store(dataset), self.pme(dataset), self.ledger, ctx,
                                  checkpoint)

    def census(self, dataset: str, partitions: list[str] | None = None) -> Census:
        return take_census(dataset, self.store(dataset), self.pme(dataset), partitions)

    def censuses(self) -> list[Census]:
        return [self.census(ds.name) for ds in self.config.datasets]

    def retirement_plan(self) -> RetirementPlan | None:
        """The versions due for retirement now, counted back from the ledger's reference."""
        return plan_retirement(self.config.key_class, self.backend.key_state(), self.ledger.current_version(self.name))

    def target_version(self) -> int:
        """The version data must be brought under: the ledger's reference, else the KMS's latest."""
        version = self.ledger.current_version(self.name)
        return version if version is not None else self.backend.key_state().latest_version
