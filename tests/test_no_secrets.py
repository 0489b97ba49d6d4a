"""No key, token or plaintext value reaches a log, an XCom, a run's conf, the metadata DB, the ledger or the report.

The full cycle runs through Airflow (``dag.test``) for each backend (OpenBao Transit, AWS KMS on moto, Cloud KMS
on the gRPC test server) with canary data values and the backend's credential (the OpenBao token, the AWS secret
key, the service accounts' private keys). Every data key and KEK that passes through the backend is captured,
and the DEKs at the Parquet encryption layer (with double wrapping they never pass through the backend: they are
recovered from each file's key material as it is written, and again post hoc from the files the run left, by
tests/oracle.py); then every place an operator or auditor could look is scanned for all of them, raw, hex and
base64 (at each of the three alignments). The live scheduler's task logs are scanned by tests/test_ui.py.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from helpers import CANARY, KeySpy, days, file_text, find_leaks, forms, pem_needles, runtime, seed
from keyrotation.backends.vault_transit import VaultTransitBackend

pytestmark = pytest.mark.airflow


def _cycle(name: str, dataset: str, rt, more_data=None, more_datasets: tuple[str, ...] = ()) -> None:  # noqa: ANN001
    """First version, data under it, a forced rotation, a re-encrypting sweep, retirement: all through Airflow."""
    from keyrotation_factory import key_class_dags

    dags = key_class_dags(name)
    runs = [dags[f"rotate__{name}"].test(run_conf={"force": False, "reason": "test: first version"})]
    seed(rt, dataset, days("2024-01-01", 3), rows=20)
    if more_data is not None:
        more_data()
    runs.append(dags[f"rotate__{name}"].test(run_conf={"force": True, "reason": "canary"}))
    for swept in (dataset, *more_datasets):
        runs.append(dags[f"reencrypt__{swept}"].test(run_conf={"scope": "sweep", "dry_run": False}))
    runs.append(dags[f"retire__{name}"].test())
    assert [getattr(r.state, "value", r.state) for r in runs] == ["success"] * len(runs)


def _scan(name: str, rt, spy: KeySpy, post_hoc: dict, credentials: dict[str, set[str]], tmp_path: Path,  # noqa: ANN001
          capfd, caplog) -> dict:  # noqa: ANN001
    """Write the report, scan every place for every canary; the counts (asserted: no hit)."""
    from keyrotation_airflow.operators.report import ComplianceReportOperator

    report = Path(ComplianceReportOperator(task_id="r", output_dir=str(tmp_path / "report"),
                                           key_classes=[name]).execute({})["html"])
    # The tasks ran in this process and their keys went through the spies: otherwise the scan proves nothing.
    assert len(spy.passed) >= 6 and spy.files >= 6, (len(spy.passed), spy.files)
    post_keks = {k for keys in post_hoc.values() for f in keys.values() for k in f.keks.values()}
    post_deks = {k for keys in post_hoc.values() for f in keys.values() for k in f.deks.values()}
    assert len(post_hoc) == 3 and len(post_deks) >= 6
    # What the spy took as the files were written is what the files hold (the oracle, independently).
    assert post_deks <= set(spy.deks) and post_keks <= set(spy.keks) <= set(spy.passed)
    needles = {"data value": forms(CANARY.encode()), **credentials, **spy.needles()}

    out, err = capfd.readouterr()
    haystacks = {"stdout+stderr": out + err, "caplog": caplog.text}
    assert "plan (sweep): 3 partitions" in out + err + caplog.text  # the task logs were captured
    home = Path(os.environ["AIRFLOW_HOME"])
    logs = [p for p in (home / "logs").rglob("*") if p.is_file()] if (home / "logs").exists() else []
    for path in logs:
        haystacks[f"log file {path}"] = path.read_text(errors="replace")
    databases = sorted(home.glob("airflow.db*"))  # with a journal or WAL if there is one
    for path in databases:
        haystacks[f"metadata DB {path.name}"] = file_text(path)  # the file's bytes, and every table's rows
    db_text = haystacks["metadata DB airflow.db"]
    assert f"rotate__{name}" in db_text and "== xcom" in db_text and "== dag_run" in db_text
    ledger_db = Path(os.environ["KEYROTATION_LEDGER_URL"].removeprefix("sqlite:///"))
    haystacks["ledger DB"] = file_text(ledger_db)
    haystacks["ledger rows"] = json.dumps([{k: str(v) for k, v in r.items()} for r in rt.ledger.rows()])
    reports = sorted(report.parent.iterdir())
    for path in reports:
        haystacks[f"report {path.name}"] = file_text(path)

    leaks = find_leaks(needles, haystacks)
    assert leaks == [], leaks
    kinds = {}
    for what in needles:
        kind = what.split(" #")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    # caplog holds little: Airflow's logging configuration replaces the root handlers at its first run in the
    # session; the task output is on stdout/stderr (asserted above).
    return {"where": {"stdout/stderr": 1, "caplog": 1, "task log files": len(logs), "metadata DB files": len(databases),
                      "ledger": 2, "report files": len(reports)},
            "chars": {"stdout/stderr": len(haystacks["stdout+stderr"]), "caplog": len(haystacks["caplog"]),
                      "metadata DB": sum(len(t) for w, t in haystacks.items() if w.startswith("metadata DB"))},
            "canaries": len(needles), "canaries_by_kind": kinds, "hits": len(leaks)}


def test_full_cycle_leaks_nothing(make_key_class, vault, openbao, airflow_db, tmp_path, capfd, caplog, monkeypatch,
                                  record_property):
    from oracle import TransitKms, partition_keys

    spy = KeySpy(monkeypatch, VaultTransitBackend)
    rt = runtime(make_key_class(name="canary", mode="reencrypt", dataset="canary_data"), vault)
    _cycle("canary", "canary_data", rt)
    kms = TransitKms(openbao.url, openbao.token)
    root = Path(rt.config.dataset("canary_data").location)
    post_hoc = {p.name: partition_keys(p, kms.unwrap_key) for p in sorted(root.glob("*=*"))}
    counts = _scan("canary", rt, spy, post_hoc, {"OpenBao token": forms(openbao.token.encode())}, tmp_path,
                   capfd, caplog)
    record_property("canary_scan", {"backend": "vault_transit", **counts})


def test_full_cycle_on_aws_leaks_nothing(make_aws_key_class, moto, airflow_db, tmp_path, capfd, caplog, monkeypatch,
                                         record_property):
    import secrets

    import pyarrow.fs as pafs
    from oracle import partition_keys

    from helpers import AWS_CONN_ID, aws_runtime
    from keyrotation.backends.aws_kms import AwsKmsBackend

    # The connection's secret key, a canary of its own (moto accepts any): moto's default "testing" is a word.
    secret_key = "aws-secret-" + secrets.token_urlsafe(24)
    conn = json.loads(moto.airflow_connection_uri())
    conn["password"] = secret_key
    monkeypatch.setenv(f"AIRFLOW_CONN_{AWS_CONN_ID.upper()}", json.dumps(conn))
    spy = KeySpy(monkeypatch, AwsKmsBackend)
    config = make_aws_key_class("canary_aws", mode="reencrypt", dataset="canary_aws_data")
    rt = aws_runtime(config, moto)
    _cycle("canary_aws", "canary_aws_data", rt)
    fs = pafs.S3FileSystem(access_key=moto.access_key, secret_key=moto.secret_key, region=moto.region,
                           endpoint_override=moto.url)
    root = config.dataset("canary_aws_data").location.removeprefix("s3://")
    folders = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root)) if "=" in i.path)
    post_hoc = {f: partition_keys(f, lambda w, _m: rt.backend.unwrap(w), fs) for f in folders}
    counts = _scan("canary_aws", rt, spy, post_hoc, {"AWS secret key": forms(secret_key.encode())}, tmp_path,
                   capfd, caplog)
    record_property("canary_scan", {"backend": "aws_kms", **counts})


def test_full_cycle_on_gcp_leaks_nothing(make_gcp_key_class, gcp, airflow_db, tmp_path, capfd, caplog, monkeypatch,
                                         record_property):
    from oracle import partition_keys

    from helpers import gcp_runtime
    from keyrotation.backends.gcp_kms import GcpKmsBackend

    spy = KeySpy(monkeypatch, GcpKmsBackend)
    config = make_gcp_key_class("canary_gcp", mode="reencrypt", dataset="canary_gcp_data")
    owner = gcp_runtime(config, gcp)

    def documents() -> None:  # the key class's CMEK objects, with canary content
        ds = config.dataset("canary_gcp_data_documents")
        bucket_name, _, prefix = ds.location[len("gs://"):].partition("/")
        bucket = owner.storage(ds).gcs_client(ds.location).bucket(bucket_name)
        for day in days("2024-01-01", 2):
            blob = bucket.blob(f"{prefix}/dt={day}/statement.json", kms_key_name=owner.backend.key_ref)
            blob.upload_from_string(json.dumps({"canary": CANARY}), content_type="application/json")

    _cycle("canary_gcp", "canary_gcp_data", owner, documents, ("canary_gcp_data_documents",))
    # Every service account's private key, from the connections the DAGs used (and the test's owner).
    kc = config.key_class
    credentials = {}
    for conn_id in sorted({kc.conn_id, "gcp_owner", *kc.connections.values()}):
        extra = json.loads(os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"])["extra"]
        keyfile = json.loads(extra["keyfile_dict"])
        credentials[f"private key of {conn_id}"] = pem_needles(keyfile["private_key"])
    assert len(credentials) >= 5
    ds = config.dataset("canary_gcp_data")
    fs = owner.storage(ds).filesystem(ds.location)[0]
    root = ds.location.removeprefix("gs://")
    import pyarrow.fs as pafs

    folders = sorted({f"{root}/{i.path[len(root) + 1:].split('/', 1)[0]}"
                      for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if "=" in i.path})
    post_hoc = {f: partition_keys(f, lambda w, _m: owner.backend.unwrap(w), fs) for f in folders}
    counts = _scan("canary_gcp", owner, spy, post_hoc, credentials, tmp_path, capfd, caplog)
    record_property("canary_scan", {"backend": "gcp_kms", **counts})


def test_the_scan_finds_a_planted_leak():
    """The needles match a key printed as base64 in the middle of a log line."""
    key = os.urandom(32)
    line = "debug: kek=" + base64.b64encode(b"xx" + key).decode() + " done"
    assert any(v in line for v in forms(key))
    assert any(v in f"value {CANARY}-000000001" for v in forms(CANARY.encode()))
    assert find_leaks({"k": forms(key)}, {"log": line}) == [("k", "log")]


def test_a_private_key_is_found_printed_inside_json():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    assert find_leaks({"pk": pem_needles(pem)}, {"log": "extra=" + json.dumps({"private_key": pem})}) == [("pk", "log")]
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    assert find_leaks({"pk": pem_needles(pem)}, {"log": other}) == []
