"""An independent oracle: what the product wrote, read back with none of the product's code.

Parquet partitions are read the way any PME reader would read them: the partition's manifest
(``_PARTITION.json``, its documented layout), pyarrow's own ``CryptoFactory`` with external key
material, and a ``KmsClient`` of its own that calls the Transit HTTP API with ``requests``. Which
master key version protects a file is read from its key material (``vault:vN:`` of each wrapped KEK)
and proven by the KMS, which decrypts a wrapped KEK only with the version that made it. The ledger
and Airflow's metadata database are read with plain SQL. Nothing here imports ``keyrotation``.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
import requests
import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MANIFEST = "_PARTITION.json"
MATERIAL = "_KEY_MATERIAL_FOR_{}.json"
TRANSIT_VERSION = re.compile(r"^vault:v(\d+):")
PARTITION_EVENTS = ("partition_written", "partition_rewrapped", "partition_reencrypted", "partition_reconciled")


class TransitKms(pe.KmsClient):
    """Unwraps with Transit ``decrypt`` over HTTP: the wrapped key is a Transit ciphertext of the key's
    base64 (the documented double-wrapping layout); the master key identifier is the Transit key's name."""

    def __init__(self, addr: str, token: str, mount: str = "transit") -> None:
        super().__init__()
        self.addr, self.token, self.mount = addr.rstrip("/"), token, mount
        self.calls = 0

    def _post(self, path: str, body: dict) -> dict:
        self.calls += 1
        resp = requests.post(f"{self.addr}/v1/{self.mount}/{path}", json=body,
                             headers={"X-Vault-Token": self.token}, timeout=30)
        if resp.status_code != 200:
            raise RuntimeError(f"Transit {path}: HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json()["data"]

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        raise RuntimeError("the oracle only reads")

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        data = self._post(f"decrypt/{master_key_identifier}", {"ciphertext": wrapped_key})
        return base64.b64decode(data["plaintext"])

    def key(self, name: str) -> dict:
        resp = requests.get(f"{self.addr}/v1/{self.mount}/keys/{name}", headers={"X-Vault-Token": self.token},
                            timeout=30)
        resp.raise_for_status()
        return resp.json()["data"]


@dataclass
class PartitionFacts:
    partition: str
    files: list[str]
    versions: frozenset[int]  # master key versions of every wrapped KEK of the live files
    master_keys: frozenset[str]
    rows: int
    bytes: int  # the live data files' sizes on disk
    table: pa.Table


def _read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def _material_versions(fs: pafs.FileSystem, path: str) -> tuple[set[int], set[str]]:
    versions, keys = set(), set()
    for text in json.loads(_read_text(fs, path)).values():
        material = json.loads(text)
        keys.add(material["masterKeyID"])
        wrapped = material["wrappedKEK"] if material.get("doubleWrapping") else material["wrappedDEK"]
        match = TRANSIT_VERSION.match(wrapped)
        if not match:
            raise AssertionError(f"{path}: wrapped key {wrapped[:12]}... is not a Transit ciphertext")
        versions.add(int(match.group(1)))
    return versions, keys


def read_partition(directory: str | Path, kms: TransitKms, fs: pafs.FileSystem | None = None) -> PartitionFacts:
    """The partition's live files (as its manifest names them), decrypted through the KMS; ``directory`` on
    ``fs`` (a pyarrow filesystem: local by default, S3 or GCS as pyarrow reaches them)."""
    fs = fs or pafs.LocalFileSystem()
    directory = str(directory).rstrip("/")
    manifest = json.loads(_read_text(fs, f"{directory}/{MANIFEST}"))
    factory = pe.CryptoFactory(lambda _config: kms)
    tables, versions, keys, size = [], set(), set(), 0
    for name in manifest["files"]:
        path = f"{directory}/{name}"
        found, masters = _material_versions(fs, f"{directory}/{MATERIAL.format(name)}")
        versions |= found
        keys |= masters
        props = factory.file_decryption_properties(pe.KmsConnectionConfig(), pe.DecryptionConfiguration(), path, fs)
        # By path and filesystem: from an open file, pyarrow 26 deadlocks on a GcsFileSystem when the Python
        # KmsClient is called for the footer key.
        tables.append(pq.read_table(path, filesystem=fs, decryption_properties=props))
        size += fs.get_file_info(path).size
    table = pa.concat_tables(tables) if tables else pa.table({})
    return PartitionFacts(directory.rsplit("/", 1)[-1].split("=", 1)[1], list(manifest["files"]),
                          frozenset(versions), frozenset(keys), table.num_rows, size, table)


def read_dataset(root: str | Path, kms: TransitKms, fs: pafs.FileSystem | None = None) -> dict[str, PartitionFacts]:
    """Every ``<key>=<value>`` partition folder under ``root``."""
    fs = fs or pafs.LocalFileSystem()
    root = str(root).rstrip("/")
    folders = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                     if "=" in i.path.rsplit("/", 1)[-1] and i.path.rsplit("/", 1)[0] == root
                     and not i.path.rsplit("/", 1)[-1].startswith((".", "_")))
    if not folders:  # object stores without folder markers: from the object names
        folders = sorted({f"{root}/{i.path[len(root) + 1:].split('/', 1)[0]}"
                          for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                          if "/" in i.path[len(root) + 1:]})
    return {facts.partition: facts for facts in (read_partition(d, kms, fs) for d in folders)}


