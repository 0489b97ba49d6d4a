"""Least privilege, enforced by OpenBao: each role's token can do its part (and it takes effect) and is
refused the rest, including every parameter that would weaken the key; the DAGs run with exactly those
tokens; the connections can come from a secrets backend (the hashicorp provider's VaultBackend over
OpenBao's KV engine)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hvac
import pytest
from hvac.exceptions import Forbidden, InvalidPath, InvalidRequest

from helpers import AWS_KEY_CLASS_YAML, days, runtime, seed
from keyrotation.backends.vault_transit import KEY_TYPE, VaultTransitBackend
from keyrotation.config import load_key_class
from keyrotation.errors import BackendError
from keyrotation.policies import ROLES, anchor_policies, policies_for

ROOT = Path(__file__).resolve().parents[1]
ROLE_CONNS = {role: f"kr_{role}" for role in ROLES}
CONNECTIONS_YAML = "conn_id: vault_keyrotation\n  connections: {" + ", ".join(
    f"{role}: {conn}" for role, conn in ROLE_CONNS.items()) + "}"
SECRET = b"k" * 32


def role_tokens(vault, config) -> dict[str, str]:
    kc = config.key_class
    tokens = {}
    for role, hcl in policies_for(config).items():
        name = f"keyrotation-{kc.name}-{kc.key_ref}-{role}"
        vault.sys.create_or_update_policy(name=name, policy=hcl)
        tokens[role] = vault.auth.token.create(policies=[name], ttl="1h")["auth"]["client_token"]
    return tokens


def role_clients(vault, openbao, config) -> dict[str, hvac.Client]:
    return {role: hvac.Client(url=openbao.url, token=token) for role, token in role_tokens(vault, config).items()}


def key_config(vault: hvac.Client, key: str) -> dict[str, Any] | None:
    """The key as the root token reads it; None if there is no such key."""
    try:
        return vault.secrets.transit.read_key(key)["data"]
    except InvalidPath:
        return None


def refused(vault: hvac.Client, key: str, call: Callable[[], Any], what: str) -> None:
    """``call`` is refused by the token's policy (HTTP 403), and the key is exactly as it was."""
    before = key_config(vault, key)
    with pytest.raises(Forbidden) as refusal:  # hvac raises Forbidden for HTTP 403 only
        call()
        pytest.fail(f"{what}: allowed")
    assert refusal.value.errors == ["1 error occurred:\n\t* permission denied\n\n"], f"{what}: {refusal.value}"
    assert key_config(vault, key) == before, f"{what}: the key changed"


Op = Callable[[hvac.Client, str, str], Any]
# Every operation on the key, as a caller holding a role's token would try it; the ciphertext is the key's.
OPERATIONS: dict[str, Op] = {
    "read": lambda c, key, ct: c.secrets.transit.read_key(key),
    "create": lambda c, key, ct: c.secrets.transit.create_key(key, key_type=KEY_TYPE),
    "rotate": lambda c, key, ct: c.secrets.transit.rotate_key(key),
    "encrypt": lambda c, key, ct: c.secrets.transit.encrypt_data(key, base64.b64encode(SECRET).decode()),
    "decrypt": lambda c, key, ct: c.secrets.transit.decrypt_data(key, ct),
    "rewrap": lambda c, key, ct: c.secrets.transit.rewrap_data(key, ct),
    "config": lambda c, key, ct: c.secrets.transit.update_key_configuration(key, min_decryption_version=1),
    "trim": lambda c, key, ct: c.secrets.transit.trim_key(key, min_version=1),
    "delete": lambda c, key, ct: c.secrets.transit.delete_key(key),
    "export": lambda c, key, ct: c.secrets.transit.export_key(key, key_type="encryption-key"),
    "backup": lambda c, key, ct: c.secrets.transit.backup_key(key),
    "list": lambda c, key, ct: c.secrets.transit.list_keys(),
    "soft-delete": lambda c, key, ct: c.adapter.post(f"/v1/transit/keys/{key}/soft-delete"),
    "import_version": lambda c, key, ct: c.adapter.post(f"/v1/transit/keys/{key}/import_version",
                                                        json={"ciphertext": ct}),
    "other_key": lambda c, key, ct: c.secrets.transit.read_key("keyrotation-some-other-key"),
}
# What each role may do; each is proven to take effect in the role's own test below.
ALLOWED = {
    "rotate": {"read", "create", "rotate"},
    "reencrypt": {"read", "encrypt", "decrypt", "rewrap"},
    "retire": {"read", "config", "trim"},
    "report": {"read"},
}


