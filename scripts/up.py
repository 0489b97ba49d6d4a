"""`make up` / `make down`: a small real deployment of these DAGs on this machine, every listener on loopback.

``python scripts/up.py`` (``make up``) starts, each in a session (and process group) of its own, with its
output in ``var/up/logs/<name>.log``:

* ``openbao``: OpenBao with integrated storage under ``var/up/openbao`` (keys survive restarts; the unseal
  key and root token in ``var/up/openbao/init.json``, mode 0600, local use only), on 127.0.0.1:8200;
* ``db-migrate`` (once, beside the OpenBao set-up), then ``log-server``, ``api-server``, ``scheduler``
  (LocalExecutor: its workers are its children), ``dag-processor`` and ``triggerer``: Airflow on SQLite,
  UI and REST API on 127.0.0.1:8080.

It writes each key class's role policies (``keyrotation.policies``) to OpenBao, and gives every key
class and role (rotate, reencrypt, retire, report) a token with that role's policy only, periodic (24 h,
renewed every hour while ``make up`` runs), kept in ``var/up/openbao/tokens.json`` (mode 0600). The key
classes reach them through ``$KEYROTATION_ROLE_CONNECTIONS`` (``{conn_id}_{key_class}_{role}``, e.g.
``vault_keyrotation_customer_pii_rotate``), so the shipped key class files are used as they are; the
root token is in no Airflow connection. The ledger's anchor key (``keyrotation-ledger-anchor``) is created,
with its policies (``keyrotation-ledger-anchor-writer``, ``-verifier``) and a periodic token with those
only, for the connection ``keyrotation_anchor`` of the hourly ``ledger_checkpoint`` DAG (checkpoints in
``var/up/ledger-checkpoints.jsonl``). The compliance report reads the run history as the user
``report`` (role viewer: read only) through the connection ``keyrotation_airflow_api``; the passwords of
``admin`` and ``report`` are in ``var/up/airflow/simple_auth_manager_passwords.json.generated`` (0600).
On first start, the demo datasets are written (30 daily partitions each) under the key classes' first
key version. The shipped retire policies apply: a grace period, then a human approval in the UI
(Browse -> Required Actions).

What runs is recorded in ``var/up/up.json``. ``python scripts/up.py down`` (``make down``), Ctrl-C, or a
SIGTERM/SIGHUP to ``make up`` stops all of it: every process of every session it started.

Ports: ``KEYROTATION_UP_API_PORT`` (8080), ``KEYROTATION_BAO_PORT`` (8200), ``KEYROTATION_UP_WORKER_LOG_PORT``
(8793), ``KEYROTATION_UP_TRIGGER_LOG_PORT`` (8794); the folder: ``KEYROTATION_UP_HOME`` (``var/up``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in ("include", "plugins"):
    if str(ROOT / _path) not in sys.path:
        sys.path.insert(0, str(ROOT / _path))

import psutil  # noqa: E402 - a dependency of Airflow itself

from keyrotation_dev.devserver import write_private  # noqa: E402

HOME = Path(os.environ.get("KEYROTATION_UP_HOME", ROOT / "var" / "up")).resolve()
STATE_FILE = HOME / "up.json"
LOGS = HOME / "logs"
AIRFLOW_HOME = HOME / "airflow"
PASSWORDS_FILE = AIRFLOW_HOME / "simple_auth_manager_passwords.json.generated"
TOKENS_FILE = HOME / "openbao" / "tokens.json"
LOOPBACK = "127.0.0.1"
USERS = {"admin": "admin", "report": "viewer"}  # simple auth manager: user -> role
API_CONN_ID = "keyrotation_airflow_api"
ROLE_CONNECTIONS = "{conn_id}_{key_class}_{role}"
#: Lets a role token look itself up (the hashicorp provider does, to check it) and renew itself; nothing else.
TOKEN_SELF_POLICY = "keyrotation-token-self"
#: The ledger_checkpoint DAG's connection to the ledger's anchor key.
ANCHOR_CONN_ID = "keyrotation_anchor"
TOKEN_SELF_HCL = ('path "auth/token/lookup-self" {\n  capabilities = ["read"]\n}\n'
                  'path "auth/token/renew-self" {\n  capabilities = ["update"]\n}\n')
TOKEN_PERIOD = "24h"
RENEW_EVERY = 3600.0
AIRFLOW_COMPONENTS = ("log-server", "api-server", "scheduler", "dag-processor", "triggerer")


def ports() -> dict[str, int]:
    return {"api": int(os.environ.get("KEYROTATION_UP_API_PORT", "8080")),
            "bao": int(os.environ.get("KEYROTATION_BAO_PORT", "8200")),
            "worker_log": int(os.environ.get("KEYROTATION_UP_WORKER_LOG_PORT", "8793")),
            "trigger_log": int(os.environ.get("KEYROTATION_UP_TRIGGER_LOG_PORT", "8794"))}


def policy_name(key_class: str, role: str) -> str:
    return f"keyrotation-{key_class}-{role}"


class Stop(Exception):  # noqa: N818 - not an error: Ctrl-C, SIGTERM (make down) or SIGHUP
    """Asked to stop."""


class ComponentExited(Exception):
    """A component stopped by itself."""


# --- processes: started in sessions of their own, recorded in var/up/up.json, stopped by session ----------


def read_state() -> dict | None:
    try:
        return json.loads(STATE_FILE.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _record(process: psutil.Process) -> dict:
    return {"pid": process.pid, "create_time": process.create_time()}


def _alive(entry: dict | None) -> psutil.Process | None:
    """The recorded process if it is still the one recorded (same pid and start time) and not a zombie."""
    if not entry:
        return None
    try:
        process = psutil.Process(entry["pid"])
        if abs(process.create_time() - entry["create_time"]) > 1 or process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.Error:
        return None


def session_members(sids: set[int], since: float) -> list[psutil.Process]:
    """Live processes in the sessions ``sids`` started since ``since``: each component is a session leader
    (``start_new_session``), and whatever it starts stays in its session, task processes in process groups
    of their own and orphans reparented to init included."""
    members = []
    for process in psutil.process_iter(["create_time", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE or process.info["create_time"] < since - 1:
                continue
            if os.getsid(process.pid) in sids:
                members.append(process)
        except (OSError, psutil.Error):
            continue
    return members


def stop_sessions(leaders: dict[str, dict], since: float, grace: float, reap=None) -> list[str]:  # noqa: ANN001
    """SIGTERM each leader, wait up to ``grace`` s for its whole session to end, then SIGTERM what is
    left, and SIGKILL it 5 s later. Returns what had to be killed."""
    sids = {entry["pid"] for entry in leaders.values()}
    for name, entry in leaders.items():
        process = _alive(entry)
        if process is not None:
            try:
                process.terminate()
            except psutil.Error:
                pass
            print(f"  stopping {name} (pid {entry['pid']})", flush=True)
    killed: list[str] = []
    for step, wait in (("term", grace), ("kill", 5.0), ("gone", 5.0)):
        deadline = time.monotonic() + wait
        while True:
            if reap:
                reap()
            left = session_members(sids, since)
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not left:
            break
        for process in left:
            try:
                if step == "term":
                    process.terminate()
                elif step == "kill":
                    killed.append(f"{process.pid} {' '.join(process.cmdline())[:80]}")
                    process.kill()
            except psutil.Error:
                pass
    return killed


def stop_recorded(state: dict, reap=None, extra_sids: set[int] = frozenset()) -> None:  # noqa: ANN001
    """Stop every session ``state`` records (and ``extra_sids``): Airflow first, then OpenBao."""
    components = dict(state.get("components", {}))
    for sid in extra_sids:
        if all(entry["pid"] != sid for entry in components.values()):
            try:
                components[f"session {sid}"] = _record(psutil.Process(sid))
            except psutil.Error:
                components[f"session {sid}"] = {"pid": sid, "create_time": state["started"]}
    bao = {k: v for k, v in components.items() if k == "openbao"}
    rest = {k: v for k, v in components.items() if k != "openbao"}
    since = state["started"]
    killed = stop_sessions(rest, since, grace=20, reap=reap) + stop_sessions(bao, since, grace=10, reap=reap)
    if killed:
        print("  killed after not stopping in time: " + "; ".join(killed), flush=True)


class Supervisor:
    """The processes ``make up`` started, recorded in the state file as they start."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: list = []
        me = psutil.Process()
        self.state = {"supervisor": _record(me), "started": me.create_time(), "ports": ports(), "components": {}}
        self._save()

    def _save(self) -> None:
        STATE_FILE.write_text(json.dumps(self.state, indent=1) + "\n")

    def adopt(self, name: str, proc: subprocess.Popen) -> None:
        self.procs[name] = proc
        try:
            self.state["components"][name] = _record(psutil.Process(proc.pid))
        except psutil.Error:  # exited already: nothing to stop
            pass
        self._save()

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(LOGS / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(HOME))
        self.adopt(name, proc)
        return proc

    def reap(self) -> None:
        for proc in self.procs.values():
            proc.poll()

    def check(self, names: tuple[str, ...]) -> None:
        for name in names:
            code = self.procs[name].poll()
            if code is not None:
                raise ComponentExited(f"{name} exited with code {code}; its log ends:\n{log_tail(name)}")

    def stop(self) -> None:
        try:  # also whatever started but was not recorded yet when the stop came
            extra = {os.getsid(child.pid) for child in psutil.Process().children(recursive=True)}
        except (OSError, psutil.Error):
            extra = set()
        extra.discard(os.getsid(0))
        stop_recorded(self.state, reap=self.reap, extra_sids=extra)
        for log in self.logs:
            log.close()
        STATE_FILE.unlink(missing_ok=True)


