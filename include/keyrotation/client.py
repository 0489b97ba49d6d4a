"""The client library applications use to read and write data protected by a key class, through rotations.

No Airflow here. A :class:`KeyRotationClient` is built from a KMS backend (or a key class config and an
``hvac``/``boto3`` client), the ledger (read only: the key class's current-version reference and its
retired versions) and, for single values, the SQLAlchemy engine of the database holding the data-key
table ``keyrotation_data_keys``::

    client = KeyRotationClient.from_key_class(load_key_class("customer_pii"), kms_client=hvac.Client(...),
                                              ledger="postgresql://...", db=sa.create_engine("postgresql://..."))
    blob = client.encrypt(b"a@example.com", {"table": "accounts", "column": "email", "pk": 42,
                                             "partition": "2026-11-28"})
    client.decrypt(blob, {"table": "accounts", "column": "email", "pk": 42})      # b"a@example.com"
    client.write_parquet(table, "/data/customers/dt=2026-11-28/part-0.parquet")
    client.read_parquet("/data/customers/dt=2026-11-28/part-0.parquet")

* **Same bytes as the DAGs.** Values are the field-level envelopes of :mod:`keyrotation.formats.envelope`
  (header, AES-256-GCM, the table, column and primary key as associated data) under the per-partition
  data keys of :class:`~keyrotation.stores.data_keys.DataKeyStore`, exactly as the ``sql_table`` path
  writes them; Parquet files are those of
  :class:`~keyrotation.formats.parquet_pme.ParquetEncryption` (PME, key material beside the file).
* **Rotations without a restart.** The ledger's reference (``reference_updated``) is polled every
  ``poll_interval_s`` seconds (and at once by :meth:`KeyRotationClient.refresh`); new values are then
  sealed with a data key created under the new version. Values written before decrypt as long as their
  data key's version is live: re-wrapping the data keys (the ``rewrap`` sweep) changes nothing here.
* **Retired versions.** A value whose data key is wrapped under a version below the last
  ``versions_retired`` floor of the ledger is refused (:class:`RetiredVersionError`, naming the version
  and the row) before any KMS call; so is encrypting while the reference itself is below it.
* **Data keys in memory.** Unwrapped data keys sit in a bounded LRU with a TTL (the one
  :class:`~keyrotation.formats.envelope.DataKeyCache` of the package),
  held as ``bytearray`` and overwritten with zeros when evicted, expired or cleared. This is best effort:
  the ``bytes`` the KMS client returns, and the copy the ``cryptography`` library keeps inside each
  AES-GCM object, cannot be zeroed from Python; they are dropped and left to the garbage collector. Keys
  never reach a log, an exception or a ``repr``.
* **Metrics**: requests, cache hits and misses, KMS calls by operation and errors by kind
  (:meth:`KeyRotationClient.metrics`), for the sidecar's ``/metrics`` or an application's own exporter.
"""

from __future__ import annotations

import logging
import numbers
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from keyrotation import ledger as lg
from keyrotation.backends.base import KmsBackend
from keyrotation.backends.retry import RetryPolicy
from keyrotation.errors import BackendError, KeyRotationError, KmsUnreachable, PermissionDenied
from keyrotation.formats.envelope import (
    CachedKey,
    DataKeyCache,
    EnvelopeError,
    Header,
    header_prefix,
    open_sealed,
    parse_header,
    seal,
)
from keyrotation.stores.data_keys import DATA_KEYS, DataKeyStore, RetiredDataKey

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

    from keyrotation.config import KeyClassConfig
    from keyrotation.ledger import Ledger

log = logging.getLogger(__name__)

#: Retries for an application's KMS calls: fail within about a second rather than hold a request for a
#: minute (the DAGs' default policy waits up to 31 s over 6 attempts).
APP_RETRY = RetryPolicy(attempts=3, initial=0.2, maximum=1.0, jitter=True)
MAX_NAME = 200  # keyrotation_data_keys.table_name
MAX_PARTITION = 100  # keyrotation_data_keys.partition


# -- errors ---------------------------------------------------------------------------------------

class ClientError(KeyRotationError):
    """Base class of the client's own errors. Messages never carry plaintext or key material."""


class InvalidInput(ClientError, ValueError):
    """A request is malformed: missing or bad context, wrong type, empty value."""


class RetiredVersionError(ClientError):
    """The value (or the encryption) would use a key version the ledger or the KMS has retired."""

    def __init__(self, message: str, version: int, min_version: int) -> None:
        super().__init__(message)
        self.version = version
        self.min_version = min_version


