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
    with ledger.engine.begin() as conn:
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
    with ledger.engine.begin() as conn:  # recompute every hash from the edited row on, as an owner could
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
