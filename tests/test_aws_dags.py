"""AWS KMS key classes with their data in S3, run by Airflow (``dag.test()``) against moto_server over
HTTP: the full cycle for both strategies, and the retirement gate holding back while data is old."""

from __future__ import annotations

import pytest

from dag_runs import key_class_dags as _dags
from dag_runs import state as _state
from dag_runs import task_context as _context
from dag_runs import task_states as _task_states
from helpers import CANARY, aws_runtime, days, partition_digests, seed
from keyrotation import ledger as lg

pytestmark = pytest.mark.airflow


@pytest.mark.parametrize("strategy", ["alias", "on_demand"])
def test_full_cycle_on_s3_partitions(strategy, make_aws_key_class, moto, airflow_db, capfd):
    name = f"aws_{strategy}"
    config = make_aws_key_class(name, strategy=strategy, dataset=f"{name}_customers", chunk_size=8)
    dataset = f"{name}_customers"
    rt = aws_runtime(config, moto)
    dags = _dags(name)
    parts = days("2024-01-01", 30)

    assert _state(dags[f"rotate__{name}"].test(run_conf={"force": False, "reason": "first version"})) == "success"
    assert rt.backend.key_state().latest_version == 1
    seed(rt, dataset, parts, rows=20)
    digests = partition_digests(rt, dataset, parts)
    keys = moto.client("s3").list_objects_v2(Bucket=config.datasets[0].location.split("/")[2])["KeyCount"]
    assert keys >= 30 * 3  # data file, key material and manifest per partition, in S3
    assert _state(dags[f"rotate__{name}"].test(run_conf={"force": True, "reason": "test: yearly"})) == "success"
    assert rt.backend.key_state().latest_version == 2
    assert rt.census(dataset).by_version() == {1: 30}

    # Before re-encryption the gate holds: the alias strategy refuses, on_demand says it cannot retire.
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from keyrotation_airflow.operators.retire import RetireKeyVersionsOperator

    op = RetireKeyVersionsOperator(task_id="retire_versions", key_class=name)
    expected = AirflowFailException if strategy == "alias" else AirflowSkipException
    with pytest.raises(expected, match="30 partitions still under versions below v2"):
        op.execute(_context(f"retire__{name}", "retire_versions"))
    assert rt.backend.key_state().min_decryption_version == 1

    sweep = dags[f"reencrypt__{dataset}"].test(run_conf={"scope": "auto", "partition_from": None,
                                                         "partition_to": None, "mode": "policy", "dry_run": False})
    assert _state(sweep) == "success"
    assert [_task_states(sweep)[f"reencrypt[{i}]"] for i in range(4)] == ["success"] * 4
    assert rt.census(dataset).by_version() == {2: 30}
    assert partition_digests(rt, dataset, parts) == digests
    assert len(rt.ledger.rows(events_in=(lg.PARTITION_VALIDATED,))) == 30

    retire = dags[f"retire__{name}"].test()
    assert _state(retire) == "success"
    kms = moto.client("kms")
    if strategy == "alias":
        assert _task_states(retire)["retire_versions"] == "success"
        state = rt.backend.key_state()
        assert (state.min_decryption_version, sorted(state.versions)) == (2, [2])
        assert kms.describe_key(KeyId=f"{config.key_class.key_ref}/v1")["KeyMetadata"]["KeyState"] == \
            "PendingDeletion"
        [row] = rt.ledger.rows(events_in=(lg.VERSIONS_RETIRED,))
        assert (row["from_version"], row["to_version"]) == (1, 2)
    else:
        assert _task_states(retire)["retire_versions"] == "skipped"
        assert kms.describe_key(KeyId=config.key_class.key_ref)["KeyMetadata"]["KeyState"] == "Enabled"
        rows = rt.ledger.rows(events_in=(lg.RETIREMENT_NOT_POSSIBLE,))
        assert rows and "in perpetuity" in rows[-1]["detail"]
        assert "no data is under versions below v2" in rows[-1]["detail"]
        assert not rt.ledger.rows(events_in=(lg.VERSIONS_RETIRED,))
    out, err = capfd.readouterr()
    assert CANARY not in out + err


def test_example_aws_key_classes_wire_pools_and_skip_approval_where_nothing_retires(monkeypatch):
    from pathlib import Path

    from keyrotation_factory import key_class_dags

    monkeypatch.setenv("KEYROTATION_CONFIG_DIR", str(Path(__file__).parents[1] / "include/config/examples/aws"))
    pii = key_class_dags("customer_pii")
    assert sorted(pii) == ["reencrypt__customer_documents", "reencrypt__customers", "retire__customer_pii",
                           "rotate__customer_pii"]
    reencrypt = pii["reencrypt__customers"]
    assert reencrypt.get_task("reencrypt").pool == "keyrotation_aws_kms"
    assert reencrypt.get_task("validate").pool == "keyrotation_aws_kms"
    assert "approve" in pii["retire__customer_pii"].task_ids
    tokens = key_class_dags("payment_tokens")
    retire = tokens["retire__payment_tokens"]
    assert "approve" not in retire.task_ids and "cannot retire versions" in retire.doc_md
    assert tokens["reencrypt__payments"].get_task("reencrypt").pool == "default_pool"
