"""Event-driven rotation: a message on the key class's SQS queue (as an EventBridge rule on AWS KMS
events would send) starts the rotation DAG through an AssetWatcher with the common-messaging
MessageQueueTrigger, against a real scheduler, triggerer and the local AWS-API server's SQS."""

from __future__ import annotations

import json
import secrets
import time

import pytest
from live_airflow import LiveAirflow

from helpers import CONN_ID, DAG_STUB, KEY_CLASS_YAML, runtime
from keyrotation import ledger as lg
from keyrotation.config import load_key_class_file
from keyrotation.ledger import RunContext
from keyrotation.rotation import update_reference

pytestmark = [pytest.mark.airflow, pytest.mark.slow]


def test_a_message_on_the_kms_event_queue_rotates_the_key(tmp_path, openbao, moto):
    sqs = moto.client("sqs")
    queue_url = sqs.create_queue(QueueName=f"kms-events-{secrets.token_hex(3)}")["QueueUrl"]
    dags, config_dir = tmp_path / "dags", tmp_path / "config"
    dags.mkdir()
    config_dir.mkdir()
    text = KEY_CLASS_YAML.format(name="ev", key_ref=f"ev-{secrets.token_hex(4)}", conn_id=CONN_ID, mode="rewrap",
                                 chunk_size=4, grace="0s", dataset="ev_data", location=tmp_path / "data")
    text = text.replace("  rotation:\n", f"  events:\n    sqs_queue: {queue_url}\n    aws_conn_id: aws_kms_events\n"
                                         "    region_name: us-east-1\n  rotation:\n")
    (config_dir / "ev.yaml").write_text(text)
    (dags / "ev.py").write_text(DAG_STUB.format(name="ev"))
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    rt = runtime(load_key_class_file(config_dir / "ev.yaml"), openbao.client(), ledger_url)
    update_reference("ev", rt.backend.create_key().latest_version, rt.ledger, RunContext(actor="test"))
    aws_conn = moto.airflow_connection_uri()
    live = LiveAirflow(tmp_path, dags, {"KEYROTATION_CONFIG_DIR": str(config_dir), "KEYROTATION_LEDGER_URL": ledger_url,
                                        "AIRFLOW_CONN_AWS_KMS_EVENTS": aws_conn}, triggerer=True).start()
    try:
        with live.client() as client:
            assert client.patch("/api/v2/dags/rotate__ev", json={"is_paused": False}).status_code == 200
            time.sleep(5)  # let the triggerer pick up the watcher
            message_id = sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(
                {"source": "aws.kms", "detail-type": "KMS CMK Rotation", "detail": {"key-id": "demo"}}))["MessageId"]

            def event_run():
                runs = client.get("/api/v2/dags/rotate__ev/dagRuns", params={"run_type": "asset_triggered"}).json()
                done = [r for r in runs.get("dag_runs", []) if r["state"] in ("success", "failed")]
                return done[0] if done else None

            run = live.wait(event_run, "an asset-triggered rotation", timeout=240)
    finally:
        live.stop()
    assert run["state"] == "success", live.log_tail("triggerer")
    assert rt.backend.key_state().latest_version == 2
    [created] = rt.ledger.rows(events_in=(lg.VERSION_CREATED,))
    assert json.loads(created["detail"])["reason"] == f"KMS event: messages {message_id}"
    assert created["run_id"] == run["dag_run_id"]
