"""Least privilege, enforced by OpenBao: each role's token can do its part and is refused the rest;
the DAGs run with exactly those tokens; the connections can come from a secrets backend (the
hashicorp provider's VaultBackend over OpenBao's KV engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hvac
import pytest
from hvac.exceptions import Forbidden, VaultError

from helpers import days, runtime, seed
from keyrotation.policies import ROLES, policies_for

ROOT = Path(__file__).resolve().parents[1]
ROLE_CONNS = {role: f"kr_{role}" for role in ROLES}
CONNECTIONS_YAML = "conn_id: vault_keyrotation\n  connections: {" + ", ".join(
    f"{role}: {conn}" for role, conn in ROLE_CONNS.items()) + "}"

# What each role may do with its key class's Transit key; everything else must be refused.
ALLOWED = {
    "rotate": {"read", "create", "rotate"},
    "reencrypt": {"read", "encrypt", "decrypt", "rewrap"},
    "retire": {"read", "config", "trim"},
    "report": {"read"},
}
OPERATIONS = ["read", "create", "rotate", "encrypt", "decrypt", "rewrap", "config", "trim", "delete",
              "export", "other_key"]


def role_tokens(vault, kc) -> dict[str, str]:
    tokens = {}
    for role, hcl in policies_for(kc).items():
        name = f"keyrotation-{kc.name}-{kc.key_ref}-{role}"
        vault.sys.create_or_update_policy(name=name, policy=hcl)
        tokens[role] = vault.auth.token.create(policies=[name], ttl="1h")["auth"]["client_token"]
    return tokens


def attempt(client: hvac.Client, key: str, ciphertext: str, operation: str) -> bool:
    """True if OpenBao let the operation through (a refusal other than 403 counts as let through)."""
    transit = client.secrets.transit
    calls = {
        "read": lambda: transit.read_key(key),
        "create": lambda: transit.create_key(key),
        "rotate": lambda: transit.rotate_key(key),
        "encrypt": lambda: transit.encrypt_data(key, "AAAA"),
        "decrypt": lambda: transit.decrypt_data(key, ciphertext),
        "rewrap": lambda: transit.rewrap_data(key, ciphertext),
        "config": lambda: transit.update_key_configuration(key, min_decryption_version=1),
        "trim": lambda: transit.trim_key(key, min_version=1),
        "delete": lambda: transit.delete_key(key),
        "export": lambda: transit.export_key(key, key_type="encryption-key"),
        "other_key": lambda: transit.read_key("keyrotation-some-other-key"),
    }
    try:
        calls[operation]()
    except Forbidden:
        return False
    except VaultError:
        return True  # authorised, refused for another reason (e.g. trim below a zero minimum)
    return True


def test_each_role_is_refused_what_it_must_not_do(make_key_class, vault, openbao):
    rt = runtime(make_key_class(name="lp"), vault)
    rt.backend.create_key()
    ciphertext = rt.backend.wrap(b"k" * 32)
    tokens = role_tokens(vault, rt.config.key_class)
    verified = 0
    for role, token in tokens.items():
        client = hvac.Client(url=openbao.url, token=token)
        for operation in OPERATIONS:
            assert attempt(client, rt.config.key_class.key_ref, ciphertext, operation) == (
                operation in ALLOWED[role]), f"role {role}, operation {operation}"
            verified += 1
    assert verified == len(ROLES) * len(OPERATIONS)


@pytest.mark.airflow
def test_the_dags_run_with_exactly_the_role_tokens(make_key_class, vault, openbao, airflow_db, monkeypatch, tmp_path):
    from keyrotation_airflow.operators.report import ComplianceReportOperator
    from keyrotation_factory import key_class_dags

    rt = runtime(make_key_class(name="lpdag", dataset="lpdag_data",
                                **{"conn_id: vault_keyrotation": CONNECTIONS_YAML}), vault)
    tokens = role_tokens(vault, rt.config.key_class)
    for role, conn in ROLE_CONNS.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn.upper()}", json.dumps(
            {"conn_type": "vault", "host": "127.0.0.1", "port": openbao.port, "password": tokens[role]}))
    dags = key_class_dags("lpdag")

    def state(run):
        return getattr(run.state, "value", run.state)

    assert state(dags["rotate__lpdag"].test(run_conf={"force": False, "reason": "test: first version"})) == "success"
    seed(rt, "lpdag_data", days("2024-01-01", 4))
    assert state(dags["rotate__lpdag"].test(run_conf={"force": True, "reason": "least privilege"})) == "success"
    assert state(dags["reencrypt__lpdag_data"].test(run_conf={"scope": "sweep", "dry_run": False})) == "success"
    assert state(dags["retire__lpdag"].test()) == "success"
    assert rt.backend.key_state().min_decryption_version == 2
    report = ComplianceReportOperator(task_id="r", output_dir=str(tmp_path), key_classes=["lpdag"])
    assert Path(report.execute({})["html"]).exists()

    # With the report token in the rotate role's place, the rotation is refused by OpenBao.
    monkeypatch.setenv("AIRFLOW_CONN_KR_ROTATE", json.dumps(
        {"conn_type": "vault", "host": "127.0.0.1", "port": openbao.port, "password": tokens["report"]}))
    failed = dags["rotate__lpdag"].test(run_conf={"force": True, "reason": "wrong token"})
    assert state(failed) == "failed"
    assert rt.backend.key_state().latest_version == 2
    from airflow.models.taskinstance import TaskInstance
    from airflow.settings import Session

    ti = Session().query(TaskInstance).filter_by(dag_id=failed.dag_id, run_id=failed.run_id,
                                                task_id="rotate_key").one()
    assert ti.try_number == 1  # a policy refusal is not retried


@pytest.mark.airflow
def test_connections_from_the_vault_secrets_backend(make_key_class, vault, openbao, airflow_db):
    """`airflow dags test` with no connection in the environment: all come from OpenBao's KV engine."""
    rt = runtime(make_key_class(name="lpsb", dataset="lpsb_data",
                                **{"conn_id: vault_keyrotation": CONNECTIONS_YAML}), vault)
    tokens = role_tokens(vault, rt.config.key_class)
    for role, conn in ROLE_CONNS.items():
        vault.secrets.kv.v2.create_or_update_secret(
            path=f"keyrotation-test/connections/{conn}", mount_point="secret",
            secret={"conn_uri": f"vault://:{tokens[role]}@127.0.0.1:{openbao.port}?auth_type=token"})
    vault.sys.create_or_update_policy(name="airflow-secrets-reader", policy=(
        'path "secret/data/keyrotation-test/connections/*" {\n  capabilities = ["read"]\n}\n'))
    reader = vault.auth.token.create(policies=["airflow-secrets-reader"], ttl="1h")["auth"]["client_token"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env.update({
        "AIRFLOW__SECRETS__BACKEND": "airflow.providers.hashicorp.secrets.vault.VaultBackend",
        "AIRFLOW__SECRETS__BACKEND_KWARGS": json.dumps({
            "connections_path": "keyrotation-test/connections", "variables_path": None, "config_path": None,
            "mount_point": "secret", "url": openbao.url, "token": reader, "kv_engine_version": 2}),
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("include", "plugins", "dags")),
    })
    done = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "dags", "test", "rotate__lpsb", "--conf",
         json.dumps({"force": False, "reason": "from the secrets backend"})],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert rt.backend.key_state().latest_version == 1  # the key was created through the rotate token
    assert tokens["rotate"] not in done.stdout + done.stderr