def _post(suffix: str, body: dict[str, Any]) -> Op:
    return lambda c, key, ct: c.adapter.post(f"/v1/transit/keys/{key}{suffix}", json=body)


def _create(**options: Any) -> Op:
    """Create the key (a POST to its path) with ``options``; sent as JSON, since hvac checks key types itself."""
    return _post("", {"type": KEY_TYPE, **options})


def _config(**options: Any) -> Op:
    return lambda c, key, ct: c.secrets.transit.update_key_configuration(key, **options)


# What would weaken the key, with what it does to the key when a token may send it (the root token, in
# test_the_weakenings_are_real): refused to every role, those whose policy has the path included.
# Lowering a minimum version is not here: no policy can refuse it (test_retire_role_raises_the_minimums_...).
WEAKENINGS: dict[str, tuple[Op, dict[str, Any]]] = {
    "create type aes128-gcm96": (_create(type="aes128-gcm96"), {"type": "aes128-gcm96"}),
    "create type chacha20-poly1305": (_create(type="chacha20-poly1305"), {"type": "chacha20-poly1305"}),
    "create chacha20-poly1305 derived": (_create(type="chacha20-poly1305", derived=True),
                                         {"type": "chacha20-poly1305", "derived": True}),
    "create derived": (_create(derived=True), {"derived": True}),
    "create convergent_encryption": (_create(derived=True, convergent_encryption=True),
                                     {"derived": True, "convergent_encryption": True}),
    "create exportable": (_create(exportable=True), {"exportable": True}),
    "create allow_plaintext_backup": (_create(allow_plaintext_backup=True), {"allow_plaintext_backup": True}),
    "create auto_rotate_period": (_create(auto_rotate_period="1h"), {"auto_rotate_period": 3600}),
    "config exportable": (_config(exportable=True), {"exportable": True}),
    "config allow_plaintext_backup": (_config(allow_plaintext_backup=True), {"allow_plaintext_backup": True}),
    "config deletion_allowed": (_config(deletion_allowed=True), {"deletion_allowed": True}),
    "config auto_rotate_period": (_config(auto_rotate_period="1h"), {"auto_rotate_period": 3600}),
    "config exportable beside a minimum": (_config(min_decryption_version=1, exportable=True), {"exportable": True}),
}
# Parameters the product never sends, which Transit ignores or refuses itself: refused by the policies too.
STRAY: dict[str, Op] = {
    "create Exportable (other case)": _create(Exportable=True),
    "rotate managed_key_name": _post("/rotate", {"managed_key_name": "elsewhere"}),
    "trim with deletion_allowed": _post("/trim", {"min_available_version": 1, "deletion_allowed": True}),
}


def test_the_weakenings_are_real(vault):
    """Each weakening, sent with the root token to a key of its own, changes the key as listed: the 403s below
    refuse something real. (A key made as the product makes it shows none of these values.)"""
    plain = f"lp-plain-{os.getpid()}"
    vault.secrets.transit.create_key(plain, key_type=KEY_TYPE)
    product = key_config(vault, plain)
    for i, (what, (call, effect)) in enumerate(WEAKENINGS.items()):
        key = f"lp-weak-{os.getpid()}-{i}"
        if not what.startswith("create"):
            vault.secrets.transit.create_key(key, key_type=KEY_TYPE)
        call(vault, key, "")
        weakened = key_config(vault, key)
        assert {k: weakened.get(k) for k in effect} == effect, what
        assert {k: product.get(k) for k in effect} != effect, what


def _version_of(ciphertext: str) -> int:
    prefix, version, _ = ciphertext.split(":", 2)
    assert prefix == "vault" and version.startswith("v"), ciphertext
    return int(version[1:])


def _unwrapped(vault: hvac.Client, key: str, ciphertext: str) -> bytes:
    return base64.b64decode(vault.secrets.transit.decrypt_data(key, ciphertext)["data"]["plaintext"])


