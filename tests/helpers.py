"""Shared test helpers: synthetic data with canary values, and a runtime over the real OpenBao."""

from __future__ import annotations

import secrets
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa

from keyrotation.backends.registry import open_backend
from keyrotation.config import KeyClassConfig
from keyrotation.ledger import Ledger
from keyrotation.runtime import KeyClassRuntime

CANARY = "CANARY-" + secrets.token_hex(6)
CONN_ID = "vault_keyrotation"
AWS_CONN_ID = "aws_keyrotation"
GCS_CONN_ID = "gcs_keyrotation"
PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"

KEY_CLASS_YAML = """\
key_class:
  name: {name}
  backend: vault_transit
  key_ref: {key_ref}
  conn_id: {conn_id}
  create_if_missing: true
  rotation:
    schedule: "@daily"
    cryptoperiod: 90d
  reencryption:
    mode: {mode}
    chunk_size: {chunk_size}
  retire:
    grace_period: {grace}
    versions_kept: 1
    approval_required: false
datasets:
  - name: {dataset}
    location: {location}
    encrypted_columns: [email, ssn]
    start_date: "2024-01-01"
"""

AWS_KEY_CLASS_YAML = """\
key_class:
  name: {name}
  backend: aws_kms
  key_ref: {key_ref}
  conn_id: {conn_id}
  create_if_missing: true
  aws:
    strategy: {strategy}
    deletion_window_days: 7
  rotation:
    schedule: "@daily"
    cryptoperiod: 90d
  reencryption:
    mode: {mode}
    chunk_size: {chunk_size}
  retire:
    grace_period: 0s
    versions_kept: 1
    approval_required: false
datasets:
  - name: {dataset}
    location: {location}
    encrypted_columns: [email, ssn]
    start_date: "2024-01-01"
"""

# Each role's connection is provisioned with its own service account by the make_gcp_key_class fixture.
GCP_KEY_CLASS_YAML = """\
key_class:
  name: {name}
  backend: gcp_kms
  key_ref: projects/keyrotation-test/locations/europe-west1/keyRings/tests/cryptoKeys/{key_id}
  conn_id: gcp_{name}
  connections:
    rotate: gcp_{name}_rotate
    reencrypt: gcp_{name}_reencrypt
    retire: gcp_{name}_retire
    report: gcp_{name}_report
  create_if_missing: true
  gcp:
    protection_level: {protection_level}
    destroy_scheduled_duration: 2d
  rotation:
    schedule: "@daily"
    cryptoperiod: 90d
  reencryption:
    mode: {mode}
    chunk_size: {chunk_size}
  retire:
    grace_period: 0s
    versions_kept: 1
    approval_required: false
    trim: {trim}
datasets:
  - name: {dataset}
    location: {location}
    conn_id: gcs_keyrotation
    encrypted_columns: [email, ssn]
    start_date: "2024-01-01"
  - name: {dataset}_documents
    location: {documents}
    conn_id: gcs_keyrotation
    format: gcs_cmek_objects
    schedule: null
"""

DAG_STUB = """\
\"\"\"Airflow DAGs of test key class {name}.\"\"\"
from keyrotation_factory import key_class_dags

globals().update(key_class_dags("{name}"))
"""


def customers(day: str, rows: int = 50) -> pa.Table:
    """Synthetic customer rows whose encrypted columns carry a canary, to prove nothing leaks."""
    return pa.table({
        "id": pa.array(range(rows), pa.int64()),
        "day": [day] * rows,
        "email": [f"{CANARY}-{day}-{i}@example.test" for i in range(rows)],
        "ssn": [f"{CANARY}-{i:09d}" for i in range(rows)],
    })


def days(start: str, count: int) -> list[str]:
    first = date.fromisoformat(start)
    return [(first + timedelta(days=i)).isoformat() for i in range(count)]


def runtime(config: KeyClassConfig, vault, ledger_url: str | None = None) -> KeyClassRuntime:
    return KeyClassRuntime(config, open_backend(config.key_class, vault), Ledger(ledger_url))


def aws_runtime(config: KeyClassConfig, moto, ledger_url: str | None = None) -> KeyClassRuntime:
    """A runtime over the moto server: the AWS KMS backend and S3 storage, as the Airflow hooks build them."""
    from keyrotation.stores.filesystems import AwsCredentials, Storage

    backend = open_backend(config.key_class, moto.client("kms"))
    storage = Storage(AwsCredentials(moto.access_key, moto.secret_key, region_name=moto.region,
                                     endpoint_url=moto.url))
    return KeyClassRuntime(config, backend, Ledger(ledger_url), storage=lambda _ds: storage)


