"""Key class config: validation errors name the file, the key class and the field."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from keyrotation.config import (
    ROLE_CONNECTIONS_ENV,
    list_key_classes,
    load_key_class,
    load_key_class_file,
    parse_duration,
)
from keyrotation.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[1] / "include" / "config" / "key_classes"
GOOD = """\
key_class:
  name: pii
  backend: vault_transit
  key_ref: pii
  conn_id: vault_default
  rotation: {cryptoperiod: 90d}
datasets:
  - name: customers
    location: ${DATA_ROOT:-/data}/customers
    encrypted_columns: [email]
"""


def write(tmp_path: Path, text: str, name: str = "pii") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_shipped_key_classes_are_valid():
    assert list_key_classes(SHIPPED) == ["customer_pii", "payment_tokens"]
    for name in list_key_classes(SHIPPED):
        config = load_key_class(name, SHIPPED)
        assert config.key_class.name == name and config.datasets


def test_defaults_and_env_expansion(tmp_path, monkeypatch):
    config = load_key_class_file(write(tmp_path, GOOD))
    kc = config.key_class
    assert kc.rotation.due_after == timedelta(days=90)
    assert kc.reencryption.mode == "rewrap"
    assert kc.retire.grace_period == timedelta(days=7) and kc.retire.versions_kept == 1
    assert config.dataset("customers").location == "/data/customers"
    monkeypatch.setenv("DATA_ROOT", "/mnt/lake")
    assert load_key_class_file(write(tmp_path, GOOD)).dataset("customers").location == "/mnt/lake/customers"


def test_chunks_are_sized_by_work_unless_a_chunk_size_is_set(tmp_path):
    policy = load_key_class_file(write(tmp_path, GOOD)).key_class.reencryption
    assert policy.chunk_size is None and policy.chunk_target == timedelta(seconds=60)
    assert "about 1 minute of estimated work" in policy.chunking()
    text = GOOD.replace("rotation: {cryptoperiod: 90d}",
                        "rotation: {cryptoperiod: 90d}\n  reencryption: {chunk_size: 16, chunk_target: 5m}")
    policy = load_key_class_file(write(tmp_path, text)).key_class.reencryption
    assert policy.chunk_size == 16 and policy.chunk_target == timedelta(minutes=5)
    assert policy.chunking() == "16 partitions (reencryption.chunk_size)"
    for name in list_key_classes(SHIPPED):  # the shipped key classes take the default
        assert load_key_class(name, SHIPPED).key_class.reencryption.chunk_size is None


@pytest.mark.parametrize(("old", "new", "field"), [
    ("rotation: {cryptoperiod: 90d}", "rotation: {cryptoperiod: 90d}\n  reencryption: {chunk_target: 5s}",
     "key_class.reencryption.chunk_target"),
    ("rotation: {cryptoperiod: 90d}", "rotation: {cryptoperiod: 90d}\n  reencryption: {chunk_target: 1h}",
     "key_class.reencryption.chunk_target"),
    ("rotation: {cryptoperiod: 90d}", "rotation: {cryptoperiod: 90d}\n  reencryption: {chunk_target: soon}",
     "key_class.reencryption.chunk_target"),
    ("rotation: {cryptoperiod: 90d}", "rotation: {cryptoperiod: 90d}\n  reencryption: {chunk_size: 0}",
     "key_class.reencryption.chunk_size"),
    ("cryptoperiod: 90d", "cryptoperiod: ninety", "key_class.rotation.cryptoperiod"),
    ("backend: vault_transit", "backend: rot13", "key_class.backend"),
    ("rotation: {cryptoperiod: 90d}", "rotation: {cryptoperiod: 90d, rotate_after: 100d}", "key_class.rotation"),
    ("encrypted_columns: [email]", "encrypted_columns: []", "datasets[0].encrypted_columns"),
    ("conn_id: vault_default", "conn_id: vault_default\n  surprise: 1", "key_class.surprise"),
    ("  - name: customers", "  - name: Customers!", "datasets[0].name"),
])
def test_bad_values_name_file_key_class_and_field(tmp_path, old, new, field):
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigError) as err:
        load_key_class_file(path)
    message = str(err.value)
    assert str(path) in message and "key class 'pii'" in message and f"field {field}" in message


def test_other_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_key_class_file(write(tmp_path, "key_class: [unclosed"))
    with pytest.raises(ConfigError, match="must match the file name"):
        load_key_class_file(write(tmp_path, GOOD, name="other"))
    with pytest.raises(ConfigError, match="environment variable NOPE_UNSET is not set"):
        load_key_class_file(write(tmp_path, GOOD.replace("${DATA_ROOT:-/data}", "${NOPE_UNSET}")))
    with pytest.raises(ConfigError, match="config file not found"):
        load_key_class("missing", tmp_path)
    with pytest.raises(ConfigError, match="has no dataset 'orders'"):
        load_key_class_file(write(tmp_path, GOOD)).dataset("orders")


def test_role_connections_listed_else_the_deployment_template_else_conn_id(tmp_path, monkeypatch):
    monkeypatch.delenv(ROLE_CONNECTIONS_ENV, raising=False)
    kc = load_key_class_file(write(tmp_path, GOOD.replace(
        "conn_id: vault_default", "conn_id: vault_default\n  connections: {retire: kr_retire}"))).key_class
    assert [kc.conn_for(role) for role in ("rotate", "retire")] == ["vault_default", "kr_retire"]
    # `make up` names a connection per key class and role without editing the file; listed roles keep theirs.
    monkeypatch.setenv(ROLE_CONNECTIONS_ENV, "{conn_id}_{key_class}_{role}")
    assert [kc.conn_for(role) for role in ("rotate", "report", "retire")] == [
        "vault_default_pii_rotate", "vault_default_pii_report", "kr_retire"]
    monkeypatch.setenv(ROLE_CONNECTIONS_ENV, "{connection}_{role}")
    with pytest.raises(ConfigError, match=f"{ROLE_CONNECTIONS_ENV}=.*not a connection id template.*connection"):
        kc.conn_for("rotate")


@pytest.mark.parametrize(("text", "expected"), [
    ("90d", timedelta(days=90)), ("12h", timedelta(hours=12)), ("2w", timedelta(weeks=2)), (30, timedelta(seconds=30)),
])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["soon", "-5d", -1, True, "5y"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)