class KmsUnavailable(ClientError):
    """The KMS could not be reached (after retries)."""


class LedgerUnavailable(ClientError):
    """The ledger could not be read and no earlier answer is known."""


class NoCurrentVersion(ClientError):
    """The ledger holds no current-version reference for the key class yet."""


# -- context of a value ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ValueContext:
    """Where a value lives: bound into its associated data (table, column, primary key) and, for
    encryption, the partition whose data key seals it (e.g. the row's date, ``2026-11-28``)."""

    table: str
    column: str
    pk: Any
    partition: str | None = None

    @property
    def where(self) -> str:
        return f"{self.table}.{self.column} row {self.pk}"

    @classmethod
    def of(cls, context: ValueContext | Mapping[str, Any], *, for_encrypt: bool = False) -> ValueContext:
        """Validate a context given as a ``ValueContext`` or a mapping with table, column, pk (and partition)."""
        if isinstance(context, ValueContext):
            table, column, pk, partition = context.table, context.column, context.pk, context.partition
        elif isinstance(context, Mapping):
            unknown = sorted(set(context) - {"table", "column", "pk", "partition"})
            if unknown:
                raise InvalidInput(f"context: unknown field(s) {', '.join(map(str, unknown))} "
                                   "(expected table, column, pk, partition)")
            table, column, pk, partition = (context.get(k) for k in ("table", "column", "pk", "partition"))
        else:
            raise InvalidInput(f"context must be a ValueContext or a mapping, not {type(context).__name__}")
        for name, value in (("table", table), ("column", column)):
            if not isinstance(value, str) or not value:
                raise InvalidInput(f"context.{name} is required (a non-empty string)")
            if len(value) > MAX_NAME or "\x00" in value:
                raise InvalidInput(f"context.{name} must be at most {MAX_NAME} characters, without NUL")
        if pk is None or isinstance(pk, bool) or not isinstance(pk, numbers.Integral | str | uuid.UUID):
            raise InvalidInput("context.pk is required (an integer, a string or a UUID)")
        if isinstance(pk, numbers.Integral) and not isinstance(pk, int):
            pk = int(pk)  # numpy / pandas integers: the same associated data as a Python int
        if isinstance(pk, str) and (not pk or "\x00" in pk or len(pk) > 1000):
            raise InvalidInput("context.pk must be a non-empty string of at most 1000 characters, without NUL")
        if partition is not None and (not isinstance(partition, str) or not partition
                                      or len(partition) > MAX_PARTITION):
            raise InvalidInput(f"context.partition must be a non-empty string of at most {MAX_PARTITION} characters")
        if for_encrypt and partition is None:
            raise InvalidInput("context.partition is required to encrypt (it selects the data key, e.g. the row's "
                               "date)")
        return cls(table, column, pk, partition)


# -- metrics --------------------------------------------------------------------------------------

class ClientMetrics:
    """Thread-safe counters. Names and labels only: never a value, a key or a context."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.kms_calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.cache_hits = 0
        self.cache_misses = 0
        self.cache_evictions = 0
        self.rotations_noticed = 0
        self.ledger_polls = 0

    def add(self, field: str, label: str | None = None, n: int = 1) -> None:
        with self._lock:
            if label is None:
                setattr(self, field, getattr(self, field) + n)
            else:
                getattr(self, field)[label] += n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.requests), "requests_total": sum(self.requests.values()),
                "cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
                "cache_evictions": self.cache_evictions,
                "kms_calls": dict(self.kms_calls), "kms_calls_total": sum(self.kms_calls.values()),
                "errors": dict(self.errors), "errors_total": sum(self.errors.values()),
                "rotations_noticed": self.rotations_noticed, "ledger_polls": self.ledger_polls,
            }


def error_kind(exc: BaseException) -> str:
    """A short, stable label for an error (metrics, the sidecar's JSON ``error`` field)."""
    if isinstance(exc, RetiredVersionError):
        return "retired_version"
    if isinstance(exc, InvalidInput):
        return "bad_input"
    if isinstance(exc, EnvelopeError):
        return "unknown_data_key" if "not in " + DATA_KEYS in str(exc) else "does_not_decrypt"
    if isinstance(exc, KmsUnavailable):
        return "kms_unavailable"
    if isinstance(exc, PermissionDenied):
        return "kms_denied"
    if isinstance(exc, BackendError):
        return "kms_error"
    if isinstance(exc, LedgerUnavailable):
        return "ledger_unavailable"
    if isinstance(exc, NoCurrentVersion):
        return "no_current_version"
    if isinstance(exc, sa.exc.SQLAlchemyError):
        return "database_unavailable"
    return "internal"


# -- the KMS, counted -----------------------------------------------------------------------------

class _CountingBackend:
    """The backend with every KMS call counted (a retried call counts once) and ``KMS unreachable``
    failures raised as :class:`KmsUnavailable`. Everything else is passed through."""

    _CALLS = ("wrap", "unwrap", "rewrap", "key_state")

    def __init__(self, backend: KmsBackend, metrics: ClientMetrics) -> None:
        self._backend = backend
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._backend, name)
        if name not in self._CALLS:
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            self._metrics.add("kms_calls", name)
            try:
                return value(*args, **kwargs)
            except BackendError as exc:
                if isinstance(exc, KmsUnreachable) and not isinstance(exc, KmsUnavailable):
                    raise KmsUnavailable(str(exc)) from None
                raise

        return call

    def __repr__(self) -> str:
        return f"counted {self._backend.kind} backend for {self._backend.key_ref!r}"


