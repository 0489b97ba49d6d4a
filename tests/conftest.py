"""Fixtures: a real OpenBao server, per-test key classes, datasets and an Airflow home.

Airflow reads its configuration when first imported, so the environment is set here, before
any test module imports it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Outcomes and recorded properties of every test; docs/reliability.md is written from them after a whole-suite run.
pytest_plugins = ["reliability_report"]

ROOT = Path(__file__).resolve().parents[1]
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="keyrotation-airflow-")
# Tests write their key classes (and one DAG file each) into these session folders, so that
# dag.test(), which re-parses the DAG folder, finds every test DAG.
CONFIG_DIR = Path(_AIRFLOW_HOME) / "config"
DAGS_DIR = Path(_AIRFLOW_HOME) / "dags"
CONFIG_DIR.mkdir()
DAGS_DIR.mkdir()
os.environ.update({
    "AIRFLOW_HOME": _AIRFLOW_HOME,
    "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
    "KEYROTATION_CONFIG_DIR": str(CONFIG_DIR),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME}/airflow.db",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    "KEYROTATION_HOME": str(Path(_AIRFLOW_HOME) / "keyrotation"),
})

# The Cloud KMS test server speaks TLS with a self-signed certificate; gRPC clients in this process
# (and in the Airflow processes the tests start) trust it through GRPC_DEFAULT_SSL_ROOTS_FILE_PATH,
# which gRPC reads once, at the first secure channel: so the certificate is made now.
# A pytest-xdist worker uses its controller's (named in the environment it inherits): gRPC in a worker does not see
# a change of the variable made here, so the inherited roots must already trust the certificate.
GCP_TLS_DIR = Path(os.environ["KEYROTATION_TEST_GCP_TLS_DIR"]) if os.environ.get("PYTEST_XDIST_WORKER") \
    and os.environ.get("KEYROTATION_TEST_GCP_TLS_DIR") else Path(_AIRFLOW_HOME) / "gcp-tls"

from gcp_kms_server import ensure_tls_files, trust_in_process  # noqa: E402

trust_in_process(ensure_tls_files(GCP_TLS_DIR)[0])
os.environ["KEYROTATION_TEST_GCP_TLS_DIR"] = str(GCP_TLS_DIR)

from sqlite_diagnostics import install as record_sqlite_io_errors  # noqa: E402

from helpers import (  # noqa: E402
    AWS_CONN_ID,
    AWS_KEY_CLASS_YAML,
    CONN_ID,
    DAG_STUB,
    GCP_KEY_CLASS_YAML,
    GCS_CONN_ID,
    KEY_CLASS_YAML,
    PG_URL,
)
from keyrotation_dev.devserver import MotoServer, OpenBaoDevServer  # noqa: E402

record_sqlite_io_errors()

# `TEST_WORKERS=2 make test` runs two pytest-xdist workers, a module at a time each (--dist loadfile), handed out in
# collection order (--no-loadscope-reorder): the longest modules first, so that the last one to start does not run
# on alone (longest first, as a whole run measured them; the rest keep their order).
LONGEST_MODULES = ("test_ui.py", "test_spark.py", "test_scale_out.py", "test_kill_matrix.py", "test_no_secrets.py",
                   "test_install.py", "test_aws_dags.py", "test_gcp.py", "test_sql_tables.py", "test_safety.py",
                   "test_up.py", "test_faults.py", "test_least_privilege.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller hands out modules in this order
        rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def openbao(tmp_path_factory):
    log = tmp_path_factory.mktemp("openbao") / "bao.log"
    with OpenBaoDevServer(log_path=str(log)) as server:
        os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = server.airflow_connection_uri()
        yield server


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """One moto_server for the session (AWS KMS, S3, SQS); the Airflow connection ``aws_keyrotation``."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with MotoServer(log_path=str(log)) as server:
        os.environ[f"AIRFLOW_CONN_{AWS_CONN_ID.upper()}"] = server.airflow_connection_uri()
        yield server


@pytest.fixture(scope="session")
def gcp():
    """The Cloud KMS test server (gRPC, TLS, IAM) and GCS with CMEK, in this process; the Airflow connection
    ``gcs_keyrotation`` reaches GCS."""
    from gcp_servers import GcpTestServers

    with GcpTestServers(GCP_TLS_DIR) as servers:
        os.environ[f"AIRFLOW_CONN_{GCS_CONN_ID.upper()}"] = servers.storage_connection()
        yield servers


