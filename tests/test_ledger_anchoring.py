"""Issue 17, item 4: the chain's head is anchored outside the ledger database by checkpoints HMAC'd with a
dedicated Transit key, so ``verify --checkpoints`` sees a cut tail, a recomputed chain and a replaced
checkpoint, each with its own exit code. Tampering is done as a database owner would: triggers dropped."""

from __future__ import annotations

import json
import os
import secrets

import pytest
import sqlalchemy as sa

from keyrotation import ledger as lg
from keyrotation.anchoring import ANCHOR_KEY_ENV, TransitAnchor, write_checkpoint
from keyrotation.ledger import Ledger, RunContext


@pytest.fixture
def anchored(tmp_path, openbao, monkeypatch):
    """A ledger of six rows and a checkpoints file beside the reports, with one checkpoint of its head."""
    monkeypatch.setenv("VAULT_ADDR", openbao.url)
    monkeypatch.setenv("VAULT_TOKEN", openbao.token)
    monkeypatch.setenv(ANCHOR_KEY_ENV, f"anchor-{secrets.token_hex(4)}")
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ctx = RunContext(actor="ana")
    for i in range(5):
        ledger.record(lg.PARTITION_REWRAPPED, "pii", ctx, dataset="ds", partition=f"2024-01-0{i + 1}",
                      from_version=1, to_version=2, digest=f"sha256:{i}")
    ledger.record(lg.VERSIONS_RETIRED, "pii", ctx, from_version=1, to_version=2)
    path = tmp_path / "reports" / "ledger-checkpoints.jsonl"
    assert lg.main(["checkpoint", "--url", ledger.url, "--checkpoints", str(path)]) == lg.INTACT
    return ledger, path


def _verify(capsys, ledger: Ledger, path) -> tuple[int, str]:
    capsys.readouterr()
    code = lg.main(["verify", "--url", ledger.url, "--checkpoints", str(path)])
    return code, capsys.readouterr().out


def _checkpoint(path) -> dict:
    return json.loads(path.read_text().splitlines()[-1])


def _sql(ledger: Ledger, *statements: str) -> None:
    with ledger.db.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def test_an_anchored_ledger_verifies_and_a_missing_checkpoint_is_exit_7(anchored, capsys, tmp_path):
    ledger, path = anchored
    cp = _checkpoint(path)
    assert (cp["last_id"], cp["rows"], cp["row_hash"]) == (6, 6, ledger.rows()[-1]["row_hash"])
    assert cp["hmac"].startswith("vault:v1:")
    code, out = _verify(capsys, ledger, path)
    assert code == lg.INTACT, out
    assert f"row 6 matches the checkpoint of {cp['created_at']} (transit:transit/" in out
    ledger.record(lg.ROTATION_SKIPPED, "pii", status="skipped")
    code, out = _verify(capsys, ledger, path)
    assert code == lg.INTACT and out.strip().endswith("; 1 rows since"), out
    code, out = _verify(capsys, ledger, tmp_path / "elsewhere.jsonl")
    assert code == lg.NO_CHECKPOINT == 7
    assert f"no checkpoint in {tmp_path / 'elsewhere.jsonl'}: the chain's head is anchored nowhere" in out


def test_a_cut_tail_is_exit_4(anchored, capsys):
    ledger, path = anchored
    created = _checkpoint(path)["created_at"]
    _sql(ledger, "DROP TRIGGER ledger_events_no_delete", "DELETE FROM ledger_events WHERE id > 4")
    assert ledger.verify() == lg.VerifyResult(ok=True, rows_checked=4)  # the chain alone cannot see it
    assert lg.main(["verify", "--url", ledger.url]) == lg.UNGUARDED  # today's verify: "chain intact"
    code, out = _verify(capsys, ledger, path)
    assert code == lg.TAIL_CUT == 4
    assert f"tail cut: the checkpoint of {created} anchors row 6 (6 rows); the ledger now ends at row 4 " \
           "(4 rows)" in out