def _allowed(vault: hvac.Client, client: hvac.Client, key: str, ct: str, operation: str) -> None:
    """``operation`` (from OPERATIONS), done with ``client``'s token, returns what it should and takes effect;
    the root token (``vault``) sets up what it needs first and checks the outcome."""
    before = key_config(vault, key)
    latest = before["latest_version"]
    if operation == "config":  # so that setting min_decryption_version=1 is seen to take effect
        vault.secrets.transit.update_key_configuration(key, min_decryption_version=2)
        before = key_config(vault, key)
    if operation == "trim":  # Transit trims only a key whose min_encryption_version is set
        vault.secrets.transit.update_key_configuration(key, min_encryption_version=1)
        before = key_config(vault, key)
    result = OPERATIONS[operation](client, key, ct)
    after = key_config(vault, key)
    if operation == "read":
        assert result["data"] == before
    elif operation == "rotate":
        assert (after["latest_version"], sorted(after["keys"], key=int)) == \
            (latest + 1, [str(v) for v in range(1, latest + 2)])
    elif operation == "encrypt":
        made = result["data"]["ciphertext"]
        assert _version_of(made) == latest and _unwrapped(vault, key, made) == SECRET
    elif operation == "decrypt":
        assert base64.b64decode(result["data"]["plaintext"]) == SECRET
    elif operation == "rewrap":
        made = result["data"]["ciphertext"]
        assert (_version_of(ct), _version_of(made)) == (1, latest) and latest > 1
        assert _unwrapped(vault, key, made) == SECRET
    elif operation == "config":  # read lists the versions from min_decryption_version on: v1 is back
        assert (before["min_decryption_version"], sorted(before["keys"])) == (2, ["2"])
        assert (after["min_decryption_version"], sorted(after["keys"])) == (1, ["1", "2"])
    elif operation == "trim":
        assert (before["min_available_version"], after["min_available_version"]) == (0, 1)
    else:
        raise AssertionError(f"no check for allowed operation {operation!r}")
    if operation in ("read", "encrypt", "decrypt", "rewrap"):
        assert after == before, f"{operation}: the key changed"
    else:
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        assert changed == {"rotate": {"latest_version", "keys"}, "config": {"min_decryption_version", "keys"},
                           "trim": {"min_available_version"}}[operation], (operation, changed)


@pytest.mark.parametrize("role", ROLES)
def test_each_role_can_do_its_part_and_is_refused_the_rest(make_key_class, vault, openbao, role, record_property):
    rt = runtime(make_key_class(name="lp"), vault)
    key = rt.config.key_class.key_ref
    client = role_clients(vault, openbao, rt.config)[role]
    proven = 0
    if "create" in ALLOWED[role]:  # the role creates the key itself: the type it may ask for, nothing else
        assert key_config(vault, key) is None
        OPERATIONS["create"](client, key, "")
        created = key_config(vault, key)
        assert (created["type"], created["latest_version"], created["exportable"], created["derived"]) == \
            (KEY_TYPE, 1, False, False)
        proven += 1
    else:
        rt.backend.create_key()
    ciphertext = rt.backend.wrap(SECRET)  # under v1; v2 makes a rewrap to the latest version a change
    rt.backend.rotate()
    tried = 0
    weakenings = {what: call for what, (call, _) in WEAKENINGS.items()}
    for operation, call in {**OPERATIONS, **weakenings, **STRAY}.items():
        if operation not in ALLOWED[role]:
            refused(vault, key, lambda call=call: call(client, key, ciphertext), f"role {role}: {operation}")
            tried += 1
    assert tried == len(OPERATIONS) - len(ALLOWED[role]) + len(WEAKENINGS) + len(STRAY)
    for operation in OPERATIONS:
        if operation in ALLOWED[role] and operation != "create":
            _allowed(vault, client, key, ciphertext, operation)
            proven += 1
    assert proven == len(ALLOWED[role])
    record_property("denials", {"backend": "vault_transit", "role": role, "refused": tried, "allowed": proven})