@pytest.fixture(scope="session")
def airflow_db():
    """The session's Airflow metadata DB (SQLite), migrated once."""
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True,
                   capture_output=True, env=os.environ.copy())


@pytest.fixture
def vault(openbao):
    return openbao.client()


@pytest.fixture
def make_key_class(tmp_path, monkeypatch, openbao):
    """Write a key class file (unique Transit key per test) and its DAG file; return its config.

    DAG tests must give each key class a name no other test uses.
    """
    from keyrotation.config import load_key_class

    monkeypatch.setenv("KEYROTATION_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.db'}")

    def make(name="pii", mode="rewrap", dataset="customers", grace="0s", chunk_size=16, location=None,
             **overrides):
        text = KEY_CLASS_YAML.format(
            name=name, key_ref=f"{name}-{secrets.token_hex(4)}", conn_id=CONN_ID, mode=mode,
            chunk_size=chunk_size, grace=grace, dataset=dataset, location=location or tmp_path / "data" / dataset,
        )
        for old, new in overrides.items():
            text = text.replace(old, new)
        (CONFIG_DIR / f"{name}.yaml").write_text(text)
        (DAGS_DIR / f"{name}.py").write_text(DAG_STUB.format(name=name))
        return load_key_class(name)

    return make


@pytest.fixture
def make_aws_key_class(tmp_path, monkeypatch, moto):
    """Write an aws_kms key class file (unique alias and bucket per test) and its DAG file; return its config."""
    from keyrotation.config import load_key_class

    monkeypatch.setenv("KEYROTATION_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.db'}")

    def make(name, strategy="alias", mode="rewrap", dataset="customers", chunk_size=16, **overrides):
        bucket = f"kr-{name.replace('_', '-')}-{secrets.token_hex(3)}"
        moto.client("s3").create_bucket(Bucket=bucket)
        text = AWS_KEY_CLASS_YAML.format(
            name=name, key_ref=f"alias/{name.replace('_', '-')}-{secrets.token_hex(4)}", conn_id=AWS_CONN_ID,
            strategy=strategy, mode=mode, chunk_size=chunk_size, dataset=dataset,
            location=f"s3://{bucket}/{dataset}")
        for old, new in overrides.items():
            text = text.replace(old, new)
        (CONFIG_DIR / f"{name}.yaml").write_text(text)
        (DAGS_DIR / f"{name}.py").write_text(DAG_STUB.format(name=name))
        return load_key_class(name)

    return make


@pytest.fixture
def make_gcp_key_class(tmp_path, monkeypatch, gcp):
    """Write a gcp_kms key class file (unique CryptoKey and bucket per test) and its DAG file, with one
    service account per role bound as keyrotation.policies.gcp_kms says; return its config."""
    from keyrotation.config import load_key_class

    monkeypatch.setenv("KEYROTATION_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.db'}")

    def make(name, mode="rewrap", dataset="customers", chunk_size=16, protection_level="SOFTWARE", trim="true",
             **overrides):
        bucket = f"kr-{name.replace('_', '-')}-{secrets.token_hex(3)}"
        gcp.gcs.create_bucket(bucket)
        text = GCP_KEY_CLASS_YAML.format(
            name=name, key_id=f"{name.replace('_', '-')}-{secrets.token_hex(4)}", mode=mode, chunk_size=chunk_size,
            dataset=dataset, location=f"gs://{bucket}/{dataset}", documents=f"gs://{bucket}/documents",
            protection_level=protection_level, trim=trim)
        for old, new in overrides.items():
            text = text.replace(old, new)
        (CONFIG_DIR / f"{name}.yaml").write_text(text)
        (DAGS_DIR / f"{name}.py").write_text(DAG_STUB.format(name=name))
        config = load_key_class(name)
        for conn_id, uri in gcp.provision(config).items():
            monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", uri)
        return config

    return make


@pytest.fixture
def pg():
    """The machine's PostgreSQL (database test) and a list the test fills with the tables it made: they
    and their rows in the data-key table are dropped afterwards."""
    import sqlalchemy as sa

    from keyrotation.stores.data_keys import DATA_KEYS

    engine = sa.create_engine(PG_URL, hide_parameters=True)
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is needed (.ci/run starts it): {exc}")
    tables: list[str] = []
    yield engine, tables
    with engine.begin() as conn:
        for table in tables:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
            if sa.inspect(conn).has_table(DATA_KEYS):
                conn.execute(sa.text(f"DELETE FROM {DATA_KEYS} WHERE table_name = :t"), {"t": table})
    engine.dispose()