def test_a_recomputed_chain_is_exit_5(anchored, capsys):
    ledger, path = anchored
    _sql(ledger, "DROP TRIGGER ledger_events_no_update",
         "UPDATE ledger_events SET digest = 'sha256:forged' WHERE id = 2")
    assert not ledger.verify().ok
    prev = lg.GENESIS_HASH
    with ledger.db.begin() as conn:  # recompute every hash from the edited row on, as an owner could
        for row in conn.execute(sa.select(lg.events).order_by(lg.events.c.id)).mappings().all():
            row_hash = lg._row_hash(prev, row)
            conn.execute(lg.events.update().where(lg.events.c.id == row["id"]).values(prev_hash=prev,
                                                                                      row_hash=row_hash))
            prev = row_hash
    assert ledger.verify().ok
    code, out = _verify(capsys, ledger, path)
    assert code == lg.REWRITTEN == 5
    cp = _checkpoint(path)
    assert f"chain rewritten: the checkpoint of {cp['created_at']} anchors row 6 with hash {cp['row_hash'][:16]} " \
           f"after 6 rows; the ledger has {prev[:16]} after 6 rows" in out
    assert "forged" not in out


def test_a_replaced_checkpoint_is_exit_6(anchored, capsys, openbao):
    ledger, path = anchored
    _sql(ledger, "DROP TRIGGER ledger_events_no_delete", "DELETE FROM ledger_events WHERE id > 4")
    # The owner anchors the cut chain with a Transit key of their own: its HMAC is no HMAC of the anchor key.
    own = TransitAnchor(openbao.client(), key=f"mine-{secrets.token_hex(4)}")
    own.ensure_key()
    forged = path.with_name("forged.jsonl")
    cp = write_checkpoint(ledger, own, forged)
    path.write_text(json.dumps({**json.loads(forged.read_text()), "key": _checkpoint(path)["key"]}) + "\n")
    code, out = _verify(capsys, ledger, path)
    assert code == lg.CHECKPOINT_FORGED == 6
    assert f"the latest checkpoint in {path} (row 4, {cp.created_at}) does not verify with " \
           f"transit:transit/{_anchor_key()}: replaced or forged" in out
    path.write_text("not a checkpoint\n")
    code, out = _verify(capsys, ledger, path)
    assert code == 6 and "is not a checkpoint: replaced or damaged" in out


def _anchor_key() -> str:
    return os.environ[ANCHOR_KEY_ENV]


# --- The hourly checkpoint task (dags/ledger_checkpoint.py) ------------------------------------------------


@pytest.fixture
def anchor_conn(anchored, vault, openbao, monkeypatch):
    """The ``keyrotation_anchor`` connection, with a token that has the anchor policies only, as make up makes
    it; the anchor key created by the root token."""
    from keyrotation.policies import anchor_policies

    key = _anchor_key()
    names = []
    for name, hcl in anchor_policies(key).items():
        vault.sys.create_or_update_policy(name=f"{key}-{name}", policy=hcl)
        names.append(f"{key}-{name}")
    token = vault.auth.token.create(policies=names, no_default_policy=True, ttl="1h")["auth"]["client_token"]
    monkeypatch.setenv("AIRFLOW_CONN_KEYROTATION_ANCHOR", openbao.airflow_connection_uri(token))
    ledger, path = anchored
    monkeypatch.setenv("KEYROTATION_LEDGER_URL", ledger.url)
    monkeypatch.setenv("KEYROTATION_LEDGER_CHECKPOINTS", str(path))
    return ledger, path


def _checkpoint_task():
    from dag_runs import task_context
    from keyrotation_airflow.operators.ledger import LedgerCheckpointOperator

    return LedgerCheckpointOperator(task_id="write_checkpoint"), task_context("ledger_checkpoint", "write_checkpoint")


def test_the_checkpoint_task_writes_a_checkpoint_that_verifies(anchor_conn, capsys):
    ledger, path = anchor_conn
    ledger.record(lg.ROTATION_SKIPPED, "pii", status="skipped")
    task, context = _checkpoint_task()
    assert task.execute(context) == {"last_id": 7, "rows": 7, "path": str(path), "previous": "anchored"}
    assert len(path.read_text().splitlines()) == 2
    assert (_checkpoint(path)["last_id"], _checkpoint(path)["rows"]) == (7, 7)
    code, out = _verify(capsys, ledger, path)
    assert code == lg.INTACT, out
    assert out.strip().endswith("; 0 rows since"), out


