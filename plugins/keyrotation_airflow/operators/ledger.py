"""The ``write_checkpoint`` task of ``ledger_checkpoint``: anchor the ledger's hash-chain head outside its
database (:mod:`keyrotation.anchoring`), after checking the chain against the latest checkpoint."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook, BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowNotFoundException, AirflowSkipException

from keyrotation.anchoring import (
    ANCHOR_KEY_ENV,
    ANCHOR_MOUNT_ENV,
    DEFAULT_ANCHOR_KEY,
    TransitAnchor,
    check_anchor,
    default_checkpoints_path,
    write_checkpoint,
)
from keyrotation.ledger import Ledger
from keyrotation_airflow.hooks.vault_transit import VaultTransitHook

ANCHOR_CONN_ID = "keyrotation_anchor"
#: What the latest checkpoint may say for a new one to be written after it; any other finding fails the task.
_WRITABLE = ("anchored", "missing")


class LedgerCheckpointOperator(BaseOperator):
    """
    Verify the ledger (hash chain, then against the latest checkpoint) and append a checkpoint of its head,
    HMAC'd by the anchor key through the connection ``anchor_conn_id`` (a Vault/OpenBao connection whose
    token has the ``anchor-writer`` and ``anchor-verifier`` policies of :mod:`keyrotation.policies`).

    Fails, and writes nothing, when the chain is broken, its tail was cut, it was rewritten or the latest
    checkpoint does not verify: a new checkpoint would anchor the tampered ledger and hide the finding.
    Skipped when the connection does not exist (anchoring not configured). Returns the checkpoint's head
    (row id, number of rows) and file; no HMAC, no token.

    :param checkpoints: The checkpoints file; default :func:`default_checkpoints_path`. (templated)
    :param anchor_conn_id: The Vault/OpenBao connection of the anchor key.
    """

    template_fields: Sequence[str] = ("checkpoints",)
    ui_color = "#e0ecf4"

    def __init__(self, *, checkpoints: str | None = None, anchor_conn_id: str = ANCHOR_CONN_ID,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoints = checkpoints
        self.anchor_conn_id = anchor_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        try:
            BaseHook.get_connection(self.anchor_conn_id)
        except AirflowNotFoundException:
            raise AirflowSkipException(f"ledger anchoring is not configured: no connection {self.anchor_conn_id!r} "
                                       "(make up provisions it); no checkpoint written") from None
        path = Path(self.checkpoints) if self.checkpoints else default_checkpoints_path()
        key = os.environ.get(ANCHOR_KEY_ENV) or DEFAULT_ANCHOR_KEY
        client = VaultTransitHook(self.anchor_conn_id, purpose=f"the ledger's anchor key {key!r}").get_conn()
        anchor = TransitAnchor(client, key, os.environ.get(ANCHOR_MOUNT_ENV) or "transit")
        ledger = Ledger()
        result = ledger.verify()
        if not result.ok:
            raise AirflowException(f"chain broken at row {result.first_broken_id}: {result.reason}; "
                                   "no checkpoint written")
        check = check_anchor(ledger, anchor, path)  # before the empty check: every row deleted is a cut tail
        if check.status not in _WRITABLE:
            raise AirflowException(f"{check.message}; no checkpoint written")
        if result.rows_checked == 0:
            raise AirflowSkipException("the ledger is empty: nothing to anchor")
        self.log.info("%s", check.message)
        checkpoint = write_checkpoint(ledger, anchor, path)
        self.log.info("checkpoint of row %d (%d rows) written to %s, HMAC by %s", checkpoint.last_id,
                      checkpoint.rows, path, checkpoint.key)
        return {"last_id": checkpoint.last_id, "rows": checkpoint.rows, "path": str(path),
                "previous": check.status}