def gcp_runtime(config: KeyClassConfig, gcp, role: str | None = None, ledger_url: str | None = None
                ) -> KeyClassRuntime:
    """A runtime as the Airflow hooks build it, with the connection of ``role`` (None: the server's owner, who
    may do anything: for setting up and checking what the DAGs did)."""
    import os

    from keyrotation_airflow.hooks.kms import kms_hook
    from keyrotation_airflow.task_runtime import dataset_storage

    kc = config.key_class
    if role is None:
        os.environ["AIRFLOW_CONN_GCP_OWNER"] = gcp.owner_connection()
        kc = kc.model_copy(update={"conn_id": "gcp_owner", "connections": {}})
    backend = kms_hook(kc, role or "rotate").get_backend(kc)
    return KeyClassRuntime(config, backend, Ledger(ledger_url), storage=dataset_storage(kc, role or "reencrypt"))


def seed(rt: KeyClassRuntime, dataset: str, partitions: list[str], rows: int = 50) -> int:
    """Create the key if needed, record its version as the reference, write the partitions."""
    from keyrotation.ledger import RunContext
    from keyrotation.rotation import update_reference

    state = rt.backend.key_state()
    if not state.exists:
        state = rt.backend.create_key()
    update_reference(rt.name, state.latest_version, rt.ledger, RunContext(actor="test"))
    engine = rt.engine(dataset)
    for p in partitions:
        engine.write_partition(p, customers(p, rows), state.latest_version)
    return state.latest_version


def sweep(rt: KeyClassRuntime, dataset: str, target: int, mode: str = "rewrap",
          partitions: list[str] | None = None) -> list:
    """What a reencrypt run does to ``partitions`` (default: all): bring each under ``target``, then validate
    it (the retirement gate asks for a validation after each partition's last change); the results."""
    engine = rt.engine(dataset)
    parts = partitions if partitions is not None else rt.partitions(dataset)
    done = engine.run(parts, lambda p: engine.process(p, target, mode))
    return engine.run([r.partition for r in done if r.action != "failed"],
                      lambda p: engine.validate(p, min_version=target))


def partition_digests(rt: KeyClassRuntime, dataset: str, partitions: list[str]) -> dict[str, str]:
    """Decrypt each partition (through the KMS) and return its plaintext digest."""
    from keyrotation.formats.digest import table_digest

    engine = rt.engine(dataset)
    return {p: table_digest(engine._read(p, rt.store(dataset).live_files(p))) for p in partitions}


def seed_and_rotate(rt: KeyClassRuntime, dataset: str, partitions: list[str], rows: int = 50) -> tuple[dict, int]:
    """Write ``partitions`` under the first key version, rotate; return their digests and the new version."""
    seed(rt, dataset, partitions, rows=rows)
    return partition_digests(rt, dataset, partitions), rt.backend.rotate()


# -- canaries: every secret of a run, and every place an operator or auditor could look ---------------------