# -- the ledger, read only ------------------------------------------------------------------------

@dataclass(frozen=True)
class LedgerState:
    """What the ledger says about the key class: the version to encrypt under and the lowest live one."""

    version: int | None
    min_version: int  # versions below it are retired (0: none retired)
    checked_at: float


class _LedgerView:
    """Reads the two facts the client needs from ``ledger_events``; needs SELECT only (no DDL, unlike
    :class:`~keyrotation.ledger.Ledger`, which creates the table and its triggers)."""

    def __init__(self, source: Ledger | sa.Engine | str) -> None:
        self.owned = False
        if isinstance(source, str):
            kwargs: dict[str, Any] = {"hide_parameters": True, "pool_pre_ping": True}
            if source.startswith("sqlite"):
                kwargs["connect_args"] = {"timeout": 30}
            self.db = sa.create_engine(source, **kwargs)
            self.owned = True
        elif isinstance(source, sa.Engine):
            self.db = source
        else:  # a Ledger
            self.db = source.db
        self.shown = self.db.url.render_as_string(hide_password=True)

    def read(self, key_class: str) -> tuple[int | None, int]:
        return lg.current_state(self.db, key_class)


# -- the client -----------------------------------------------------------------------------------

def _local(path: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    import pyarrow.fs as pafs

    if filesystem is not None:
        return filesystem, path
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


class KeyRotationClient:
    """Encrypt and decrypt values, write and read Parquet, under a key class's current version.

    :param backend: the key class's KMS backend (:class:`~keyrotation.backends.vault_transit.VaultTransitBackend`,
        :class:`~keyrotation.backends.aws_kms.AwsKmsBackend`); see :meth:`from_key_class`.
    :param ledger: a :class:`~keyrotation.ledger.Ledger`, a SQLAlchemy engine or a URL of the ledger's
        database; read only (SELECT on ``ledger_events``).
    :param key_class: the key class's name (it appears in every value's header and in the ledger).
    :param db: the SQLAlchemy engine of the database with ``keyrotation_data_keys`` (values only).
    :param encrypted_columns: columns :meth:`write_parquet` encrypts when not given per call.
    :param poll_interval_s: how often the ledger's reference and retired versions are re-read (lazily, on
        the first request after the interval; :meth:`refresh` reads them at once).
    :param cache_size: at most this many unwrapped data keys in memory.
    :param cache_ttl_s: an unwrapped data key is dropped (and zeroed) this long after it was unwrapped.
    """

    def __init__(self, backend: KmsBackend, ledger: Ledger | sa.Engine | str, key_class: str, *,
                 db: sa.Engine | None = None, encrypted_columns: Sequence[str] = (),
                 poll_interval_s: float = 10.0, cache_size: int = 1024, cache_ttl_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be positive")
        self.key_class = key_class
        header_prefix(key_class)  # refuses a name too long for the envelope
        self.metrics_ = ClientMetrics()
        self._backend = backend
        self._kms: Any = _CountingBackend(backend, self.metrics_)
        self._ledger = _LedgerView(ledger)
        self.encrypted_columns = list(encrypted_columns)
        self.poll_interval_s = poll_interval_s
        self._clock = clock
        self._cache = DataKeyCache(cache_size, cache_ttl_s, clock,
                                   on_evict=lambda: self.metrics_.add("cache_evictions"))
        self._db = db
        self._store: DataKeyStore | None = None
        self._state: LedgerState | None = None
        self._state_lock = threading.Lock()
        self._store_lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self.ledger_error: str | None = None

    @classmethod
    def from_key_class(cls, config: KeyClassConfig, *, kms_client: Any, ledger: Ledger | sa.Engine | str,
                       db: sa.Engine | None = None, dataset: str | None = None,
                       retry: RetryPolicy | None = APP_RETRY, **kwargs: Any) -> KeyRotationClient:
        """A client for a key class config: ``kms_client`` is an ``hvac.Client`` (``vault_transit``), a
        boto3 KMS client (``aws_kms``) or a ``KeyManagementServiceClient`` (``gcp_kms``). ``dataset`` (or
        the only Parquet dataset) gives the encrypted columns of :meth:`write_parquet`."""
        from keyrotation.backends.registry import open_backend

        kc = config.key_class
        backend = open_backend(kc, kms_client, retry)
        if "encrypted_columns" not in kwargs:
            parquet = [d for d in config.datasets if d.format == "parquet"]
            chosen = config.dataset(dataset) if dataset else (parquet[0] if len(parquet) == 1 else None)
            kwargs["encrypted_columns"] = list(chosen.encrypted_columns) if chosen else []
        return cls(backend, ledger, kc.name, db=db, **kwargs)

    # -- state --------------------------------------------------------------------------------
    @property
    def store(self) -> DataKeyStore:
        if self._db is None:
            raise InvalidInput(f"key class {self.key_class!r}: this client has no database engine for "
                               f"{DATA_KEYS}; pass db= to encrypt or decrypt values")
        if self._store is not None:
            return self._store
        with self._store_lock:  # one store, so that its single-flight loader is shared by every thread
            if self._store is None:
                self._store = DataKeyStore(self._db, self._kms, self.key_class, cache=self._cache,
                                           count=self.metrics_.add)
        return self._store

    def refresh(self) -> LedgerState:
        """Read the ledger now: the current-version reference and the retired floor. Raises
        :class:`LedgerUnavailable` if it cannot be read."""
        self.metrics_.add("ledger_polls")
        try:
            version, floor = self._ledger.read(self.key_class)
        except sa.exc.SQLAlchemyError as exc:
            self.ledger_error = f"ledger {self._ledger.shown}: unreachable ({type(exc).__name__})"
            raise LedgerUnavailable(self.ledger_error) from None
        self.ledger_error = None
        state = LedgerState(version, floor, self._clock())
        with self._state_lock:
            old, self._state = self._state, state
        if old is not None and old.version != version:
            self.metrics_.add("rotations_noticed")
            log.info("key class %s: ledger reference moved from v%s to v%s; encrypting under v%s from now on",
                     self.key_class, old.version, version, version)
        if floor > (old.min_version if old else 0):
            dropped = self._store.forget_below(floor) if self._store else self._cache.evict_below(floor)
            if old is not None:
                log.info("key class %s: the ledger retired versions below v%s; %d cached data keys read under "
                         "older versions dropped", self.key_class, floor, dropped)
        return state

    def state(self) -> LedgerState:
        """The ledger's answer, re-read when older than ``poll_interval_s`` (one thread reads; the others
        go on with the previous answer). If the ledger cannot be read, the last answer stays in force."""
        state = self._state
        if state is None:
            with self._poll_lock:
                return self._state or self.refresh()
        if self._clock() - state.checked_at >= self.poll_interval_s and self._poll_lock.acquire(blocking=False):
            try:
                return self.refresh()
            except LedgerUnavailable as exc:
                self.metrics_.add("errors", "ledger_unavailable")
                log.warning("key class %s: %s; keeping v%s as the current version", self.key_class, exc,
                            state.version)
                with self._state_lock:
                    self._state = LedgerState(state.version, state.min_version, self._clock())
            finally:
                self._poll_lock.release()
        return self._state or state

    @property
    def current_version(self) -> int | None:
        return self.state().version

    # -- values -------------------------------------------------------------------------------
    def encrypt(self, plaintext: bytes | bytearray | str, context: ValueContext | Mapping[str, Any]) -> bytes:
        """Seal ``plaintext`` for the row and column of ``context`` with the data key of its partition under
        the ledger's current version; the result is a keyrotation envelope (``bytes``)."""
        return self.encrypt_versioned(plaintext, context)[0]

    def encrypt_versioned(self, plaintext: bytes | bytearray | str,
                          context: ValueContext | Mapping[str, Any]) -> tuple[bytes, int]:
        """:meth:`encrypt`, also returning the key version the value's data key was created under."""
        self.metrics_.add("requests", "encrypt")
        try:
            ctx = ValueContext.of(context, for_encrypt=True)
            if isinstance(plaintext, str):
                data = plaintext.encode()
            elif isinstance(plaintext, bytes | bytearray | memoryview):
                data = bytes(plaintext)
            else:
                raise InvalidInput(f"plaintext must be bytes or str, not {type(plaintext).__name__}")
            state = self.state()
            if state.version is None:
                raise NoCurrentVersion(f"key class {self.key_class!r}: the ledger {self._ledger.shown} holds no "
                                       f"current version yet (run rotate__{self.key_class} once)")
            if state.version < state.min_version:
                raise RetiredVersionError(
                    f"key class {self.key_class!r}: refusing to encrypt {ctx.where} under v{state.version}, the "
                    f"ledger's current version, which the ledger marks retired (versions below v{state.min_version})",
                    state.version, state.min_version)
            key_id, entry = self._retired_refused(lambda: self.store.current(
                ctx.table, ctx.partition or "", state.version, state.min_version))
            return seal(data, entry.aead, key_id, self.key_class, ctx.table, ctx.column, ctx.pk), state.version
        except Exception as exc:
            self.metrics_.add("errors", error_kind(exc))
            raise

    def decrypt(self, ciphertext: bytes | bytearray | memoryview, context: ValueContext | Mapping[str, Any]) -> bytes:
        """Open a value sealed for the row and column of ``context`` (by this client or the
        ``sql_table`` DAGs), under any version the ledger does not mark retired."""
        self.metrics_.add("requests", "decrypt")
        try:
            ctx = ValueContext.of(context)
            if not isinstance(ciphertext, bytes | bytearray | memoryview):
                raise InvalidInput(f"ciphertext must be bytes, not {type(ciphertext).__name__}")
            raw = bytes(ciphertext)
            where = ctx.where
            header = parse_header(raw, where)
            if header.key_class != self.key_class:
                raise EnvelopeError(f"{where}: value belongs to key class {header.key_class!r}, not "
                                    f"{self.key_class!r}")
            entry = self._retired_refused(lambda: self.store.key(header.key_id, where, self.state().min_version))
            return self._open(entry, raw, header, ctx, where)
        except Exception as exc:
            self.metrics_.add("errors", error_kind(exc))
            raise

    @staticmethod
    def _open(entry: CachedKey, raw: bytes, header: Header, ctx: ValueContext, where: str) -> bytes:
        return open_sealed(raw, entry.aead, header, ctx.table, ctx.column, ctx.pk, where)

    def _retired_refused(self, lookup: Callable[[], Any]) -> Any:
        try:
            return lookup()
        except RetiredDataKey as exc:
            raise self._retired(exc.where, exc.key_id, exc.row, exc.floor, exc.why) from None

    def _retired(self, where: str, key_id: bytes, row: Any, floor: int, why: str) -> RetiredVersionError:
        return RetiredVersionError(
            f"{where}: refusing to decrypt: its data key {uuid.UUID(bytes=key_id)} (table {row.table_name}, partition "
            f"{row.partition}) is wrapped under v{row.version} of key class {self.key_class}, and {why}: versions "
            f"below v{floor} no longer decrypt. Re-wrap the partition's data keys under a live version (the "
            f"rewrap sweep) before retiring, or restore the version.", int(row.version), floor)

    def describe(self, ciphertext: bytes) -> dict[str, Any]:
        """What protects a value, without decrypting it: key class, data key id, the version its data key
        was created under and the version wrapping it now (a database read, no KMS call)."""
        header = parse_header(bytes(ciphertext), "value")
        row = self.store.row(header.key_id)
        return {"key_class": header.key_class, "data_key_id": header.key_id_text,
                "created_under": row.created_under if row else None, "version": row.version if row else None,
                "table": row.table_name if row else None, "partition": row.partition if row else None}

    # -- Parquet ------------------------------------------------------------------------------
    def write_parquet(self, table: pa.Table, path: str, filesystem: pafs.FileSystem | None = None, *,
                      columns: Sequence[str] | None = None) -> int:
        """Write ``table`` to ``path`` with PME exactly as the DAGs do (encrypted columns and footer, key
        material in ``_KEY_MATERIAL_FOR_<file>.json`` beside it), under the current version; return it.

        A single file: the partition manifest the DAGs' partition stores keep is not written here, so a
        folder that holds one (a partition the DAGs manage) is refused: a file added there would be
        unmanaged, reported by the census and blocking retirement while under an old version. Write a new
        partition folder instead (the next sweep adopts it), or replace a partition through the engine.
        """
        import posixpath

        import pyarrow.fs as pafs

        from keyrotation.formats.parquet_pme import ParquetEncryption
        from keyrotation.stores.partitions import MANIFEST

        self.metrics_.add("requests", "write_parquet")
        try:
            encrypted = list(columns or self.encrypted_columns)
            if not encrypted:
                raise InvalidInput(f"{path}: no encrypted columns: pass columns= or build the client with "
                                   "encrypted_columns")
            state = self.state()
            if state.version is None:
                raise NoCurrentVersion(f"key class {self.key_class!r}: the ledger holds no current version yet")
            if state.version < state.min_version:
                raise RetiredVersionError(f"{path}: refusing to write under v{state.version}, which the ledger marks "
                                          f"retired (versions below v{state.min_version})", state.version,
                                          state.min_version)
            fs, where = _local(path, filesystem)
            manifest = posixpath.join(posixpath.dirname(where), MANIFEST)
            if fs.get_file_info(manifest).type == pafs.FileType.File:
                raise InvalidInput(f"{path}: refusing to write into a partition the keyrotation DAGs manage (its "
                                   f"folder holds {MANIFEST}); write a new partition folder, which the next sweep "
                                   "adopts, or replace the partition through the re-encryption engine")
            ParquetEncryption(self._kms, encrypted).write(table, where, fs, state.version)
            return state.version
        except Exception as exc:
            self.metrics_.add("errors", error_kind(exc))
            raise

    def read_parquet(self, path: str, filesystem: pafs.FileSystem | None = None) -> pa.Table:
        """Read a PME file written by the DAGs or :meth:`write_parquet`; refused if its key material is
        wrapped under a version the ledger marks retired (checked from the key material, before any KMS call)."""
        from keyrotation.formats.parquet_pme import ParquetEncryption

        self.metrics_.add("requests", "read_parquet")
        try:
            fs, where = _local(path, filesystem)
            pme = ParquetEncryption(self._kms, [])
            versions = pme.wrapping_versions(where, fs)
            floor = self.state().min_version
            if min(versions) < floor:
                raise RetiredVersionError(
                    f"{path}: refusing to read: its key material is wrapped under v{min(versions)} of key class "
                    f"{self.key_class}, which the ledger marks retired (versions below v{floor} no longer decrypt)",
                    min(versions), floor)
            return pme.read(where, fs)
        except Exception as exc:
            self.metrics_.add("errors", error_kind(exc))
            raise

    # -- operations ---------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        state = self._state
        return {**self.metrics_.snapshot(), "cached_keys": len(self._cache), "cache_size": self._cache.size,
                "current_version": state.version if state else None,
                "min_decryption_version": state.min_version if state else None}

    def health(self) -> dict[str, str]:
        """Each dependency's state: ``ok`` or why not (no secrets in the reasons)."""
        checks: dict[str, str] = {}
        try:
            kms = self._kms.key_state()
            checks["kms"] = "ok" if kms.exists else f"key {self._backend.key_ref!r} does not exist"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["kms"] = str(exc) if isinstance(exc, KeyRotationError) else type(exc).__name__
        try:
            state = self.refresh()
            checks["ledger"] = "ok" if state.version is not None else "no current version recorded yet"
        except LedgerUnavailable as exc:
            checks["ledger"] = str(exc)
        if self._db is not None:
            try:
                with self._db.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                checks["data_keys_db"] = "ok"
            except sa.exc.SQLAlchemyError as exc:
                checks["data_keys_db"] = f"unreachable ({type(exc).__name__})"
        return checks

    def close(self) -> None:
        """Zero and drop every cached key; dispose of the ledger engine this client created."""
        self._cache.clear()
        if self._ledger.owned:
            self._ledger.db.dispose()

    def __enter__(self) -> KeyRotationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self._state
        return (f"KeyRotationClient(key_class={self.key_class!r}, version={state.version if state else None}, "
                f"cached_keys={len(self._cache)})")
