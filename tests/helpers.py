"""Shared test helpers: synthetic data with canary values, and a runtime over the real OpenBao."""

from __future__ import annotations

import secrets
from datetime import date, timedelta

import pyarrow as pa

from keyrotation.backends.vault_transit import VaultTransitBackend
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
    kc = config.key_class
    return KeyClassRuntime(config, VaultTransitBackend(vault, kc.key_ref, kc.mount_point), Ledger(ledger_url))


def aws_runtime(config: KeyClassConfig, moto, ledger_url: str | None = None) -> KeyClassRuntime:
    """A runtime over the moto server: the AWS KMS backend and S3 storage, as the Airflow hooks build them."""
    from keyrotation.backends.aws_kms import AwsKmsBackend
    from keyrotation.stores.filesystems import AwsCredentials, Storage

    kc, options = config.key_class, config.key_class.aws_options
    backend = AwsKmsBackend(moto.client("kms"), kc.key_ref, strategy=options.strategy, key_class=kc.name,
                            deletion_window_days=options.deletion_window_days)
    storage = Storage(AwsCredentials(moto.access_key, moto.secret_key, region_name=moto.region,
                                     endpoint_url=moto.url))
    return KeyClassRuntime(config, backend, Ledger(ledger_url), storage=lambda _ds: storage)


def gcp_runtime(config: KeyClassConfig, gcp, role: str | None = None, ledger_url: str | None = None
                ) -> KeyClassRuntime:
    """A runtime as the Airflow hooks build it, with the connection of ``role`` (None: the server's owner, who
    may do anything: for setting up and checking what the DAGs did)."""
    import os

    from keyrotation_airflow.hooks.kms import KeyClassKmsHook
    from keyrotation_airflow.runtime import dataset_storage

    kc = config.key_class
    if role is None:
        os.environ["AIRFLOW_CONN_GCP_OWNER"] = gcp.owner_connection()
        kc = kc.model_copy(update={"conn_id": "gcp_owner", "connections": {}})
    backend = KeyClassKmsHook(kc, role or "rotate").get_backend()
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