def log_tail(name: str, lines: int = 15) -> str:
    path = LOGS / f"{name}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


# --- OpenBao: role policies and tokens ---------------------------------------------------------------------


def _periodic_token(root, stored: dict[str, dict], conn_id: str, policies: list[str], display_name: str,  # noqa: ANN001
                    meta: dict[str, str]) -> tuple[dict, bool]:
    """The stored token of ``conn_id`` if still valid with exactly ``policies`` (and the self policy), renewed;
    else a new periodic one (the stored one revoked). Returns the entry and whether it is new."""
    from hvac.exceptions import Forbidden, InvalidRequest

    wanted = sorted([*policies, TOKEN_SELF_POLICY])
    entry = stored.get(conn_id)
    if entry:
        try:
            data = root.auth.token.lookup(entry["token"])["data"]
            if sorted(data["policies"]) == wanted and data.get("period"):
                root.auth.token.renew(entry["token"])
                return entry, False
        except (Forbidden, InvalidRequest):  # expired or revoked
            pass
        _revoke(root, entry)
    auth = root.auth.token.create(
        policies=wanted, no_default_policy=True, period=TOKEN_PERIOD, renewable=True, no_parent=True,
        display_name=display_name, meta=meta,
    )["auth"]
    return {"token": auth["client_token"], "accessor": auth["accessor"], **meta, "policies": wanted}, True