def forms(secret: bytes) -> set[str]:
    """The secret as text, hex and base64; base64 at each alignment, trimmed of its edge characters."""
    import base64

    out = {secret.hex()}
    try:
        out.add(secret.decode())
    except UnicodeDecodeError:
        pass
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + secret).decode()
        core = encoded[(pad * 4 + 2) // 3 + 1 : -3]
        if len(core) >= 12:
            out.add(core)
    return out


def pem_needles(pem: str) -> set[str]:
    """A PEM private key as a leak would show it: its DER in every form, and each line of its base64 body but the
    first two and the last (the DER header is the same for every key of a size; the last line is short), which
    match the key printed raw, with escaped newlines (inside JSON) or wrapped differently."""
    import base64

    lines = [line.strip() for line in pem.strip().splitlines() if line.strip() and "-----" not in line]
    der = base64.b64decode("".join(lines))
    return forms(der) | {line for line in lines[2:-1] if len(line) >= 32}


class KeySpy:
    """Every plaintext key of a run: what passes through ``backend_cls``'s wrap and unwrap (with double
    wrapping, the KEKs), and the DEKs, taken at the Parquet encryption layer: each time the product makes a
    file's encryption properties, or re-encrypts a file module by module, the key material just written is read
    back and its KEKs and DEKs recovered (tests/oracle.py ``file_keys``, the KEK unwrapped by the same backend)."""

    def __init__(self, monkeypatch, backend_cls) -> None:  # noqa: ANN001
        from oracle import file_keys

        from keyrotation.formats import parquet_pme

        self.passed: list[bytes] = []  # through the backend
        self.keks: list[bytes] = []  # recovered from key material as the files were written
        self.deks: list[bytes] = []
        self.files = 0
        real_wrap, real_unwrap = backend_cls.wrap, backend_cls.unwrap
        real_props = parquet_pme.ParquetEncryption._encryption_properties
        spy = self

        def wrap(self, plaintext, version=None):  # noqa: ANN001, ANN202
            spy.passed.append(bytes(plaintext))
            return real_wrap(self, plaintext, version)

        def unwrap(self, wrapped):  # noqa: ANN001, ANN202
            key = real_unwrap(self, wrapped)
            spy.passed.append(bytes(key))
            return key

        def properties(self, schema, path, filesystem, version):  # noqa: ANN001, ANN202
            props = real_props(self, schema, path, filesystem, version)
            with filesystem.open_input_stream(parquet_pme.key_material_path(path)) as stream:
                keys = file_keys(stream.read(), lambda wrapped, _master: real_unwrap(self.backend, wrapped))
            spy.keks.extend(keys.keks.values())
            spy.deks.extend(keys.deks.values())
            spy.files += 1
            return props

        real_modules = parquet_pme.ParquetEncryption.reencrypt_modules

        def reencrypt_modules(self, src_path, dst_path, filesystem, version, *args, **kwargs):  # noqa: ANN001, ANN202
            # the module path (issue 21) makes a file's new keys itself, not through encryption properties
            result = real_modules(self, src_path, dst_path, filesystem, version, *args, **kwargs)
            with filesystem.open_input_stream(parquet_pme.key_material_path(dst_path)) as stream:
                keys = file_keys(stream.read(), lambda wrapped, _master: real_unwrap(self.backend, wrapped))
            spy.keks.extend(keys.keks.values())
            spy.deks.extend(keys.deks.values())
            spy.files += 1
            return result

        monkeypatch.setattr(backend_cls, "wrap", wrap)
        monkeypatch.setattr(backend_cls, "unwrap", unwrap)
        monkeypatch.setattr(parquet_pme.ParquetEncryption, "_encryption_properties", properties)
        monkeypatch.setattr(parquet_pme.ParquetEncryption, "reencrypt_modules", reencrypt_modules)

    def needles(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for kind, keys in (("key through the backend", self.passed), ("KEK", self.keks), ("DEK", self.deks)):
            for i, key in enumerate(dict.fromkeys(keys)):
                out[f"{kind} #{i}"] = forms(key)
        return out


def database_dump(url: str) -> str:
    """Every row of every table of the database at SQLAlchemy ``url`` as text (a blob as latin-1 text and as
    hex), each table under a ``== name`` line."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    parts = []
    try:
        with engine.connect() as conn:
            for table in sa.inspect(conn).get_table_names():
                parts.append(f"== {table}")
                for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                    parts.append(" | ".join(_cell(v) for v in row))
    finally:
        engine.dispose()
    return "\n".join(parts)


def _cell(value) -> str:  # noqa: ANN001
    if isinstance(value, memoryview):
        value = value.tobytes()
    return value.decode("latin-1") + " " + value.hex() if isinstance(value, bytes) else str(value)


def sqlite_dump(db) -> str:  # noqa: ANN001
    """:func:`database_dump` of a SQLite database file, opened read-only."""
    return database_dump(f"sqlite:///file:{db}?mode=ro&uri=true")


def postgres_files_text(url: str) -> tuple[str, int]:
    """The bytes (as latin-1 text) of every file of the PostgreSQL database at ``url`` in the server's data
    directory (its tables, indexes and TOAST, dead rows included), after a checkpoint has written them out; and
    how many files. The server must be on this machine, with its files readable here."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("CHECKPOINT"))
            data_dir = conn.execute(sa.text("SHOW data_directory")).scalar_one()
            oid = conn.execute(sa.text("SELECT oid FROM pg_database WHERE datname = current_database()")).scalar_one()
    finally:
        engine.dispose()
    files = sorted(p for p in (Path(data_dir) / "base" / str(oid)).iterdir() if p.is_file())
    assert files, f"no files of database {oid} in {data_dir}"
    return "".join(p.read_bytes().decode("latin-1") for p in files), len(files)


def file_text(path) -> str:  # noqa: ANN001
    """What a reader of a file sees: its bytes (as latin-1 text), a SQLite database's rows, a Parquet file's table
    as CSV, a PDF's text (pdftotext)."""
    import shutil
    import subprocess

    raw = path.read_bytes()
    text = raw.decode("latin-1")
    if raw[:16] == b"SQLite format 3\x00":
        text += sqlite_dump(path)
    elif path.suffix == ".parquet":
        import pandas as pd

        text += pd.read_parquet(path).to_csv()
    elif path.suffix == ".pdf":
        assert shutil.which("pdftotext"), "pdftotext (Debian poppler-utils) is needed to read the PDF report"
        text += subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True, check=True).stdout
    return text


def find_leaks(needles: dict[str, set[str]], haystacks: dict[str, str]) -> list[tuple[str, str]]:
    """(what, where) for every needle found in a haystack, in any of its forms."""
    return [(what, where) for where, text in haystacks.items() for what, variants in needles.items()
            if any(v in text for v in variants)]