def test_rotate_role_creates_the_key_and_adds_versions(make_key_class, vault, openbao):
    config = make_key_class(name="lprot")
    kc = config.key_class
    key = kc.key_ref
    clients = role_clients(vault, openbao, config)
    for what, (call, _) in WEAKENINGS.items():  # before the key exists: no weak key is created either
        if what.startswith("create"):
            refused(vault, key, lambda call=call: call(clients["rotate"], key, ""), f"rotate role: {what}")
    # Encrypt creates a missing key for a token that may "create" on the path: the reencrypt role may not.
    refused(vault, key, lambda: OPERATIONS["encrypt"](clients["reencrypt"], key, ""), "reencrypt role: encrypt upsert")
    assert key_config(vault, key) is None

    rotate = VaultTransitBackend(clients["rotate"], key)
    assert (rotate.create_key().latest_version, rotate.create_key().latest_version) == (1, 1)
    created = key_config(vault, key)
    assert {k: created[k] for k in ("type", "derived", "exportable", "allow_plaintext_backup", "deletion_allowed",
                                    "auto_rotate_period", "min_decryption_version", "min_encryption_version",
                                    "latest_version")} == {
        "type": "aes256-gcm96", "derived": False, "exportable": False, "allow_plaintext_backup": False,
        "deletion_allowed": False, "auto_rotate_period": 0, "min_decryption_version": 1, "min_encryption_version": 0,
        "latest_version": 1}
    assert "convergent_encryption" not in created  # shown for derived keys only
    assert rotate.rotate() == 2
    rotated = key_config(vault, key)
    assert (rotated["latest_version"], sorted(rotated["keys"])) == (2, ["1", "2"])
    assert {k: v for k, v in rotated.items() if k not in ("keys", "latest_version")} == \
        {k: v for k, v in created.items() if k not in ("keys", "latest_version")}


def test_reencrypt_role_encrypts_decrypts_and_rewraps(make_key_class, vault, openbao):
    config = make_key_class(name="lpre")
    kc = config.key_class
    root = VaultTransitBackend(vault, kc.key_ref)
    root.create_key()
    old = root.wrap(SECRET)
    root.rotate()
    before = key_config(vault, kc.key_ref)
    reencrypt = VaultTransitBackend(role_clients(vault, openbao, config)["reencrypt"], kc.key_ref)

    new = reencrypt.wrap(b"fresh secret")
    assert reencrypt.version_of(new) == 2 and root.unwrap(new) == b"fresh secret"
    pinned = reencrypt.wrap(b"pinned", version=1)
    assert reencrypt.version_of(pinned) == 1 and root.unwrap(pinned) == b"pinned"
    assert reencrypt.unwrap(old) == SECRET
    rewrapped = reencrypt.rewrap([old, pinned])
    assert [reencrypt.version_of(c) for c in rewrapped] == [2, 2]
    assert [root.unwrap(c) for c in rewrapped] == [SECRET, b"pinned"]
    assert key_config(vault, kc.key_ref) == before  # using the key changes nothing about it


