"""The keyrotation sidecar: :class:`~keyrotation.client.KeyRotationClient` over HTTP, for applications in any
language.

Endpoints (JSON; values base64):

* ``POST /v1/encrypt`` ``{"plaintext": "<b64>", "context": {"table", "column", "pk", "partition"}}`` ->
  ``{"ciphertext": "<b64>", "key_version": 3}``
* ``POST /v1/decrypt`` ``{"ciphertext": "<b64>", "context": {"table", "column", "pk"}}`` -> ``{"plaintext": "<b64>"}``
* ``GET /healthz``: the KMS, the ledger and the data-key database reachable (200), else 503 with the reason.
* ``GET /metrics``: Prometheus text: requests by endpoint and status, latency histogram, cache hits and
  misses, KMS calls by operation, errors by kind, current and minimum versions.

Errors are ``{"error": "<kind>", "message": "..."}``: 400 bad input or a value that does not decrypt (413 too
large), 409 a retired key version, 503 the KMS, the ledger or the database unreachable (502 the KMS refused).
Neither a plaintext nor a key is ever logged, echoed in an error or counted in a label.

Run (credentials only from the environment, never argv)::

    VAULT_TOKEN=... KEYROTATION_LEDGER_URL=postgresql://... KEYROTATION_DB_URL=postgresql://... \\
        python -m keyrotation.sidecar --key-class customer_pii --vault-url http://127.0.0.1:8200

It listens on 127.0.0.1:8900 by default; ``--uds PATH`` serves on a Unix socket instead (mode 0660), and
``--ssl-certfile/--ssl-keyfile`` turn on TLS, with ``--ssl-ca-certs`` requiring client certificates (mTLS).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import logging
import os
import socket
import ssl
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from keyrotation.client import (
    ClientError,
    KeyRotationClient,
    KmsUnavailable,
    LedgerUnavailable,
    NoCurrentVersion,
    RetiredVersionError,
    error_kind,
)
from keyrotation.errors import BackendError, ConfigError, KeyRotationError

log = logging.getLogger("keyrotation.sidecar")
# Counters and histograms would add a *_created series each; /metrics never had them (this process's
# registries are the sidecar's alone: nothing else here uses prometheus_client).
disable_created_metrics()

DEFAULT_PORT = 8900
MAX_VALUE_BYTES = 1 << 20  # a plaintext or ciphertext larger than 1 MiB is refused (413)
ENDPOINTS = ("/v1/encrypt", "/v1/decrypt", "/healthz", "/metrics")
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# -- requests -------------------------------------------------------------------------------------

class Context(BaseModel):
    model_config = ConfigDict(extra="forbid")
    table: StrictStr
    column: StrictStr
    pk: StrictInt | StrictStr
    partition: StrictStr | None = None


class EncryptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plaintext: StrictStr
    context: Context


class DecryptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ciphertext: StrictStr
    context: Context


class _TooLarge(ClientError):
    pass


class _BadBase64(ClientError):
    pass


def _b64(value: str, field: str, limit: int) -> bytes:
    if len(value) > (limit * 4) // 3 + 4:
        raise _TooLarge(f"{field} is larger than {limit} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _BadBase64(f"{field} is not valid base64") from None
    if len(data) > limit:
        raise _TooLarge(f"{field} is larger than {limit} bytes")
    return data


def _status(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, _TooLarge):
        return 413, "too_large"
    if isinstance(exc, _BadBase64):
        return 400, "bad_input"
    if isinstance(exc, RetiredVersionError):
        return 409, "retired_version"
    kind = error_kind(exc)
    if kind in ("bad_input", "does_not_decrypt", "unknown_data_key"):
        return 400, kind
    if isinstance(exc, KmsUnavailable | LedgerUnavailable | NoCurrentVersion) or kind == "database_unavailable":
        return 503, kind
    if isinstance(exc, BackendError):
        return 502, kind
    return 500, "internal"


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message}, status_code=status)


# -- metrics --------------------------------------------------------------------------------------

class _ClientCollector(Collector):
    """The client's own counters and gauges (:meth:`KeyRotationClient.metrics`), read at each scrape."""

    def __init__(self, client: KeyRotationClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        m = self.client.metrics()

        def family(kind: type[CounterMetricFamily | GaugeMetricFamily], name: str, help_text: str,
                   samples: list[tuple[dict[str, str], float]]) -> Metric:
            metric = kind(name, help_text, labels=sorted({k for labels, _ in samples for k in labels}))
            for labels, value in samples:
                metric.add_metric([labels[k] for k in sorted(labels)], value)
            return metric

        yield family(CounterMetricFamily, "keyrotation_client_requests_total", "Client operations by kind.",
                     [({"operation": k}, v) for k, v in sorted(m["requests"].items())])
        yield family(CounterMetricFamily, "keyrotation_client_cache_hits_total", "Data keys found in the cache.",
                     [({}, m["cache_hits"])])
        yield family(CounterMetricFamily, "keyrotation_client_cache_misses_total",
                     "Data keys loaded from the database and KMS.", [({}, m["cache_misses"])])
        yield family(CounterMetricFamily, "keyrotation_client_cache_evictions_total",
                     "Data keys zeroed and dropped from the cache.", [({}, m["cache_evictions"])])
        yield family(GaugeMetricFamily, "keyrotation_client_cached_keys", "Data keys in the cache now.",
                     [({}, m["cached_keys"])])
        yield family(CounterMetricFamily, "keyrotation_client_kms_calls_total", "KMS calls by operation.",
                     [({"operation": k}, v) for k, v in sorted(m["kms_calls"].items())]
                     or [({"operation": "unwrap"}, 0)])
        yield family(CounterMetricFamily, "keyrotation_client_errors_total", "Errors by kind.",
                     [({"kind": k}, v) for k, v in sorted(m["errors"].items())])
        yield family(CounterMetricFamily, "keyrotation_client_rotations_noticed_total",
                     "Moves of the ledger's reference noticed.", [({}, m["rotations_noticed"])])
        for name, key, help_text in (
                ("keyrotation_client_current_version", "current_version",
                 "Key version new values are encrypted under."),
                ("keyrotation_client_min_decryption_version", "min_decryption_version",
                 "Lowest key version not retired in the ledger.")):
            if m[key] is not None:
                yield family(GaugeMetricFamily, name, help_text, [({"key_class": self.client.key_class}, m[key])])


class SidecarMetrics:
    """Requests by endpoint and status, a latency histogram per endpoint, and the client's metrics, in a
    registry of this sidecar's own (not prometheus_client's global one)."""

    def __init__(self, client: KeyRotationClient) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("keyrotation_sidecar_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("keyrotation_sidecar_request_duration_seconds", "Request latency by endpoint.",
                                 ["endpoint"], buckets=BUCKETS, registry=self.registry)
        self.registry.register(_ClientCollector(client))

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> str:
        return generate_latest(self.registry).decode()


# -- the app --------------------------------------------------------------------------------------

class _Measure:
    """ASGI middleware: refuses oversized bodies by their Content-Length, and times every request into
    :class:`SidecarMetrics` by endpoint and status (a plain ASGI wrapper: cheaper than ``BaseHTTPMiddleware``)."""

    def __init__(self, app: Any, metrics: SidecarMetrics, max_body: int) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            length = next((v for k, v in scope["headers"] if k == b"content-length"), b"0")
            if not length.isdigit():
                await _error(400, "bad_input", "bad Content-Length")(scope, receive, sending)
            elif int(length) > self.max_body:
                await _error(413, "too_large", f"request body larger than {self.max_body} bytes")(
                    scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            path = scope["path"]
            self.metrics.observe(path if path in ENDPOINTS else "other", status[0], time.perf_counter() - start)


def create_app(client: KeyRotationClient, *, max_value_bytes: int = MAX_VALUE_BYTES,
               on_close: Callable[[], None] | None = None) -> FastAPI:
    """The sidecar's ASGI app over ``client`` (no docs pages: the API is this module's docstring). At
    shutdown the client's cached keys are zeroed and ``on_close`` runs."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        client.close()
        if on_close is not None:
            on_close()

    app = FastAPI(title="keyrotation sidecar", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = SidecarMetrics(client)
    max_body = (max_value_bytes + 256) * 4 // 3 + 64 * 1024  # a base64 value and its context
    app.state.client = client
    app.state.metrics = metrics
    app.add_middleware(_Measure, metrics=metrics, max_body=max_body)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default 422 body echoes the input (a plaintext); this one names fields only.
        problems = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
        return _error(400, "bad_input", "; ".join(problems) or "invalid request")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # The exception's message may hold data: log its type and frames only.
        log.error("internal error on %s: %s\n%s", request.url.path, type(exc).__name__,
                  "".join(traceback.format_tb(exc.__traceback__)))
        return _error(500, "internal", f"internal error ({type(exc).__name__})")

    def run(fn: Any) -> Any:
        try:
            return fn()
        except (KeyRotationError, sa.exc.SQLAlchemyError) as exc:
            status, kind = _status(exc)
            message = str(exc) if isinstance(exc, KeyRotationError) else \
                f"data-key database unreachable ({type(exc).__name__})"
            if status >= 500:
                log.warning("%s: %s", kind, message)
            return _error(status, kind, message)
        except Exception as exc:  # noqa: BLE001 - its message may hold data: log the type and frames only
            log.error("internal error: %s\n%s", type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)))
            return _error(500, "internal", f"internal error ({type(exc).__name__})")

    @app.post("/v1/encrypt")
    def encrypt(body: EncryptRequest) -> Any:
        def go() -> dict:
            plaintext = _b64(body.plaintext, "plaintext", max_value_bytes)
            blob, version = client.encrypt_versioned(plaintext, body.context.model_dump())
            return {"ciphertext": base64.b64encode(blob).decode(), "key_version": version}
        return run(go)

    @app.post("/v1/decrypt")
    def decrypt(body: DecryptRequest) -> Any:
        def go() -> dict:
            blob = _b64(body.ciphertext, "ciphertext", max_value_bytes + 256)
            return {"plaintext": base64.b64encode(client.decrypt(blob, body.context.model_dump())).decode()}
        return run(go)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        checks = client.health()
        ok = all(v == "ok" for v in checks.values())
        m = client.metrics()
        return JSONResponse({"status": "ok" if ok else "unavailable", "key_class": client.key_class,
                             "current_version": m["current_version"],
                             "min_decryption_version": m["min_decryption_version"], "checks": checks},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# -- the command ----------------------------------------------------------------------------------

def _no_password(url: str | None, option: str, env: str) -> None:
    if url and sa.make_url(url).password:
        raise SystemExit(f"{option} carries a password, which every local user can read in the process list: "
                         f"put the URL in ${env} instead (or the password in PGPASSWORD)")


def _kms_client(config: Any, args: argparse.Namespace) -> Any:
    from keyrotation.backends.base import ClientOptions
    from keyrotation.backends.registry import client_from_environment

    try:
        return client_from_environment(config.key_class, ClientOptions(
            vault_url=args.vault_url, aws_endpoint_url=args.aws_endpoint_url, aws_region=args.aws_region,
            gcp_kms_endpoint=args.gcp_kms_endpoint, timeout=args.kms_timeout))
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


def build_client(args: argparse.Namespace) -> KeyRotationClient:
    from keyrotation.config import load_key_class

    config = load_key_class(args.key_class, args.config_dir)
    ledger_url = args.ledger_url or os.environ.get("KEYROTATION_LEDGER_URL")
    db_url = args.db_url or os.environ.get("KEYROTATION_DB_URL")
    if not ledger_url:
        raise SystemExit("--ledger-url (or KEYROTATION_LEDGER_URL) is required: the ledger holds the current version")
    if not db_url:
        raise SystemExit("--db-url (or KEYROTATION_DB_URL) is required: the database of keyrotation_data_keys")
    db = sa.create_engine(db_url, hide_parameters=True, pool_pre_ping=True, pool_size=args.db_pool,
                          max_overflow=args.db_pool) if not db_url.startswith("sqlite") else \
        sa.create_engine(db_url, hide_parameters=True)
    return KeyRotationClient.from_key_class(
        config, kms_client=_kms_client(config, args), ledger=ledger_url, db=db,
        poll_interval_s=args.poll_interval, cache_size=args.cache_size, cache_ttl_s=args.cache_ttl)


def _unix_socket(path: str, mode: int) -> socket.socket:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_socket():
        target.unlink()  # a stale socket of an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(target))
    finally:
        os.umask(old)
    os.chmod(target, mode)
    sock.listen(2048)
    return sock


def parser(prog: str = "python -m keyrotation.sidecar") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Encrypt/decrypt over HTTP for one key class. Credentials come from the environment only: "
                    "VAULT_TOKEN or VAULT_TOKEN_FILE (or the AWS chain, or Google's application default credentials), "
                    "KEYROTATION_LEDGER_URL, KEYROTATION_DB_URL "
                    "(or PGPASSWORD).")
    p.add_argument("--key-class", required=True, help="key class name (its YAML file in the config folder)")
    p.add_argument("--config-dir", default=None, help="key class folder (default: $KEYROTATION_CONFIG_DIR)")
    p.add_argument("--ledger-url", default=None, help="ledger database URL without password "
                   "(default: $KEYROTATION_LEDGER_URL)")
    p.add_argument("--db-url", default=None, help="database with keyrotation_data_keys, without password "
                   "(default: $KEYROTATION_DB_URL)")
    p.add_argument("--vault-url", default=None,
                   help="Vault/OpenBao address (default: $VAULT_ADDR); token: $VAULT_TOKEN")
    p.add_argument("--aws-endpoint-url", default=None, help="aws_kms: KMS endpoint (e.g. a local server)")
    p.add_argument("--aws-region", default=None, help="aws_kms: region (default: the key class's, or the AWS chain's)")
    p.add_argument("--gcp-kms-endpoint", default=None,
                   help="gcp_kms: Cloud KMS endpoint (host:port; default cloudkms.googleapis.com)")
    p.add_argument("--kms-timeout", type=float, default=5.0, help="seconds per KMS request (default 5)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"listen port (default {DEFAULT_PORT})")
    p.add_argument("--uds", default=None, help="serve on this Unix socket instead of TCP")
    p.add_argument("--uds-mode", default="660", help="permissions of the Unix socket, octal (default 660)")
    p.add_argument("--ssl-certfile", default=None, help="TLS: server certificate (PEM)")
    p.add_argument("--ssl-keyfile", default=None, help="TLS: server key (PEM); a passphrase from "
                   "$KEYROTATION_SIDECAR_SSL_KEY_PASSWORD")
    p.add_argument("--ssl-ca-certs", default=None, help="mTLS: CA bundle; clients must present a certificate it signed")
    p.add_argument("--poll-interval", type=float, default=10.0, help="seconds between ledger polls (default 10)")
    p.add_argument("--cache-size", type=int, default=1024, help="unwrapped data keys kept in memory (default 1024)")
    p.add_argument("--cache-ttl", type=float, default=300.0, help="seconds an unwrapped data key is kept (default 300)")
    p.add_argument("--db-pool", type=int, default=5, help="database connections (and as many overflow)")
    p.add_argument("--max-value-bytes", type=int, default=MAX_VALUE_BYTES, help="largest value accepted (413 above)")
    p.add_argument("--access-log", action="store_true", help="log each request line (method, path, status)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None, prog: str = "python -m keyrotation.sidecar") -> int:
    import uvicorn

    args = parser(prog).parse_args(argv)
    _no_password(args.ledger_url, "--ledger-url", "KEYROTATION_LEDGER_URL")
    _no_password(args.db_url, "--db-url", "KEYROTATION_DB_URL")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise SystemExit("--ssl-certfile and --ssl-keyfile go together")
    if args.ssl_ca_certs and not args.ssl_certfile:
        raise SystemExit("--ssl-ca-certs (client certificates) needs --ssl-certfile and --ssl-keyfile")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        client = build_client(args)
    except KeyRotationError as exc:
        raise SystemExit(str(exc)) from None
    uds = Path(args.uds) if args.uds else None
    # Cleanup in the app's shutdown: uvicorn re-raises SIGTERM after it, so code after run() may not run.
    app = create_app(client, max_value_bytes=args.max_value_bytes,
                     on_close=(lambda: uds.unlink(missing_ok=True)) if uds else None)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
        server_header=False, date_header=False, proxy_headers=False, timeout_graceful_shutdown=5,
        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, ssl_ca_certs=args.ssl_ca_certs,
        ssl_keyfile_password=os.environ.get("KEYROTATION_SIDECAR_SSL_KEY_PASSWORD"),
        ssl_cert_reqs=ssl.CERT_REQUIRED if args.ssl_ca_certs else ssl.CERT_NONE)
    server = uvicorn.Server(config)
    scheme = "https" if args.ssl_certfile else "http"
    tls = "mTLS (client certificates required)" if args.ssl_ca_certs else "TLS" if args.ssl_certfile else "no TLS"
    common = (f"key class {client.key_class}, poll every {args.poll_interval:g}s, cache {args.cache_size} keys / "
              f"{args.cache_ttl:g}s, {tls}")
    if args.uds:
        sock = _unix_socket(args.uds, int(args.uds_mode, 8))
        log.info("keyrotation sidecar on unix socket %s (mode %s): %s", args.uds, args.uds_mode, common)
        server.run(sockets=[sock])
        return 0
    if args.host not in ("127.0.0.1", "::1", "localhost") and not args.ssl_ca_certs:
        log.warning("listening on %s, beyond loopback, without client certificates: anyone who reaches the port "
                    "can encrypt and decrypt (use --ssl-ca-certs, or a Unix socket)", args.host)
    log.info("keyrotation sidecar on %s://%s:%s: %s", scheme, args.host, args.port, common)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
