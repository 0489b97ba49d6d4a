"""Airflow DAG: hourly, a KMS-HMAC'd checkpoint of the ledger's hash-chain head, kept outside the ledger."""

from datetime import datetime

from airflow.sdk import DAG

from keyrotation_airflow.operators.ledger import LedgerCheckpointOperator

DOC = """
### Ledger checkpoint

Anchors the ledger outside its database, so that a cut tail (the last rows deleted) or a chain recomputed
from an edited row on is seen: every hour, the ledger is verified against its latest checkpoint, then a new
checkpoint of its head (last row, number of rows, its hash) is appended to the checkpoints file,
HMAC'd by the Transit key `keyrotation-ledger-anchor` (`$KEYROTATION_ANCHOR_KEY`).

- **Connection** `keyrotation_anchor`: OpenBao/Vault, a token with the `anchor-writer` and
  `anchor-verifier` policies only (`python -m keyrotation.policies --anchor`); `make up` provisions it.
  Without it the task is **skipped**: anchoring is not configured.
- Created **active** (runs as soon as it is parsed); pausing it stops the anchoring.
- **File**: `$KEYROTATION_LEDGER_CHECKPOINTS`, else `$KEYROTATION_HOME/ledger-checkpoints.jsonl`; keep it
  where the ledger database's owner cannot write.
- The task **fails**, and writes no checkpoint, when the chain is broken, its tail was cut, it was rewritten
  or the latest checkpoint does not verify; the log says which.
- Auditors: `python -m keyrotation.ledger verify --checkpoints FILE` (exit 4 tail cut, 5 rewritten,
  6 checkpoint replaced or forged, 7 no checkpoint).
"""

with DAG(
    dag_id="ledger_checkpoint",
    description="Hourly KMS-HMAC'd checkpoint of the ledger's hash-chain head",
    schedule="@hourly",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    # Active from the start: it only anchors (or is skipped without its connection), and a paused anchor
    # leaves the ledger's tail unguarded.
    is_paused_upon_creation=False,
    tags=["keyrotation", "ledger"],
    doc_md=DOC,
):
    LedgerCheckpointOperator(task_id="write_checkpoint")