def anchor_token(root, stored: dict[str, dict]) -> dict:  # noqa: ANN001
    """The ledger's anchor key (created here, with the root token: the anchor token cannot create it), its
    policies (``keyrotation.policies.anchor_policies``) and a periodic token with both, for the
    ``keyrotation_anchor`` connection of the ``ledger_checkpoint`` DAG."""
    from hvac.exceptions import InvalidPath

    from keyrotation.anchoring import DEFAULT_ANCHOR_KEY
    from keyrotation.backends.vault_transit import KEY_TYPE
    from keyrotation.policies import anchor_policies

    try:
        root.secrets.transit.read_key(DEFAULT_ANCHOR_KEY)
    except InvalidPath:
        root.secrets.transit.create_key(DEFAULT_ANCHOR_KEY, key_type=KEY_TYPE)
    names = []
    for role, hcl in anchor_policies(DEFAULT_ANCHOR_KEY).items():
        names.append(f"keyrotation-ledger-{role}")
        root.sys.create_or_update_policy(name=names[-1], policy=hcl)
    entry, new = _periodic_token(root, stored, ANCHOR_CONN_ID, names, "ledger-anchor", {"role": "ledger-anchor"})
    if new:
        print(f"OpenBao token for the ledger's anchor key (policies {', '.join(names)}): connection "
              f"{ANCHOR_CONN_ID}", flush=True)
    return entry


def served_locally(kc) -> bool:  # noqa: ANN001
    """Whether the local stack's KMS serves key class ``kc``: ``make up`` runs OpenBao, so Transit only."""
    from keyrotation.backends.vault_transit import VaultTransitBackend

    return issubclass(kc.backend_class, VaultTransitBackend)