def test_retire_role_raises_the_minimums_and_trims(make_key_class, vault, openbao, monkeypatch):
    config = make_key_class(name="lpret")
    kc = config.key_class
    key = kc.key_ref
    root = VaultTransitBackend(vault, key)
    root.create_key()
    old = root.wrap(SECRET)
    root.rotate()
    root.rotate()
    clients = role_clients(vault, openbao, config)
    retire = VaultTransitBackend(clients["retire"], key)

    state = retire.retire_below(2)
    config = key_config(vault, key)
    assert (state.min_encryption_version, state.min_decryption_version) == (2, 2)
    assert (config["min_encryption_version"], config["min_decryption_version"], config["min_available_version"],
            sorted(config["keys"])) == (2, 2, 0, ["2", "3"])  # v1 no longer usable, not trimmed
    with pytest.raises(InvalidRequest, match=r"ciphertext or signature version is disallowed by policy \(too old\)"):
        vault.secrets.transit.decrypt_data(key, old)

    # Lowering a minimum: the policy cannot refuse it (it limits parameters, not how a value compares with
    # the key), so the retire task refuses it itself, before sending anything.
    def lowering(asked: int, lowered: str) -> None:
        before = key_config(vault, key)
        with pytest.raises(BackendError) as refusal:
            retire.retire_below(asked)
        assert str(refusal.value) == (f"Transit key {key!r}: refusing to retire below v{asked}: {lowered}; a "
                                      "minimum version is never lowered")
        assert key_config(vault, key) == before

    lowering(1, "min_encryption_version is already v2, min_decryption_version is already v2")
    vault.secrets.transit.update_key_configuration(key, min_encryption_version=3)  # e.g. by an operator
    lowering(2, "min_encryption_version is already v3")
    vault.secrets.transit.update_key_configuration(key, min_encryption_version=0)  # 0: no minimum
    lowering(1, "min_decryption_version is already v2")
    vault.secrets.transit.update_key_configuration(key, min_encryption_version=2)

    # ... and reads both back after the update: here the same token lowers min_decryption_version right
    # after the task raised it (OpenBao allows it), and the task fails instead of reporting v3 retired.
    transit = retire._transit
    update = transit.update_key_configuration

    def then_lowered(name: str, **kwargs: Any) -> Any:
        done = update(name, **kwargs)
        if kwargs.get("min_decryption_version") == 3:
            update(key, min_decryption_version=2)
        return done

    monkeypatch.setattr(transit, "update_key_configuration", then_lowered)
    with pytest.raises(BackendError) as lowered:
        retire.retire_below(3)
    assert str(lowered.value) == (f"Transit key {key!r}: retiring below v3 is not in effect after the update: "
                                  "min_decryption_version is v2, not v3 (changed meanwhile by another token?)")
    monkeypatch.undo()

    state = retire.retire_below(3, trim=True)
    config = key_config(vault, key)
    assert (state.min_encryption_version, state.min_decryption_version, state.min_available_version) == (3, 3, 3)
    assert (config["min_encryption_version"], config["min_decryption_version"], config["min_available_version"],
            sorted(config["keys"])) == (3, 3, 3, ["3"])
    with pytest.raises(InvalidRequest):  # v1 and v2 are gone: not even the root token can bring them back
        vault.secrets.transit.update_key_configuration(key, min_decryption_version=2)
    assert key_config(vault, key) == config


def test_report_role_reads_the_key(make_key_class, vault, openbao):
    config = make_key_class(name="lprep")
    kc = config.key_class
    root = VaultTransitBackend(vault, kc.key_ref)
    root.create_key()
    root.rotate()
    report = VaultTransitBackend(role_clients(vault, openbao, config)["report"], kc.key_ref)
    assert report.key_state() == root.key_state()
    assert (report.key_state().latest_version, sorted(report.key_state().versions)) == (2, [1, 2])


def _policies_cli(name: str, config_dir: Path | None = None, *options: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"KEYROTATION_CONFIG_DIR": str(config_dir)} if config_dir else {})}
    return subprocess.run([sys.executable, "-m", "keyrotation.policies", name, *options], cwd=ROOT / "include",
                          env=env, capture_output=True, text=True, timeout=60)


def test_policies_cli(make_key_class, tmp_path):
    config = make_key_class(name="lpcli")
    printed = _policies_cli("lpcli")
    assert printed.returncode == 0, printed.stderr
    for role, hcl in policies_for(config).items():
        assert f"# keyrotation-lpcli-{role}: Airflow connection 'vault_keyrotation'\n{hcl}" in printed.stdout

    # A key class that does not exist, and one on another KMS: one line on stderr, exit code 2.
    missing = _policies_cli("lp_no_such_class", tmp_path)
    assert (missing.returncode, missing.stdout) == (2, "")
    assert missing.stderr == f"error: {tmp_path / 'lp_no_such_class.yaml'}: key class config file not found\n"
    (tmp_path / "lpcli_aws.yaml").write_text(AWS_KEY_CLASS_YAML.format(
        name="lpcli_aws", key_ref="alias/lpcli-aws", conn_id="aws_keyrotation", strategy="alias", mode="rewrap",
        chunk_size=16, dataset="lpcli_aws_data", location="s3://keyrotation-data/lpcli"))
    other = _policies_cli("lpcli_aws", tmp_path)
    assert (other.returncode, other.stdout) == (2, "")
    assert other.stderr == "error: key class 'lpcli_aws' (aws_kms): the AWS account id is needed (--account)\n"
    # With what the key class does not say, the same command prints the AWS documents of every role.
    aws = _policies_cli("lpcli_aws", tmp_path, "--account", "123456789012", "--region", "eu-west-1")
    assert aws.returncode == 0, aws.stderr
    aws_config = load_key_class("lpcli_aws", tmp_path)
    assert json.loads(aws.stdout) == policies_for(aws_config, account="123456789012", region="eu-west-1")
    assert json.loads(aws.stdout)["reencrypt"]["Statement"][0]["Condition"] == {
        "StringEquals": {"aws:ResourceTag/keyrotation:key-class": "lpcli_aws"}}
    anchor = _policies_cli("--anchor")
    assert anchor.returncode == 0, anchor.stderr
    for name, hcl in anchor_policies("keyrotation-ledger-anchor").items():
        header = f"# keyrotation-ledger-{name}: the ledger's anchor key 'keyrotation-ledger-anchor'"
        assert f"{header}\n{hcl}" in anchor.stdout