def test_the_checkpoint_task_fails_on_a_cut_tail_and_writes_nothing(anchor_conn):
    from airflow.sdk.exceptions import AirflowException

    ledger, path = anchor_conn
    created = _checkpoint(path)["created_at"]
    before = path.read_text()
    _sql(ledger, "DROP TRIGGER ledger_events_no_delete", "DELETE FROM ledger_events WHERE id > 4")
    task, context = _checkpoint_task()
    with pytest.raises(AirflowException) as failed:
        task.execute(context)
    assert str(failed.value) == (f"tail cut: the checkpoint of {created} anchors row 6 (6 rows); the ledger now "
                                 "ends at row 4 (4 rows); no checkpoint written")
    assert path.read_text() == before
    # All of it (the task's Ledger() put the guard back): still a cut tail, not an empty ledger to skip.
    _sql(ledger, "DROP TRIGGER IF EXISTS ledger_events_no_delete", "DELETE FROM ledger_events")
    with pytest.raises(AirflowException, match=r"the ledger now ends at row 0 \(0 rows\); no checkpoint written"):
        task.execute(context)
    assert path.read_text() == before


def test_the_checkpoint_task_is_skipped_without_the_connection(anchor_conn, monkeypatch):
    from airflow.sdk.exceptions import AirflowSkipException

    _, path = anchor_conn
    before = path.read_text()
    monkeypatch.delenv("AIRFLOW_CONN_KEYROTATION_ANCHOR")
    task, context = _checkpoint_task()
    with pytest.raises(AirflowSkipException, match="ledger anchoring is not configured: no connection "
                                                   "'keyrotation_anchor'"):
        task.execute(context)
    assert path.read_text() == before


def test_a_checkpoint_of_the_empty_ledger_verifies(tmp_path, openbao, monkeypatch, capsys):
    monkeypatch.setenv("VAULT_ADDR", openbao.url)
    monkeypatch.setenv("VAULT_TOKEN", openbao.token)
    monkeypatch.setenv(ANCHOR_KEY_ENV, f"anchor-{secrets.token_hex(4)}")
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    path = tmp_path / "ledger-checkpoints.jsonl"
    assert lg.main(["checkpoint", "--url", ledger.url, "--checkpoints", str(path)]) == lg.INTACT
    code, out = _verify(capsys, ledger, path)
    assert code == lg.INTACT and "row 0 matches the checkpoint of" in out, out


def test_verify_of_the_default_ledger_checks_the_checkpoint_dag_s_file_without_options(tmp_path, openbao,
                                                                                        monkeypatch, capsys):
    """Where the ``ledger_checkpoint`` DAG writes by default ($KEYROTATION_HOME/ledger-checkpoints.jsonl) is
    where a plain ``verify`` of the default ledger looks; a ledger verified with no checkpoint says so."""
    from keyrotation.anchoring import CHECKPOINTS_ENV, default_checkpoints_path

    for name in (CHECKPOINTS_ENV, "KEYROTATION_LEDGER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KEYROTATION_HOME", str(tmp_path))
    monkeypatch.setenv("VAULT_ADDR", openbao.url)
    monkeypatch.setenv("VAULT_TOKEN", openbao.token)
    monkeypatch.setenv(ANCHOR_KEY_ENV, f"anchor-{secrets.token_hex(4)}")
    ledger = Ledger()
    assert ledger.url == f"sqlite:///{tmp_path / 'ledger.db'}"
    for i in range(3):
        ledger.record(lg.PARTITION_REWRAPPED, "pii", dataset="ds", partition=f"p{i}", from_version=1, to_version=2)
    capsys.readouterr()
    assert lg.main(["verify"]) == lg.INTACT
    assert "head not checked against a checkpoint (no --checkpoints, $KEYROTATION_LEDGER_CHECKPOINTS unset): " \
           "rows cut from the end would not be seen" in capsys.readouterr().out
    assert lg.main(["checkpoint"]) == lg.INTACT
    assert default_checkpoints_path() == tmp_path / "ledger-checkpoints.jsonl"
    assert len(default_checkpoints_path().read_text().splitlines()) == 1
    _sql(ledger, "DROP TRIGGER ledger_events_no_delete", "DELETE FROM ledger_events WHERE id > 2")
    capsys.readouterr()
    assert lg.main(["verify"]) == lg.TAIL_CUT
    assert "tail cut: the checkpoint of" in capsys.readouterr().out
    # Another ledger (--url) is not checked against the default ledger's checkpoints.
    other = Ledger(f"sqlite:///{tmp_path / 'other.db'}")
    assert lg.main(["verify", "--url", other.url]) == lg.INTACT