def assert_source(root: str | Path, kms: TransitKms, source: dict[str, pa.Table], versions: set[int],
                  fs: pafs.FileSystem | None = None) -> dict[str, PartitionFacts]:
    """Every partition under ``root`` decrypts, through the KMS, to the rows generated for it (``source``), with
    its keys under ``versions`` only; the facts read."""
    facts = read_dataset(root, kms, fs)
    assert sorted(facts) == sorted(source)
    for partition, got in facts.items():
        assert got.versions <= versions, (partition, got.versions)
        assert same_rows(got.table, source[partition]), partition
    return facts


def same_rows(got: pa.Table, source: pa.Table) -> bool:
    """The same rows (as values, in any order) with the same columns."""
    if sorted(got.column_names) != sorted(source.column_names) or got.num_rows != source.num_rows:
        return False
    order = sorted(source.column_names)

    def canonical(table: pa.Table) -> list[tuple]:
        cols = [table.column(c).to_pylist() for c in order]
        return sorted(zip(*cols, strict=True), key=repr)

    return canonical(got) == canonical(source)


# -- the ledger and Airflow's metadata, by SQL ------------------------------------------------------

def aware(text: str | None) -> datetime | None:
    if not text:
        return None
    when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def sql_rows(db: str | Path, query: str, params: Iterable = ()) -> list[dict]:
    # Not read-only: after a process was killed mid-transaction, SQLite rolls its hot journal back on the next
    # read, which a read-only connection refuses ("attempt to write a readonly database").
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(query, tuple(params)).fetchall()]


def ledger_events(db: str | Path, key_class: str | None = None, events: Iterable[str] | None = None) -> list[dict]:
    where, params = [], []
    if key_class is not None:
        where.append("key_class = ?")
        params.append(key_class)
    if events is not None:
        events = list(events)
        where.append(f"event IN ({','.join('?' * len(events))})")
        params.extend(events)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return sql_rows(db, f"SELECT * FROM ledger_events{clause} ORDER BY id", params)


def ledger_partition_counts(db: str | Path, key_class: str, when: datetime) -> dict[int, int]:
    """Partitions per version of ``key_class`` as of ``when``: each partition's last successful change."""
    latest: dict[tuple[str, str], int] = {}
    for row in ledger_events(db, key_class, PARTITION_EVENTS):
        if row["status"] == "ok" and row["to_version"] is not None and aware(row["recorded_at"]) <= when:
            latest[(row["dataset"], row["partition"])] = int(row["to_version"])
    counts: dict[int, int] = {}
    for version in latest.values():
        counts[version] = counts.get(version, 0) + 1
    return counts


def changes_per_partition(db: str | Path) -> dict[str, int]:
    """How many times the ledger records each partition changed (re-wrapped, re-encrypted or reconciled)."""
    counts: dict[str, int] = {}
    for row in ledger_events(db, events=("partition_rewrapped", "partition_reencrypted", "partition_reconciled")):
        counts[row["partition"]] = counts.get(row["partition"], 0) + 1
    return counts


def days(delta: timedelta) -> float:
    return round(delta.total_seconds() / 86400, 1)


# -- the plaintext keys of a file, recovered from its key material --------------------------------------------

@dataclass
class FileKeys:
    """The plaintext keys of one PME file: its KEKs (by key encryption key id) and its DEKs (by key id:
    ``footerKey``, ``columnKey0``...)."""

    keks: dict[str, bytes]
    deks: dict[str, bytes]