@pytest.mark.airflow
def test_the_dags_run_with_exactly_the_role_tokens(make_key_class, vault, openbao, airflow_db, monkeypatch, tmp_path):
    from keyrotation_airflow.operators.report import ComplianceReportOperator
    from keyrotation_factory import key_class_dags

    rt = runtime(make_key_class(name="lpdag", dataset="lpdag_data",
                                **{"conn_id: vault_keyrotation": CONNECTIONS_YAML}), vault)
    tokens = role_tokens(vault, rt.config)
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
    tokens = role_tokens(vault, rt.config)
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


def test_anchor_policies_hmac_and_verify_and_nothing_else(vault, openbao):
    """The ledger's anchor key: the writer's token HMACs (and the HMAC verifies), the verifier's token reads the
    key and verifies; each is refused every other operation, a hash algorithm other than sha2-256 and any
    other key with 403."""
    from keyrotation.anchoring import TransitAnchor

    key = f"anchor-lp-{os.urandom(4).hex()}"
    vault.secrets.transit.create_key(key, key_type=KEY_TYPE)  # as make up does, with the root token
    ct = vault.secrets.transit.encrypt_data(key, base64.b64encode(SECRET).decode())["data"]["ciphertext"]
    clients = {}
    for name, hcl in anchor_policies(key).items():
        vault.sys.create_or_update_policy(name=f"{key}-{name}", policy=hcl)
        token = vault.auth.token.create(policies=[f"{key}-{name}"], no_default_policy=True, ttl="1h")
        clients[name] = hvac.Client(url=openbao.url, token=token["auth"]["client_token"])
    writer = TransitAnchor(clients["anchor-writer"], key)
    verifier = TransitAnchor(clients["anchor-verifier"], key)

    mac = writer.mac(b"head")
    assert mac.startswith("vault:v1:")
    assert verifier.verify(b"head", mac) and not verifier.verify(b"other head", mac)
    assert verifier.client.secrets.transit.read_key(key)["data"]["name"] == key
    verifier.ensure_key()  # reads it: exists, nothing to create

    b64 = base64.b64encode(b"head").decode()
    anchor_ops: dict[str, Op] = {
        "hmac": lambda c, k, _: c.secrets.transit.generate_hmac(k, b64, algorithm="sha2-256"),
        "hmac-sha512": lambda c, k, _: c.secrets.transit.generate_hmac(k, b64, algorithm="sha2-512"),
        "verify": lambda c, k, _: c.secrets.transit.verify_signed_data(k, b64, hmac=mac, hash_algorithm="sha2-256"),
        "verify-sha512": lambda c, k, _: c.secrets.transit.verify_signed_data(k, b64, hmac=mac,
                                                                              hash_algorithm="sha2-512"),
        "other-hmac": lambda c, k, _: c.secrets.transit.generate_hmac("keyrotation-some-other-key", b64),
    }
    allowed = {"anchor-writer": {"hmac"}, "anchor-verifier": {"read", "verify"}}
    for name, client in clients.items():
        for op, call in {**OPERATIONS, **anchor_ops}.items():
            if op not in allowed[name]:
                refused(vault, key, lambda call=call, client=client: call(client, key, ct), f"{name}: {op}")