def role_tokens(bao) -> dict[str, dict]:  # noqa: ANN001
    """Write each key class's role policies and give each key class and role a periodic token with only that
    role's policy (and the right to look itself up and renew itself); likewise the ledger's anchor
    (:func:`anchor_token`). Tokens still valid with the same policies are kept (and renewed); the others are
    revoked and replaced. Returns conn_id -> token entry."""
    from keyrotation.config import list_key_classes, load_key_class
    from keyrotation.policies import policies_for

    root = bao.client()
    root.sys.create_or_update_policy(name=TOKEN_SELF_POLICY, policy=TOKEN_SELF_HCL)
    try:
        stored = json.loads(TOKENS_FILE.read_text())
    except FileNotFoundError:
        stored = {}
    tokens: dict[str, dict] = {}
    for name in list_key_classes():
        config = load_key_class(name)
        kc = config.key_class
        if not served_locally(kc):
            print(f"key class {name}: backend {kc.backend} is not OpenBao, no token for it", flush=True)
            continue
        for role, hcl in policies_for(config).items():
            policy = policy_name(kc.name, role)
            root.sys.create_or_update_policy(name=policy, policy=hcl)
            conn_id = kc.conn_for(role)
            tokens[conn_id], new = _periodic_token(root, stored, conn_id, [policy], f"{kc.name}-{role}",
                                                   {"key_class": kc.name, "role": role})
            if new:
                print(f"OpenBao token for {kc.name}/{role} (policy {policy}): connection {conn_id}", flush=True)
    tokens[ANCHOR_CONN_ID] = anchor_token(root, stored)
    for conn_id, entry in stored.items():
        if conn_id not in tokens:
            _revoke(root, entry)
    write_private(TOKENS_FILE, json.dumps(tokens, indent=1) + "\n")
    return tokens


def _revoke(root, entry: dict) -> None:  # noqa: ANN001
    try:
        root.auth.token.revoke_accessor(entry["accessor"])
    except Exception:  # noqa: BLE001 - gone already
        pass


def renew_tokens(bao, tokens: dict[str, dict]) -> None:  # noqa: ANN001
    import hvac

    for conn_id, entry in tokens.items():
        try:
            hvac.Client(url=bao.url, token=entry["token"]).auth.token.renew_self()
        except Exception as exc:  # noqa: BLE001 - said, and tried again in an hour
            print(f"could not renew the token of connection {conn_id}: {exc} (restart make up if it expired)",
                  flush=True)


# --- Airflow ----------------------------------------------------------------------------------------------


def user_passwords() -> dict[str, str]:
    """The simple auth manager's passwords file, with a password for each of USERS (made here, so that the
    report's connection can name the report user's before the API server starts); mode 0600."""
    try:
        passwords = json.loads(PASSWORDS_FILE.read_text() or "{}")
    except FileNotFoundError:
        passwords = {}
    changed = False
    for user in USERS:
        if user not in passwords:
            passwords[user] = secrets.token_urlsafe(18)
            changed = True
    if changed or not PASSWORDS_FILE.exists():
        write_private(PASSWORDS_FILE, json.dumps(passwords) + "\n")
    os.chmod(PASSWORDS_FILE, 0o600)
    return passwords


def airflow_env(p: dict[str, int]) -> dict[str, str]:
    """The environment of every Airflow component; settings that keep listeners on loopback are forced."""
    api_url = f"http://{LOOPBACK}:{p['api']}"
    env = {
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__PARALLELISM": "4",
        # SQLite: wait up to 30 s for a writer instead of 5 (a UI action answered 500 while the scheduler wrote).
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}?timeout=30",
        **os.environ,
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(PASSWORDS_FILE),
        "AIRFLOW__API__HOST": LOOPBACK,
        "AIRFLOW__API__PORT": str(p["api"]),
        "AIRFLOW__API__BASE_URL": api_url,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
        # Airflow binds its log servers to every interface; ours (keyrotation_airflow.loopback) to loopback.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(p["worker_log"]),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(p["trigger_log"]),
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "keyrotation_airflow.loopback.hostname",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": LOOPBACK,
        "KEYROTATION_HOME": str(HOME),
        "KEYROTATION_ROLE_CONNECTIONS": ROLE_CONNECTIONS,
        "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("include", "plugins", "dags")),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    return {k: v for k, v in env.items() if not k.startswith("AIRFLOW_CONN_")}