def unwrap_local(wrapped: str, kek: bytes, kek_id: str) -> bytes:
    """A key wrapped locally by parquet-cpp's KeyToolkit (``EncryptKeyLocally``): base64 of AES-GCM's
    12-byte nonce, the ciphertext and the 16-byte tag, no length prefix; the additional authenticated data is
    the KEK's identifier as bytes (the base64-decoded ``keyEncryptionKeyID``). AES-GCM authenticates only
    with the right key and AAD, so a key returned here is the one the file was written with."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    blob = base64.b64decode(wrapped)
    return AESGCM(kek).decrypt(blob[:12], blob[12:], base64.b64decode(kek_id))


def file_keys(material: str | bytes | dict, unwrap) -> FileKeys:  # noqa: ANN001
    """The KEKs and DEKs of a file from its key material (the ``_KEY_MATERIAL_FOR_*.json`` map of key id to
    the JSON of each key's material), with ``unwrap(wrapped, master_key_id) -> bytes`` for what the KMS
    wrapped (``TransitKms.unwrap_key``, or a backend's ``unwrap`` in a lambda). Double wrapping: the KMS
    wrapped each KEK, the KEK wrapped the DEK locally; single wrapping: the KMS wrapped the DEK."""
    entries = json.loads(material) if isinstance(material, str | bytes) else material
    keks: dict[str, bytes] = {}
    deks: dict[str, bytes] = {}
    for key_id, text in entries.items():
        m = json.loads(text) if isinstance(text, str) else text
        assert m.get("keyMaterialType") == "PKMT1", f"{key_id}: unknown key material type {m.get('keyMaterialType')}"
        if not m.get("doubleWrapping"):
            deks[key_id] = unwrap(m["wrappedDEK"], m["masterKeyID"])
            continue
        kek_id = m["keyEncryptionKeyID"]
        if kek_id not in keks:
            keks[kek_id] = unwrap(m["wrappedKEK"], m["masterKeyID"])
        deks[key_id] = unwrap_local(m["wrappedDEK"], keks[kek_id], kek_id)
    return FileKeys(keks, deks)


def partition_keys(directory: str | Path, unwrap, fs: pafs.FileSystem | None = None) -> dict[str, FileKeys]:  # noqa: ANN001
    """The plaintext keys of every live file of a partition (as its manifest names them), by file name."""
    fs = fs or pafs.LocalFileSystem()
    directory = str(directory).rstrip("/")
    manifest = json.loads(_read_text(fs, f"{directory}/{MANIFEST}"))
    return {name: file_keys(_read_text(fs, f"{directory}/{MATERIAL.format(name)}"), unwrap)
            for name in manifest["files"]}


# -- SQL values: the envelope read from its documented layout --------------------------------------

ENVELOPE_MAGIC = b"KRE"


def open_envelope(value: bytes, keys: dict[bytes, bytes], table: str, column: str, pk: object) -> bytes:
    """``KRE | version 1 | len(key class) | key class | data key id (16) | nonce (12) | AES-256-GCM``, with the
    header, a zero byte and ``table\\0column\\0pk`` as associated data (README, "Encrypted columns")."""
    value = bytes(value)
    assert value[:3] == ENVELOPE_MAGIC and value[3] == 1, value[:8]
    name_end = 5 + value[4]
    key_id, nonce = value[name_end:name_end + 16], value[name_end + 16:name_end + 28]
    header = value[:name_end + 28]
    aad = header + b"\x00" + f"{table}\x00{column}\x00{pk}".encode()
    return AESGCM(keys[key_id]).decrypt(nonce, value[len(header):], aad)


def sql_plaintexts(url: str, table: str, columns: list[str], kms: TransitKms, key_name: str,
                   pk: str = "id") -> dict[object, tuple]:
    """Every row's values of ``columns`` (bytes), decrypted with the data keys of ``keyrotation_data_keys``, each
    unwrapped by the KMS (a Transit ciphertext of the key's base64) when a value needs it."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            wrapped = {bytes(r.key_id): r.wrapped for r in conn.execute(
                sa.text("SELECT key_id, wrapped FROM keyrotation_data_keys WHERE table_name = :t"), {"t": table})}
            rows = conn.execute(sa.text(f"SELECT {pk}, {', '.join(columns)} FROM {table}")).fetchall()
    finally:
        engine.dispose()

    class Keys(dict):
        def __missing__(self, key_id: bytes) -> bytes:
            self[key_id] = kms.unwrap_key(wrapped[key_id], key_name)
            return self[key_id]

    keys = Keys()
    return {row[0]: tuple(None if v is None else open_envelope(v, keys, table, c, row[0])
                          for c, v in zip(columns, row[1:], strict=True)) for row in rows}
