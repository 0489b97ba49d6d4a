"""S3 objects encrypted with SSE-KMS as a dataset of an AWS key class (alias strategy): census by
HeadObject, in-place copy to the new key, validation, and the retirement gate, run by Airflow."""

from __future__ import annotations

import pytest

from dag_runs import key_class_dags as _dags
from dag_runs import state as _state
from dag_runs import task_context as _context
from dag_runs import task_states as _task_states
from helpers import CANARY, aws_runtime, days
from keyrotation import ledger as lg
from keyrotation.ledger import RunContext
from keyrotation.rotation import update_reference

pytestmark = pytest.mark.airflow
OBJECTS = "    encrypted_columns: [email, ssn]\n"


def put_objects(moto, location: str, key_arn: str, partitions: list[str], per_partition: int) -> dict[str, bytes]:
    bucket, prefix = location.removeprefix("s3://").split("/", 1)
    s3 = moto.client("s3")
    bodies = {}
    for day in partitions:
        for i in range(per_partition):
            key = f"{prefix}/dt={day}/doc-{i:03d}.json"
            bodies[key] = f'{{"secret": "{CANARY}-{day}-{i}"}}'.encode()
            s3.put_object(Bucket=bucket, Key=key, Body=bodies[key], ContentType="application/json",
                          Metadata={"owner": "billing"}, Tagging="class=pii", ServerSideEncryption="aws:kms",
                          SSEKMSKeyId=key_arn)
    return bodies


def test_sse_kms_objects_rotate_copy_in_place_validate_and_retire(make_aws_key_class, moto, airflow_db, capfd):
    config = make_aws_key_class("aws_objects", dataset="aws_documents", chunk_size=2,
                                **{OBJECTS: "    format: sse_kms_objects\n"})
    rt = aws_runtime(config, moto)
    location = config.dataset("aws_documents").location
    bucket = location.removeprefix("s3://").split("/", 1)[0]
    s3 = moto.client("s3")
    dags = _dags("aws_objects")
    assert _state(dags["rotate__aws_objects"].test(run_conf={"force": False, "reason": "first version"})) == "success"
    update_reference("aws_objects", 1, rt.ledger, RunContext(actor="test"))
    parts = days("2024-02-01", 4)
    bodies = put_objects(moto, location, rt.backend.key_id_of(1), parts, per_partition=15)
    assert rt.census("aws_documents").by_version() == {1: 4}

    assert _state(dags["rotate__aws_objects"].test(run_conf={"force": True, "reason": "test"})) == "success"
    from airflow.sdk.exceptions import AirflowFailException

    from keyrotation_airflow.operators.retire import RetireKeyVersionsOperator

    with pytest.raises(AirflowFailException, match="4 partitions still under versions below v2"):
        RetireKeyVersionsOperator(task_id="retire_versions", key_class="aws_objects").execute(
            _context("retire__aws_objects", "retire_versions"))

    sweep = dags["reencrypt__aws_documents"].test(run_conf={"scope": "auto", "partition_from": None,
                                                           "partition_to": None, "mode": "policy", "dry_run": False})
    assert _state(sweep) == "success"
    assert [_task_states(sweep)[f"validate[{i}]"] for i in range(2)] == ["success"] * 2
    assert rt.census("aws_documents").by_version() == {2: 4}
    v2_key = rt.backend.key_id_of(2)
    for key, body in bodies.items():
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["SSEKMSKeyId"] == v2_key and head["Metadata"] == {"owner": "billing"}
        assert head["ContentType"] == "application/json"
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    assert s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"] == [{"Key": "class", "Value": "pii"}]
    reencrypted = rt.ledger.rows(events_in=(lg.PARTITION_REENCRYPTED,))
    assert sorted(r["partition"] for r in reencrypted) == parts and all(r["digest"] for r in reencrypted)

    assert _state(dags["retire__aws_objects"].test()) == "success"
    assert rt.backend.key_state().min_decryption_version == 2
    assert moto.client("kms").describe_key(KeyId=rt.backend.key_id_of(1))["KeyMetadata"]["KeyState"] == \
        "PendingDeletion"
    out, err = capfd.readouterr()
    assert CANARY not in out + err


def test_an_object_under_a_foreign_key_blocks_retirement_and_is_named(make_aws_key_class, moto):
    config = make_aws_key_class("aws_foreign", dataset="aws_foreign_docs", **{OBJECTS: "    format: sse_kms_objects\n"})
    rt = aws_runtime(config, moto)
    rt.backend.create_key()
    location = config.dataset("aws_foreign_docs").location
    put_objects(moto, location, rt.backend.key_id_of(1), ["2024-02-01"], per_partition=2)
    foreign = moto.client("kms").create_key()["KeyMetadata"]["Arn"]
    put_objects(moto, location, foreign, ["2024-02-02"], per_partition=1)
    bucket, prefix = location.removeprefix("s3://").split("/", 1)
    moto.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/loose.json", Body=b"{}")
    census = rt.census("aws_foreign_docs")
    assert census.by_version() == {1: 1}
    assert "not a version of key class aws_foreign" in census.errors["2024-02-02"]
    assert "1 objects outside the dt= folders" in census.errors["(outside partitions)"]
    engine = rt.engine("aws_foreign_docs")
    [result] = engine.run(["2024-02-02"], lambda p: engine.process(p, 1, "rewrap"))
    assert result.action == "failed" and foreign in result.error