def connections_env(bao, tokens: dict[str, dict], api_port: int, passwords: dict[str, str]) -> dict[str, str]:  # noqa: ANN001
    """``AIRFLOW_CONN_*`` of the role connections and of the report's read-only API connection: given to the
    scheduler (its workers run the tasks) and the triggerer only."""
    env = {f"AIRFLOW_CONN_{conn_id.upper()}": bao.airflow_connection_uri(entry["token"])
           for conn_id, entry in tokens.items()}
    env[f"AIRFLOW_CONN_{API_CONN_ID.upper()}"] = json.dumps({
        "conn_type": "http", "host": LOOPBACK, "port": api_port, "schema": "http",
        "login": "report", "password": passwords["report"]})
    return env


def component_args(name: str, p: dict[str, int]) -> list[str]:
    airflow = str(Path(sys.executable).parent / "airflow")
    return {
        "log-server": [sys.executable, "-m", "keyrotation_airflow.loopback", "serve-logs",
                       str(p["worker_log"]), str(p["trigger_log"])],
        "api-server": [airflow, "api-server", "--host", LOOPBACK, "--port", str(p["api"])],
        "scheduler": [airflow, "scheduler", "--skip-serve-logs"],
        "dag-processor": [airflow, "dag-processor"],
        "triggerer": [airflow, "triggerer", "--skip-serve-logs"],
    }[name]


