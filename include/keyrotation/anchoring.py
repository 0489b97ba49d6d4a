"""Anchoring the ledger outside its database: checkpoints of the hash chain's head, HMAC'd by the KMS.

The hash chain shows an edited or deleted row, but not a cut tail (the last rows deleted) or a chain
recomputed from an edited row onwards: whoever owns the database can do both and the chain still
verifies. A checkpoint records the head (last row id, number of rows, its ``row_hash``) with an HMAC
made by a dedicated Transit key, and is appended to a JSON Lines file kept outside the ledger database
(beside the reports, on other storage). The database owner cannot make a valid HMAC without the KMS, so
``python -m keyrotation.ledger verify --checkpoints FILE`` can tell a cut tail, a rewritten chain and a
replaced checkpoint apart. What it cannot see: a checkpoints file replaced by an older genuine one, or
rows removed after the last checkpoint; checkpoint often and keep the file where the database owner
cannot write.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import hvac
import sqlalchemy as sa
from hvac.exceptions import InvalidPath, VaultError

from keyrotation.errors import KeyRotationError
from keyrotation.ledger import Ledger, events, home_dir

#: Environment: the checkpoints file (JSON Lines); the Transit key and mount that HMAC the checkpoints.
CHECKPOINTS_ENV = "KEYROTATION_LEDGER_CHECKPOINTS"
ANCHOR_KEY_ENV = "KEYROTATION_ANCHOR_KEY"
ANCHOR_MOUNT_ENV = "KEYROTATION_ANCHOR_MOUNT"
DEFAULT_ANCHOR_KEY = "keyrotation-ledger-anchor"


class AnchorError(KeyRotationError):
    """The KMS that HMACs the checkpoints could not be used."""


class TransitAnchor:
    """HMAC and verify with a dedicated Transit key (``transit/hmac``, ``transit/verify``); the key never
    leaves the KMS."""

    def __init__(self, client: hvac.Client, key: str = DEFAULT_ANCHOR_KEY, mount_point: str = "transit") -> None:
        self.client = client
        self.key = key
        self.mount_point = mount_point

    @classmethod
    def from_env(cls) -> TransitAnchor:
        """From ``VAULT_ADDR`` / ``VAULT_TOKEN`` and ``$KEYROTATION_ANCHOR_KEY`` / ``$KEYROTATION_ANCHOR_MOUNT``."""
        addr = os.environ.get("VAULT_ADDR")
        if not addr:
            raise AnchorError("VAULT_ADDR is not set: no KMS to HMAC or verify checkpoints with")
        return cls(hvac.Client(url=addr, token=os.environ.get("VAULT_TOKEN")),
                   os.environ.get(ANCHOR_KEY_ENV) or DEFAULT_ANCHOR_KEY,
                   os.environ.get(ANCHOR_MOUNT_ENV) or "transit")

    @property
    def name(self) -> str:
        return f"transit:{self.mount_point}/{self.key}"

    def ensure_key(self) -> None:
        try:
            self.client.secrets.transit.read_key(self.key, mount_point=self.mount_point)
        except InvalidPath:
            self.client.secrets.transit.create_key(self.key, mount_point=self.mount_point)
        except VaultError as exc:
            raise AnchorError(f"{self.name}: {exc}") from None

    def mac(self, message: bytes) -> str:
        try:
            response = self.client.secrets.transit.generate_hmac(
                self.key, base64.b64encode(message).decode(), algorithm="sha2-256", mount_point=self.mount_point)
        except VaultError as exc:
            raise AnchorError(f"{self.name}: hmac failed: {exc}") from None
        return response["data"]["hmac"]

    def verify(self, message: bytes, mac: str) -> bool:
        try:
            response = self.client.secrets.transit.verify_signed_data(
                self.key, base64.b64encode(message).decode(), hmac=mac, hash_algorithm="sha2-256",
                mount_point=self.mount_point)
        except InvalidPath as exc:
            raise AnchorError(f"{self.name}: verify failed: {exc}") from None
        except VaultError:  # a malformed HMAC is refused with 400: not authentic
            return False
        return bool(response["data"]["valid"])


@dataclass(frozen=True)
class Checkpoint:
    last_id: int
    rows: int
    row_hash: str
    created_at: str
    key: str
    hmac: str = field(default="", compare=False)

    def message(self) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if k != "hmac"}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def default_checkpoints_path() -> Path:
    """Where the checkpoint task writes: ``$KEYROTATION_LEDGER_CHECKPOINTS``, else
    ``$KEYROTATION_HOME/ledger-checkpoints.jsonl``."""
    return checkpoints_path() or home_dir() / "ledger-checkpoints.jsonl"


def checkpoints_path(path: str | Path | None = None) -> Path | None:
    """``path``, else ``$KEYROTATION_LEDGER_CHECKPOINTS``; None when neither is set (anchoring not configured)."""
    value = path or os.environ.get(CHECKPOINTS_ENV)
    return Path(value) if value else None


def _head(ledger: Ledger) -> tuple[int, int, str]:
    with ledger.db.connect() as conn:
        count, last = conn.execute(sa.select(sa.func.count(), sa.func.max(events.c.id))).one()
        row_hash = conn.execute(sa.select(events.c.row_hash).where(events.c.id == last)).scalar() if last else ""
    return int(last or 0), int(count), row_hash or ""


def write_checkpoint(ledger: Ledger, anchor: TransitAnchor, path: str | Path) -> Checkpoint:
    """Append a checkpoint of the chain's head to ``path``, HMAC'd by ``anchor``."""
    last_id, rows, row_hash = _head(ledger)
    unsigned = Checkpoint(last_id, rows, row_hash, datetime.now(UTC).isoformat(timespec="seconds"), anchor.name)
    checkpoint = Checkpoint(**{**asdict(unsigned), "hmac": anchor.mac(unsigned.message())})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps(asdict(checkpoint), sort_keys=True) + "\n")
    return checkpoint


@dataclass(frozen=True)
class AnchorCheck:
    status: str  # anchored | missing | forged | cut | rewritten
    message: str


def check_anchor(ledger: Ledger, anchor: TransitAnchor, path: str | Path) -> AnchorCheck:
    """The ledger against the latest checkpoint in ``path``."""
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not lines:
        return AnchorCheck("missing", f"no checkpoint in {path}: the chain's head is anchored nowhere outside the "
                                      "database, so a cut tail or a recomputed chain would go unseen")
    try:
        checkpoint = Checkpoint(**json.loads(lines[-1]))
    except (ValueError, TypeError):
        return AnchorCheck("forged", f"the latest checkpoint in {path} is not a checkpoint: replaced or damaged")
    if not checkpoint.hmac or not anchor.verify(checkpoint.message(), checkpoint.hmac):
        return AnchorCheck("forged", f"the latest checkpoint in {path} (row {checkpoint.last_id}, "
                                     f"{checkpoint.created_at}) does not verify with {anchor.name}: replaced or forged")
    when = f"the checkpoint of {checkpoint.created_at}"
    last_id, rows, _ = _head(ledger)
    with ledger.db.connect() as conn:
        anchored = conn.execute(sa.select(events.c.row_hash).where(events.c.id == checkpoint.last_id)).scalar()
        rows_then = conn.execute(sa.select(sa.func.count()).where(events.c.id <= checkpoint.last_id)).scalar()
    if checkpoint.last_id == 0 and anchored is None:  # a checkpoint of the empty ledger anchors no row
        anchored = ""
    if anchored is None and last_id < checkpoint.last_id:
        return AnchorCheck("cut", f"tail cut: {when} anchors row {checkpoint.last_id} ({checkpoint.rows} rows); "
                                  f"the ledger now ends at row {last_id} ({rows} rows)")
    if anchored != checkpoint.row_hash or rows_then != checkpoint.rows:
        return AnchorCheck("rewritten", f"chain rewritten: {when} anchors row {checkpoint.last_id} with hash "
                                        f"{checkpoint.row_hash[:16]} after {checkpoint.rows} rows; the ledger has "
                                        f"{(anchored or 'no such row')[:16]} after {rows_then} rows")
    return AnchorCheck("anchored", f"row {checkpoint.last_id} matches {when} ({anchor.name}); "
                                   f"{rows - checkpoint.rows} rows since")