def wait_healthy(sup: Supervisor, url: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        sup.check(AIRFLOW_COMPONENTS)
        try:
            health = httpx.get(f"{url}/api/v2/monitor/health", timeout=5).json()
            if all((health.get(part) or {}).get("status") == "healthy"
                   for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")):
                return
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise ComponentExited(f"Airflow not healthy after {timeout:.0f} s (logs in {LOGS})")
        time.sleep(1)


def check_ports_free(p: dict[str, int]) -> None:
    names = {"api": "KEYROTATION_UP_API_PORT", "bao": "KEYROTATION_BAO_PORT",
             "worker_log": "KEYROTATION_UP_WORKER_LOG_PORT", "trigger_log": "KEYROTATION_UP_TRIGGER_LOG_PORT"}
    for key, port in p.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                raise SystemExit(f"make up: port {port} on {LOOPBACK} is in use: set {names[key]} "
                                 "to another port") from None


def _raise_stop(signum: int, _frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


def up() -> int:
    HOME.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(exist_ok=True)
    AIRFLOW_HOME.mkdir(exist_ok=True)
    state = read_state()
    if state:
        if _alive(state.get("supervisor")):
            print(f"make up is already running (pid {state['supervisor']['pid']}): `make down` stops it",
                  file=sys.stderr)
            return 1
        print("stopping what an earlier make up left running", flush=True)
        stop_recorded(state)
        STATE_FILE.unlink(missing_ok=True)
    p = ports()
    check_ports_free(p)
    env = airflow_env(p)
    os.environ.update({k: env[k] for k in ("AIRFLOW_HOME", "KEYROTATION_HOME", "KEYROTATION_ROLE_CONNECTIONS")})
    from keyrotation_dev.devserver import OpenBaoFileServer

    url = f"http://{LOOPBACK}:{p['api']}"
    began = time.monotonic()
    sup = Supervisor()
    code = 0
    try:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _raise_stop)
        migrate = sup.start("db-migrate", [str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env)
        bao = OpenBaoFileServer(HOME / "openbao", port=p["bao"], log_path=str(LOGS / "openbao.log"), new_session=True)
        bao.start()
        sup.adopt("openbao", bao.proc)
        print(f"OpenBao on {bao.url} (data: {HOME / 'openbao'})", flush=True)
        tokens = role_tokens(bao)
        print(f"role tokens (periodic, {TOKEN_PERIOD}): {TOKENS_FILE}", flush=True)
        passwords = user_passwords()
        seeding = Seeding(bao)  # beside the start of the API server and the DAG processor
        if migrate.wait() != 0:
            raise ComponentExited(f"airflow db migrate failed; its log ends:\n{log_tail('db-migrate')}")
        print(f"starting Airflow ({', '.join(AIRFLOW_COMPONENTS)}); logs in {LOGS}", flush=True)
        for name in ("log-server", "api-server", "dag-processor"):
            sup.start(name, component_args(name, p), env)
        seeding.join()  # the scheduler's first runs find the demo data complete
        task_env = {**env, **connections_env(bao, tokens, p["api"], passwords)}
        for name in ("scheduler", "triggerer"):  # their workers and triggers are what use the connections
            sup.start(name, component_args(name, p), task_env)
        wait_healthy(sup, url)
        print(f"\nmake up: ready in {time.monotonic() - began:.0f} s. UI and REST API on {url}\n"
              f"  log in as admin; passwords of admin and of the read-only user report: {PASSWORDS_FILE}\n"
              f"  OpenBao {bao.url}; role tokens in {TOKENS_FILE}; state in {STATE_FILE}\n"
              "  Ctrl-C here, or `make down`, stops everything.", flush=True)
        renew_at = time.monotonic() + RENEW_EVERY
        while True:
            sup.check(AIRFLOW_COMPONENTS + ("openbao",))
            if time.monotonic() >= renew_at:
                renew_tokens(bao, tokens)
                renew_at += RENEW_EVERY
            time.sleep(1)
    except Stop as stop:
        print(f"\n{stop}: stopping", flush=True)
    except ComponentExited as exc:
        print(f"make up: {exc}\nstopping", file=sys.stderr, flush=True)
        code = 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # the clean-up is bounded (under a minute): let it finish
        sup.stop()
        print("make up: stopped", flush=True)
    return code


def down() -> int:
    """Stop what ``make up`` started: ask its process to stop everything, then make sure nothing is left."""
    state = read_state()
    if state is None:
        print(f"make down: nothing to stop (no {STATE_FILE})")
        return 0
    supervisor = _alive(state.get("supervisor"))
    extra: set[int] = set()
    if supervisor is not None and supervisor.pid != os.getpid():
        try:
            extra = {os.getsid(child.pid) for child in supervisor.children(recursive=True)} - {os.getsid(0)}
        except (OSError, psutil.Error):
            pass
        print(f"make down: stopping make up (pid {supervisor.pid})", flush=True)
        supervisor.terminate()
        deadline = time.monotonic() + 60
        while _alive(state["supervisor"]):  # a zombie counts as stopped: its parent may be waiting for us
            if time.monotonic() > deadline:
                print("make down: it did not stop within 60 s; stopping its processes directly", flush=True)
                break
            time.sleep(0.2)
    stop_recorded(state, extra_sids=extra)  # nothing left if make up stopped cleanly
    STATE_FILE.unlink(missing_ok=True)
    print("make down: stopped", flush=True)
    return 0


class Seeding(threading.Thread):
    """:func:`seed_demo_data` in a thread (pyarrow and the KMS calls leave the main thread free to start
    Airflow); :meth:`join` raises what it raised."""

    def __init__(self, bao) -> None:  # noqa: ANN001
        super().__init__(name="seed-demo-data", daemon=True)
        self.bao = bao
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            seed_demo_data(self.bao)
        except BaseException as exc:  # noqa: BLE001 - raised again in the main thread
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        while self.is_alive():  # in steps, so that a Ctrl-C is not held up
            super().join(0.5)
        if self.error is not None:
            raise self.error


def seed_demo_data(bao) -> None:  # noqa: ANN001
    from keyrotation.backends.registry import open_backend
    from keyrotation.config import list_key_classes, load_key_class
    from keyrotation.ledger import Ledger, RunContext
    from keyrotation.rotation import update_reference
    from keyrotation.runtime import KeyClassRuntime
    from keyrotation_dev.sample_data import DATASET_WRITERS

    ledger = Ledger()
    ctx = RunContext(actor="make up")
    for name in list_key_classes():
        config = load_key_class(name)
        kc = config.key_class
        if not served_locally(kc):
            continue
        rt = KeyClassRuntime(config, open_backend(kc, bao.client()), ledger)
        for ds in config.datasets:
            if Path(ds.location).exists() or ds.name not in DATASET_WRITERS:
                continue
            state = rt.backend.key_state()
            if not state.exists:
                state = rt.backend.create_key()
            update_reference(name, state.latest_version, ledger, ctx)
            engine = rt.engine(ds.name, ctx)
            for partition, table in DATASET_WRITERS[ds.name](30, 1_000):
                engine.write_partition(partition, table, state.latest_version)
            print(f"wrote 30 demo partitions of {ds.name} under {kc.key_ref} v{state.latest_version}", flush=True)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "up"
    if command == "up" and len(argv) <= 1:
        return up()
    if command == "down" and len(argv) == 1:
        return down()
    print("usage: scripts/up.py [up|down]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
