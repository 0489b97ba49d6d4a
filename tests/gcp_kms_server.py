"""A Google Cloud KMS test server: the real gRPC API over TLS, with service-account auth and IAM.

No Cloud KMS emulator exists, so this serves ``google.cloud.kms.v1.KeyManagementService`` and the
``google.iam.v1.IAMPolicy`` mixin on a loopback port with Cloud KMS's documented semantics: key rings,
symmetric ``ENCRYPT_DECRYPT`` keys (SOFTWARE or HSM), version states (HSM versions are generated
after ``generation_delay`` seconds), scheduled destruction, automatic rotation, AES-256-GCM
encryption whose ciphertext names its version, CRC32C integrity fields and pagination.

The unmodified ``google.cloud.kms_v1`` clients (sync and async) talk to it with their production
code paths: TLS (the server's self-signed certificate, trusted through
``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``) and service-account credentials (the self-signed JWT that
google-auth sends; no token endpoint). Every RPC verifies the JWT against the keys registered with
``add_service_account`` and checks the Cloud KMS permission on the resource against the IAM
policies of the resource and its ancestors, so least-privilege tests are real.

State is evaluated lazily against the server clock (``advance`` moves it forward): pending HSM
versions become ENABLED, scheduled versions become DESTROYED (key material erased) and keys with a
rotation schedule rotate when their ``next_rotation_time`` passes.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import grpc
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from google.auth import jwt as google_jwt
from google.cloud import kms_v1
from google.iam.v1 import iam_policy_pb2, policy_pb2

UTC = dt.UTC
State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState
Level = kms_v1.ProtectionLevel
Algorithm = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm
Purpose = kms_v1.CryptoKey.CryptoKeyPurpose

ROOTS_ENV = "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"
KMS_SERVICE = "google.cloud.kms.v1.KeyManagementService"
IAM_SERVICE = "google.iam.v1.IAMPolicy"
TOKEN_URI = "https://oauth2.googleapis.com/token"
ACCEPTED_SCOPES = {"https://www.googleapis.com/auth/cloud-platform", "https://www.googleapis.com/auth/cloudkms"}

MAX_DATA = 64 * 1024  # plaintext and AAD limit of Encrypt
MAX_PAGE_SIZE = 1000
MIN_ROTATION = dt.timedelta(hours=24)
MAX_ROTATION = dt.timedelta(hours=876_000)
DEFAULT_DESTROY_DURATION = dt.timedelta(days=30)
MIN_DESTROY_DURATION = dt.timedelta(hours=24)
MAX_DESTROY_DURATION = dt.timedelta(days=120)

# Ciphertext: format byte, the version's 16-byte identifier, 12-byte nonce, AES-GCM ciphertext + tag.
CIPHERTEXT_FORMAT = b"\x01"
_HEADER = 1 + 16
_NONCE = 12
_TAG = 16

UNAUTHENTICATED_MESSAGE = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other "
    "valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
)

PERMISSIONS = frozenset({
    "cloudkms.keyRings.create", "cloudkms.keyRings.get", "cloudkms.keyRings.list",
    "cloudkms.keyRings.getIamPolicy", "cloudkms.keyRings.setIamPolicy",
    "cloudkms.cryptoKeys.create", "cloudkms.cryptoKeys.get", "cloudkms.cryptoKeys.list", "cloudkms.cryptoKeys.update",
    "cloudkms.cryptoKeys.getIamPolicy", "cloudkms.cryptoKeys.setIamPolicy",
    "cloudkms.cryptoKeyVersions.create", "cloudkms.cryptoKeyVersions.get", "cloudkms.cryptoKeyVersions.list",
    "cloudkms.cryptoKeyVersions.update", "cloudkms.cryptoKeyVersions.destroy", "cloudkms.cryptoKeyVersions.restore",
    "cloudkms.cryptoKeyVersions.useToEncrypt", "cloudkms.cryptoKeyVersions.useToDecrypt",
})
_USE = {"cloudkms.cryptoKeyVersions.useToEncrypt", "cloudkms.cryptoKeyVersions.useToDecrypt"}
PREDEFINED_ROLES: dict[str, frozenset[str]] = {
    "roles/owner": PERMISSIONS,
    "roles/cloudkms.admin": PERMISSIONS - _USE,
    "roles/cloudkms.viewer": frozenset(p for p in PERMISSIONS if p.rsplit(".", 1)[1] in ("get", "list")),
    "roles/cloudkms.cryptoKeyEncrypterDecrypter": frozenset(_USE),
    "roles/cloudkms.cryptoKeyEncrypter": frozenset({"cloudkms.cryptoKeyVersions.useToEncrypt"}),
    "roles/cloudkms.cryptoKeyDecrypter": frozenset({"cloudkms.cryptoKeyVersions.useToDecrypt"}),
}

_PROJECT = r"[a-z0-9][a-z0-9.:-]{0,62}"
_LOCATION = r"[a-z0-9][a-z0-9-]{0,62}"
_ID = r"[a-zA-Z0-9_-]{1,63}"
_ID_RE = re.compile(_ID)
_CUSTOM_ROLE_RE = re.compile(r"(projects|organizations)/[^/]+/roles/[a-zA-Z0-9_.]{1,64}")
_PERMISSION_RE = re.compile(r"[a-z][a-zA-Z0-9]*(\.[a-zA-Z0-9]+){2}")
_NAME_PATTERNS = {
    "location": re.compile(rf"projects/{_PROJECT}/locations/{_LOCATION}"),
    "key_ring": re.compile(rf"projects/{_PROJECT}/locations/{_LOCATION}/keyRings/{_ID}"),
    "crypto_key": re.compile(rf"projects/{_PROJECT}/locations/{_LOCATION}/keyRings/{_ID}/cryptoKeys/{_ID}"),
    "version": re.compile(
        rf"projects/{_PROJECT}/locations/{_LOCATION}/keyRings/{_ID}/cryptoKeys/{_ID}/cryptoKeyVersions/[1-9][0-9]*"),
}


class RpcError(Exception):
    """Ends an RPC with a gRPC status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _state_precondition(name: str, state: State) -> RpcError:
    return RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                    f"The request cannot be fulfilled. Resource {name} has value {State(state).name} in field "
                    "crypto_key_version.state.")


def _crc(data: bytes) -> int:
    return google_crc32c.value(data)


# --------------------------------------------------------------------------------------------- keys and TLS


def generate_service_account_keyfile(email: str, project_id: str) -> dict:
    """A service-account keyfile dict (RSA-2048) as the IAM API returns it; not registered anywhere."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": str(secrets.randbelow(10**21 - 10**20) + 10**20),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": TOKEN_URI,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email.replace('@', '%40')}",
        "universe_domain": "googleapis.com",
    }


def _public_pem(keyfile: dict) -> str:
    private = serialization.load_pem_private_key(keyfile["private_key"].encode(), password=None)
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def ensure_tls_files(tls_dir: str | os.PathLike, cert_name: str = "cert.pem",
                     key_name: str = "key.pem") -> tuple[Path, Path]:
    """Reuse the certificate and key in ``tls_dir``, or generate a self-signed pair there (file-locked)."""
    directory = Path(tls_dir)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / cert_name, directory / key_name
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cert_path.exists() and key_path.exists():
            x509.load_pem_x509_certificate(cert_path.read_bytes())
            serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = dt.datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        for path, data in (
            (key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())),
            (cert_path, cert.public_bytes(serialization.Encoding.PEM)),
        ):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            if path == key_path:
                tmp.chmod(0o600)
            os.replace(tmp, path)
        return cert_path, key_path


def trust_in_process(ca_path: str | os.PathLike, bundle_path: str | os.PathLike | None = None) -> str:
    """Make this process's gRPC clients trust ``ca_path`` through ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``.

    gRPC reads that file once, when the process makes its first secure channel, so call this before.
    If the variable already names other roots (a system bundle), a bundle of those roots plus the
    server's certificate is written to ``bundle_path`` (default: ``roots.pem`` next to ``ca_path``).
    Returns the path the variable now holds.
    """
    cert = Path(ca_path).read_bytes()
    current = os.environ.get(ROOTS_ENV)
    if current and Path(current).is_file() and cert.strip() in Path(current).read_bytes():
        return current
    if not current or not Path(current).is_file():
        os.environ[ROOTS_ENV] = str(ca_path)
        return str(ca_path)
    bundle = Path(bundle_path) if bundle_path else Path(ca_path).with_name("roots.pem")
    tmp = bundle.with_name(f".{bundle.name}.{os.getpid()}.tmp")
    tmp.write_bytes(Path(current).read_bytes().rstrip(b"\n") + b"\n" + cert)
    os.replace(tmp, bundle)
    os.environ[ROOTS_ENV] = str(bundle)
    return str(bundle)


# --------------------------------------------------------------------------------------------- state


@dataclass
class _Version:
    key_name: str
    number: int
    protection_level: Level
    create_time: dt.datetime
    ready_time: dt.datetime  # generate_time: when PENDING_GENERATION ends
    material: bytes | None
    uid: bytes
    state: State = State.PENDING_GENERATION
    destroy_time: dt.datetime | None = None
    destroy_event_time: dt.datetime | None = None
    promote_when_ready: bool = False  # automatic rotation: becomes primary once generated

    @property
    def name(self) -> str:
        return f"{self.key_name}/cryptoKeyVersions/{self.number}"


@dataclass
class _Key:
    name: str
    create_time: dt.datetime
    protection_level: Level
    destroy_scheduled_duration: dt.timedelta
    labels: dict[str, str] = field(default_factory=dict)
    rotation_period: dt.timedelta | None = None
    next_rotation_time: dt.datetime | None = None
    primary: int | None = None
    versions: dict[int, _Version] = field(default_factory=dict)


@dataclass
class _Policy:
    bindings: dict[str, set[str]] = field(default_factory=dict)
    etag: bytes = b"ACAB"


def _parse(kind: str, name: str) -> str:
    if not _NAME_PATTERNS[kind].fullmatch(name or ""):
        raise _invalid(f"Resource name [{name}] does not match any known resource name pattern.")
    return name


def _parent_of(name: str) -> str:
    return name.rsplit("/", 2)[0]


def _ancestors(name: str) -> list[str]:
    """``name`` and its ancestors up to the project: projects/P, .../locations/L, .../keyRings/R, ..."""
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts) - len(parts) % 2, 1, -2)]


# --------------------------------------------------------------------------------------------- list filters


def _matches(filter_text: str, fields: dict[str, str]) -> bool:
    """A small subset of the AIP-160 filters Cloud KMS lists accept: terms ``f=v``, ``f!=v``, ``f:v``,
    ``NOT f=v`` joined by AND."""
    if not filter_text.strip():
        return True
    for term in re.split(r"\s+AND\s+", filter_text.strip()):
        negate = False
        if term.startswith("NOT "):
            negate, term = True, term[4:].strip()
        elif term.startswith("-"):
            negate, term = True, term[1:]
        match = re.fullmatch(r"([a-zA-Z_][a-zA-Z0-9_.]*)\s*(!=|=|:)\s*(\"[^\"]*\"|[^\s\"]+)", term)
        if not match:
            raise _invalid(f"Invalid filter: {filter_text}")
        key, op, value = match.group(1), match.group(2), match.group(3).strip('"')
        if key not in fields and not key.startswith("labels."):
            raise _invalid(f"Invalid filter: unknown field {key}")
        actual = fields.get(key, "")
        hit = (value in actual) if op == ":" else (actual == value)
        if op == "!=":
            hit = not hit
        if hit == negate:
            return False
    return True


def _page(items: list, after_key: Callable, request, parent: str) -> tuple[list, str]:
    """Page ``items`` (sorted, append-only keys) by page_size / page_token (an opaque 'start after')."""
    if request.page_size < 0:
        raise _invalid("page_size must not be negative.")
    size = min(request.page_size or MAX_PAGE_SIZE, MAX_PAGE_SIZE)
    start = 0
    if request.page_token:
        try:
            token = json.loads(base64.urlsafe_b64decode(request.page_token.encode()))
            assert token["p"] == parent
            after = token["a"]
        except Exception:
            raise _invalid("Invalid page token.") from None
        start = next((i for i, item in enumerate(items) if after_key(item) > after), len(items))
    page = items[start:start + size]
    more = start + size < len(items)
    next_token = ""
    if more and page:
        next_token = base64.urlsafe_b64encode(json.dumps({"p": parent, "a": after_key(page[-1])}).encode()).decode()
    return page, next_token


# --------------------------------------------------------------------------------------------- the server


class CloudKmsTestServer:
    """Cloud KMS (``KeyManagementService`` + ``IAMPolicy``) over gRPC/TLS on 127.0.0.1.

    Use as a context manager or ``start()`` / ``stop()``. Clients connect to ``endpoint``
    (``localhost:PORT``) and must trust ``ca_path`` (``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``).
    ``owner_keyfile`` is a service account holding roles/owner on ``projects/<project>``.
    """

    CERT_FILE = "cert.pem"
    KEY_FILE = "key.pem"

    def __init__(self, port: int | None = None, tls_dir: str | os.PathLike | None = None,
                 project: str = "keyrotation-test"):
        self.project = project
        self._requested_port = port or 0
        self._own_tls_dir = tls_dir is None
        self.tls_dir = Path(tls_dir) if tls_dir is not None else Path(tempfile.mkdtemp(prefix="gcp-kms-tls-"))
        cert_path, key_path = ensure_tls_files(self.tls_dir, self.CERT_FILE, self.KEY_FILE)
        self.ca_path = str(cert_path)
        self._key_path = str(key_path)
        self.port: int | None = None
        self._server: grpc.Server | None = None

        self._lock = threading.RLock()
        self._offset = 0.0  # advance(): seconds added to the wall clock
        self.generation_delay = 1.0  # seconds an HSM version stays PENDING_GENERATION
        self.calls: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []  # tracebacks of unexpected exceptions inside handlers (INTERNAL)

        self._key_rings: dict[str, dt.datetime] = {}
        self._keys: dict[str, _Key] = {}
        self._by_uid: dict[bytes, _Version] = {}
        self._accounts: dict[str, tuple[str, str]] = {}  # email -> (private_key_id, public key PEM)
        self._token_cache: dict[str, tuple[str, str, float]] = {}  # token -> (email, key id, exp)
        self._roles: dict[str, frozenset[str]] = dict(PREDEFINED_ROLES)
        self._policies: dict[str, _Policy] = {}

        self.owner_email = f"owner@{project}.iam.gserviceaccount.com"
        self.owner_keyfile = self.add_service_account(self.owner_email)
        self.set_policy(f"projects/{project}", {"roles/owner": [f"serviceAccount:{self.owner_email}"]})

    # ----------------------------------------------------------------------------------------- lifecycle

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not started")
        return f"localhost:{self.port}"

    def start(self) -> CloudKmsTestServer:
        if self._server is not None:
            return self
        server = grpc.server(futures.ThreadPoolExecutor(16))
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(KMS_SERVICE, self._kms_handlers()),
            grpc.method_handlers_generic_handler(IAM_SERVICE, self._iam_handlers()),
        ))
        pair = (Path(self._key_path).read_bytes(), Path(self.ca_path).read_bytes())
        credentials = grpc.ssl_server_credentials([pair])
        self.port = server.add_secure_port(f"127.0.0.1:{self._requested_port}", credentials)
        if not self.port:
            raise RuntimeError(f"cannot bind 127.0.0.1:{self._requested_port}")
        server.start()
        self._server = server
        return self

    def stop(self, grace: float | None = 0.5) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self._own_tls_dir:
            shutil.rmtree(self.tls_dir, ignore_errors=True)

    def __enter__(self) -> CloudKmsTestServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------- test hooks

    def now(self) -> dt.datetime:
        """The server clock (wall clock plus everything passed to ``advance``)."""
        return dt.datetime.now(UTC) + dt.timedelta(seconds=self._offset)

    def advance(self, seconds: float) -> None:
        """Move the server clock forward (scheduled destruction, HSM generation, automatic rotation)."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._offset += seconds

    def add_service_account(self, email: str) -> dict:
        """Register a service account (new RSA key; replaces an earlier one) and return its keyfile dict."""
        keyfile = generate_service_account_keyfile(email, self.project)
        with self._lock:
            self._accounts[email] = (keyfile["private_key_id"], _public_pem(keyfile))
        return keyfile

    def remove_service_account(self, email: str) -> None:
        """Delete the account's key: its tokens are rejected from now on."""
        with self._lock:
            self._accounts.pop(email, None)

    def define_role(self, name: str, permissions: Iterable[str]) -> None:
        """A custom role, e.g. ``projects/P/roles/rotator``."""
        permissions = frozenset(permissions)
        if not _CUSTOM_ROLE_RE.fullmatch(name):
            raise ValueError(f"custom role names look like projects/P/roles/NAME, not {name!r}")
        bad = [p for p in permissions if not _PERMISSION_RE.fullmatch(p)]
        if bad:
            raise ValueError(f"invalid permissions {bad}")
        with self._lock:
            self._roles[name] = permissions

    def set_policy(self, resource: str, bindings: dict[str, Iterable[str]]) -> None:
        """Replace the IAM policy of a project, location, key ring or crypto key (no auth, no existence check)."""
        parsed = {role: set(members) for role, members in bindings.items()}
        with self._lock:
            self._validate_bindings(parsed, ValueError)
            self._store_policy(resource, parsed)

    def get_policy(self, resource: str) -> dict[str, list[str]]:
        with self._lock:
            policy = self._policies.get(resource)
            return {role: sorted(m) for role, m in policy.bindings.items()} if policy else {}

    def primary_version_name(self, crypto_key_name: str) -> str | None:
        with self._lock:
            key = self._existing_key(crypto_key_name)
            return f"{key.name}/cryptoKeyVersions/{key.primary}" if key.primary else None

    def version_state(self, version_name: str) -> State:
        with self._lock:
            return self._existing_version(version_name).state

    def version_names(self, crypto_key_name: str) -> list[str]:
        with self._lock:
            return [v.name for v in self._existing_key(crypto_key_name).versions.values()]

    # ----------------------------------------------------------------------------------------- internals

    def _store_policy(self, resource: str, bindings: dict[str, set[str]]) -> _Policy:
        policy = _Policy({r: set(m) for r, m in bindings.items() if m},
                         hashlib.sha256(secrets.token_bytes(16)).digest()[:8])
        self._policies[resource] = policy
        return policy

    def _validate_bindings(self, bindings: dict[str, set[str]], error: Callable[[str], Exception]) -> None:
        for role, members in bindings.items():
            if role not in self._roles:
                raise error(f"Role ({role}) does not exist in the resource's hierarchy.")
            for member in members:
                if member not in ("allUsers", "allAuthenticatedUsers") and not re.fullmatch(
                        r"(serviceAccount|user|group|domain|principal|principalSet):\S+", member):
                    raise error(f"Invalid member: {member}")

    def _authenticate(self, context: grpc.ServicerContext) -> str:
        """The email of the service account that signed the request's bearer JWT."""
        metadata = dict(context.invocation_metadata())
        auth = metadata.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        token = auth[len("Bearer "):].strip()
        with self._lock:
            cached = self._token_cache.get(token)
            if cached and time.time() < cached[2] and self._accounts.get(cached[0], ("",))[0] == cached[1]:
                return cached[0]
        try:
            header, payload, _, _ = google_jwt._unverified_decode(token)
            email = payload.get("iss")
            with self._lock:
                key_id, public_pem = self._accounts[email]
            if header.get("kid") not in (None, key_id) or payload.get("sub", email) != email:
                raise ValueError("wrong key id or subject")
            payload = google_jwt.decode(token, certs={key_id: public_pem}, verify=True, clock_skew_in_seconds=10)
        except Exception:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE) from None
        scopes = set(str(payload.get("scope", "")).split())
        if scopes and not scopes & ACCEPTED_SCOPES:
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, "Request had insufficient authentication scopes.")
        with self._lock:
            if len(self._token_cache) > 10_000:
                self._token_cache.clear()
            self._token_cache[token] = (email, key_id, float(payload["exp"]))
        return email

    def _permissions_of(self, email: str, resource: str) -> set[str]:
        members = {f"serviceAccount:{email}", "allUsers", "allAuthenticatedUsers"}
        granted: set[str] = set()
        for name in _ancestors(resource):
            policy = self._policies.get(name)
            if policy:
                for role, role_members in policy.bindings.items():
                    if role_members & members:
                        granted |= self._roles.get(role, frozenset())
        return granted

    def _require(self, email: str, permission: str, resource: str) -> None:
        if permission not in self._permissions_of(email, resource):
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED,
                           f"Permission '{permission}' denied on resource '{resource}' (or it may not exist).")

    def _refresh(self, key: _Key) -> None:
        """Apply everything that happened up to now: automatic rotations, generation, destruction."""
        now = self.now()
        while key.rotation_period and key.next_rotation_time and key.next_rotation_time <= now:
            version = self._new_version(key, key.next_rotation_time)
            version.promote_when_ready = True
            key.next_rotation_time += key.rotation_period
        promotions = []
        for version in key.versions.values():
            if version.state == State.PENDING_GENERATION and version.ready_time <= now:
                version.state = State.ENABLED
            if version.promote_when_ready and version.state != State.PENDING_GENERATION:
                version.promote_when_ready = False
                promotions.append(version)
            if version.state == State.DESTROY_SCHEDULED and version.destroy_time <= now:
                version.state = State.DESTROYED
                version.destroy_event_time = version.destroy_time
                version.material = None
        for version in sorted(promotions, key=lambda v: v.ready_time):
            key.primary = version.number

    def _new_version(self, key: _Key, at: dt.datetime) -> _Version:
        number = max(key.versions, default=0) + 1
        delay = self.generation_delay if key.protection_level == Level.HSM else 0.0
        uid = uuid.uuid4().bytes
        version = _Version(key.name, number, key.protection_level, at, at + dt.timedelta(seconds=delay),
                           AESGCM.generate_key(256), uid)
        version.state = State.PENDING_GENERATION if delay > 0 else State.ENABLED
        key.versions[number] = version
        self._by_uid[uid] = version
        return version

    def _existing_key_ring(self, name: str) -> str:
        if name not in self._key_rings:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"KeyRing {name} not found.")
        return name

    def _existing_key(self, name: str) -> _Key:
        key = self._keys.get(name)
        if key is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"CryptoKey {name} not found.")
        self._refresh(key)
        return key

    def _existing_version(self, name: str) -> _Version:
        key_name, _, number = name.rpartition("/cryptoKeyVersions/")
        version = self._existing_key(key_name).versions.get(int(number)) if number.isdigit() else None
        if version is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"CryptoKeyVersion {name} not found.")
        return version

    @staticmethod
    def _version_pb(version: _Version) -> kms_v1.CryptoKeyVersion:
        pb = kms_v1.CryptoKeyVersion(name=version.name, state=version.state,
                                     protection_level=version.protection_level,
                                     algorithm=Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION, create_time=version.create_time)
        if version.state != State.PENDING_GENERATION:
            pb.generate_time = version.ready_time
        if version.destroy_time is not None:
            pb.destroy_time = version.destroy_time
        if version.destroy_event_time is not None:
            pb.destroy_event_time = version.destroy_event_time
        return pb

    def _key_pb(self, key: _Key) -> kms_v1.CryptoKey:
        pb = kms_v1.CryptoKey(
            name=key.name, purpose=Purpose.ENCRYPT_DECRYPT, create_time=key.create_time, labels=key.labels,
            version_template=kms_v1.CryptoKeyVersionTemplate(protection_level=key.protection_level,
                                                             algorithm=Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION),
            destroy_scheduled_duration=key.destroy_scheduled_duration)
        if key.primary is not None:
            pb.primary = self._version_pb(key.versions[key.primary])
        if key.rotation_period is not None:
            pb.rotation_period = key.rotation_period
        if key.next_rotation_time is not None:
            pb.next_rotation_time = key.next_rotation_time
        return pb

    @staticmethod
    def _check_rotation(period: dt.timedelta | None, next_time: dt.datetime | None) -> None:
        if period is not None:
            if not MIN_ROTATION <= period <= MAX_ROTATION:
                raise _invalid("rotation_period must be at least 24 hours and at most 876,000 hours.")
            if next_time is None:
                raise _invalid("next_rotation_time must be set if rotation_period is set.")

    # ----------------------------------------------------------------------------------------- KMS RPCs

    def CreateKeyRing(self, request: kms_v1.CreateKeyRingRequest, email: str) -> kms_v1.KeyRing:
        parent = _parse("location", request.parent)
        self._require(email, "cloudkms.keyRings.create", parent)
        if not _ID_RE.fullmatch(request.key_ring_id):
            raise _invalid(f"Invalid key_ring_id [{request.key_ring_id}]: must match [a-zA-Z0-9_-]{{1,63}}.")
        name = f"{parent}/keyRings/{request.key_ring_id}"
        if name in self._key_rings:
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"KeyRing {name} already exists.")
        self._key_rings[name] = self.now()
        return kms_v1.KeyRing(name=name, create_time=self._key_rings[name])

    def GetKeyRing(self, request: kms_v1.GetKeyRingRequest, email: str) -> kms_v1.KeyRing:
        name = _parse("key_ring", request.name)
        self._require(email, "cloudkms.keyRings.get", name)
        self._existing_key_ring(name)
        return kms_v1.KeyRing(name=name, create_time=self._key_rings[name])

    def ListKeyRings(self, request: kms_v1.ListKeyRingsRequest, email: str) -> kms_v1.ListKeyRingsResponse:
        parent = _parse("location", request.parent)
        self._require(email, "cloudkms.keyRings.list", parent)
        if request.order_by:
            raise _invalid("order_by is not supported by the test server.")
        rings = sorted(n for n in self._key_rings if _parent_of(n) == parent
                       and _matches(request.filter, {"name": n}))
        page, token = _page(rings, lambda n: n, request, parent)
        return kms_v1.ListKeyRingsResponse(key_rings=[kms_v1.KeyRing(name=n, create_time=self._key_rings[n])
                                                      for n in page],
                                           next_page_token=token, total_size=len(rings))

    def CreateCryptoKey(self, request: kms_v1.CreateCryptoKeyRequest, email: str) -> kms_v1.CryptoKey:
        parent = _parse("key_ring", request.parent)
        self._require(email, "cloudkms.cryptoKeys.create", parent)
        self._existing_key_ring(parent)
        if not _ID_RE.fullmatch(request.crypto_key_id):
            raise _invalid(f"Invalid crypto_key_id [{request.crypto_key_id}]: must match [a-zA-Z0-9_-]{{1,63}}.")
        spec = request.crypto_key
        if spec.purpose != Purpose.ENCRYPT_DECRYPT:
            raise _invalid(f"Unsupported purpose {Purpose(spec.purpose).name}: the test server supports "
                           "ENCRYPT_DECRYPT only.")
        level = spec.version_template.protection_level or Level.SOFTWARE
        if level not in (Level.SOFTWARE, Level.HSM):
            raise _invalid(f"Unsupported protection_level {Level(level).name}: SOFTWARE or HSM.")
        algorithm = spec.version_template.algorithm
        if algorithm not in (Algorithm.CRYPTO_KEY_VERSION_ALGORITHM_UNSPECIFIED, Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION):
            raise _invalid(f"Algorithm {Algorithm(algorithm).name} is not compatible with purpose ENCRYPT_DECRYPT.")
        if spec.import_only:
            raise _invalid("import_only keys are not supported by the test server.")
        period = spec.rotation_period if "rotation_period" in spec else None
        next_time = spec.next_rotation_time if "next_rotation_time" in spec else None
        self._check_rotation(period, next_time)
        destroy = DEFAULT_DESTROY_DURATION
        if "destroy_scheduled_duration" in spec:
            destroy = spec.destroy_scheduled_duration
            if not MIN_DESTROY_DURATION <= destroy <= MAX_DESTROY_DURATION:
                raise _invalid("destroy_scheduled_duration must be between 24 hours and 120 days.")
        name = f"{parent}/cryptoKeys/{request.crypto_key_id}"
        if name in self._keys:
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"CryptoKey {name} already exists.")
        now = self.now()
        key = _Key(name, now, Level(level), destroy, dict(spec.labels), period,
                   next_time.astimezone(UTC) if next_time else None)
        if not request.skip_initial_version_creation:
            key.primary = self._new_version(key, now).number
        self._keys[name] = key
        return self._key_pb(key)

    def GetCryptoKey(self, request: kms_v1.GetCryptoKeyRequest, email: str) -> kms_v1.CryptoKey:
        name = _parse("crypto_key", request.name)
        self._require(email, "cloudkms.cryptoKeys.get", name)
        return self._key_pb(self._existing_key(name))

    def ListCryptoKeys(self, request: kms_v1.ListCryptoKeysRequest, email: str) -> kms_v1.ListCryptoKeysResponse:
        parent = _parse("key_ring", request.parent)
        self._require(email, "cloudkms.cryptoKeys.list", parent)
        self._existing_key_ring(parent)
        if request.order_by:
            raise _invalid("order_by is not supported by the test server.")
        keys = []
        for name in sorted(n for n in self._keys if _parent_of(n) == parent):
            key = self._existing_key(name)
            fields = {"name": name, "purpose": "ENCRYPT_DECRYPT",
                      "version_template.protection_level": Level(key.protection_level).name,
                      "primary.state": State(key.versions[key.primary].state).name if key.primary else ""}
            fields.update({f"labels.{k}": v for k, v in key.labels.items()})
            if _matches(request.filter, fields):
                keys.append(key)
        page, token = _page(keys, lambda k: k.name, request, parent)
        return kms_v1.ListCryptoKeysResponse(crypto_keys=[self._key_pb(k) for k in page], next_page_token=token,
                                             total_size=len(keys))

    def UpdateCryptoKey(self, request: kms_v1.UpdateCryptoKeyRequest, email: str) -> kms_v1.CryptoKey:
        spec = request.crypto_key
        name = _parse("crypto_key", spec.name)
        self._require(email, "cloudkms.cryptoKeys.update", name)
        key = self._existing_key(name)
        paths = list(request.update_mask.paths)
        if not paths:
            raise _invalid("The request must specify an update_mask.")
        unknown = [p for p in paths if p not in ("rotation_period", "next_rotation_time", "labels")]
        if unknown:
            raise _invalid(f"Field(s) {', '.join(unknown)} in update_mask cannot be updated.")
        period, next_time = key.rotation_period, key.next_rotation_time
        if "rotation_period" in paths:
            period = spec.rotation_period if "rotation_period" in spec else None
        if "next_rotation_time" in paths:
            next_time = spec.next_rotation_time.astimezone(UTC) if "next_rotation_time" in spec else None
        self._check_rotation(period, next_time)
        key.rotation_period, key.next_rotation_time = period, next_time
        if "labels" in paths:
            key.labels = dict(spec.labels)
        self._refresh(key)
        return self._key_pb(key)

    def CreateCryptoKeyVersion(self, request: kms_v1.CreateCryptoKeyVersionRequest,
                               email: str) -> kms_v1.CryptoKeyVersion:
        parent = _parse("crypto_key", request.parent)
        self._require(email, "cloudkms.cryptoKeyVersions.create", parent)
        key = self._existing_key(parent)
        if request.crypto_key_version.state not in (State.CRYPTO_KEY_VERSION_STATE_UNSPECIFIED, State.ENABLED):
            raise _invalid("crypto_key_version.state must be unset or ENABLED.")
        return self._version_pb(self._new_version(key, self.now()))

    def GetCryptoKeyVersion(self, request: kms_v1.GetCryptoKeyVersionRequest, email: str) -> kms_v1.CryptoKeyVersion:
        name = _parse("version", request.name)
        self._require(email, "cloudkms.cryptoKeyVersions.get", name)
        return self._version_pb(self._existing_version(name))

    def ListCryptoKeyVersions(self, request: kms_v1.ListCryptoKeyVersionsRequest,
                              email: str) -> kms_v1.ListCryptoKeyVersionsResponse:
        parent = _parse("crypto_key", request.parent)
        self._require(email, "cloudkms.cryptoKeyVersions.list", parent)
        key = self._existing_key(parent)
        if request.order_by:
            raise _invalid("order_by is not supported by the test server.")
        versions = [v for v in key.versions.values()
                    if _matches(request.filter, {"name": v.name, "state": State(v.state).name,
                                                 "protection_level": Level(v.protection_level).name,
                                                 "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION"})]
        page, token = _page(versions, lambda v: v.number, request, parent)
        return kms_v1.ListCryptoKeyVersionsResponse(crypto_key_versions=[self._version_pb(v) for v in page],
                                                    next_page_token=token, total_size=len(versions))

    def UpdateCryptoKeyVersion(self, request: kms_v1.UpdateCryptoKeyVersionRequest,
                               email: str) -> kms_v1.CryptoKeyVersion:
        spec = request.crypto_key_version
        name = _parse("version", spec.name)
        self._require(email, "cloudkms.cryptoKeyVersions.update", name)
        version = self._existing_version(name)
        paths = list(request.update_mask.paths)
        if not paths:
            raise _invalid("The request must specify an update_mask.")
        if paths != ["state"]:
            raise _invalid(f"Field(s) {', '.join(p for p in paths if p != 'state')} in update_mask cannot be updated.")
        if spec.state not in (State.ENABLED, State.DISABLED):
            raise _invalid(f"crypto_key_version.state can only be set to ENABLED or DISABLED, not "
                           f"{State(spec.state).name}.")
        if version.state not in (State.ENABLED, State.DISABLED):
            raise _state_precondition(name, version.state)
        version.state = State(spec.state)
        return self._version_pb(version)

    def UpdateCryptoKeyPrimaryVersion(self, request: kms_v1.UpdateCryptoKeyPrimaryVersionRequest,
                                      email: str) -> kms_v1.CryptoKey:
        name = _parse("crypto_key", request.name)
        self._require(email, "cloudkms.cryptoKeys.update", name)
        key = self._existing_key(name)
        version_id = request.crypto_key_version_id
        if not re.fullmatch(r"[1-9][0-9]*", version_id or ""):
            raise _invalid(f"Invalid crypto_key_version_id [{version_id}].")
        version = self._existing_version(f"{name}/cryptoKeyVersions/{version_id}")
        if version.state != State.ENABLED:
            raise _state_precondition(version.name, version.state)
        key.primary = version.number
        return self._key_pb(key)

    def DestroyCryptoKeyVersion(self, request: kms_v1.DestroyCryptoKeyVersionRequest,
                                email: str) -> kms_v1.CryptoKeyVersion:
        name = _parse("version", request.name)
        self._require(email, "cloudkms.cryptoKeyVersions.destroy", name)
        version = self._existing_version(name)
        if version.state not in (State.ENABLED, State.DISABLED):
            raise _state_precondition(name, version.state)
        version.state = State.DESTROY_SCHEDULED
        version.destroy_time = self.now() + self._keys[version.key_name].destroy_scheduled_duration
        return self._version_pb(version)

    def RestoreCryptoKeyVersion(self, request: kms_v1.RestoreCryptoKeyVersionRequest,
                                email: str) -> kms_v1.CryptoKeyVersion:
        name = _parse("version", request.name)
        self._require(email, "cloudkms.cryptoKeyVersions.restore", name)
        version = self._existing_version(name)
        if version.state != State.DESTROY_SCHEDULED:
            raise _state_precondition(name, version.state)
        version.state = State.DISABLED
        version.destroy_time = None
        return self._version_pb(version)

    def Encrypt(self, request: kms_v1.EncryptRequest, email: str) -> kms_v1.EncryptResponse:
        name = request.name
        is_version = bool(_NAME_PATTERNS["version"].fullmatch(name or ""))
        if not is_version:
            _parse("crypto_key", name)
        self._require(email, "cloudkms.cryptoKeyVersions.useToEncrypt", name)
        if is_version:
            version = self._existing_version(name)
        else:
            key = self._existing_key(name)
            if key.primary is None:
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"The request cannot be fulfilled. CryptoKey {name} has no primary CryptoKeyVersion.")
            version = key.versions[key.primary]
        plaintext, aad = request.plaintext, request.additional_authenticated_data
        if not plaintext:
            raise _invalid("The field plaintext must not be empty.")
        if len(plaintext) > MAX_DATA:
            raise _invalid(f"The plaintext must be no larger than {MAX_DATA} bytes.")
        if len(aad) > MAX_DATA:
            raise _invalid(f"The additional_authenticated_data must be no larger than {MAX_DATA} bytes.")
        verified_plaintext = self._verify_crc(request, "plaintext_crc32c", plaintext, "plaintext")
        verified_aad = self._verify_crc(request, "additional_authenticated_data_crc32c", aad,
                                        "additional_authenticated_data")
        if version.state != State.ENABLED:
            raise _state_precondition(version.name, version.state)
        header = CIPHERTEXT_FORMAT + version.uid
        nonce = os.urandom(_NONCE)
        ciphertext = header + nonce + AESGCM(version.material).encrypt(nonce, plaintext, header + aad)
        return kms_v1.EncryptResponse(name=version.name, ciphertext=ciphertext, ciphertext_crc32c=_crc(ciphertext),
                                      verified_plaintext_crc32c=verified_plaintext,
                                      verified_additional_authenticated_data_crc32c=verified_aad,
                                      protection_level=version.protection_level)

    def Decrypt(self, request: kms_v1.DecryptRequest, email: str) -> kms_v1.DecryptResponse:
        name = request.name
        if _NAME_PATTERNS["version"].fullmatch(name or ""):
            raise _invalid(f"The name of a Decrypt request must be a CryptoKey, not the CryptoKeyVersion {name}.")
        _parse("crypto_key", name)
        self._require(email, "cloudkms.cryptoKeyVersions.useToDecrypt", name)
        key = self._existing_key(name)
        ciphertext, aad = request.ciphertext, request.additional_authenticated_data
        if not ciphertext:
            raise _invalid("The field ciphertext must not be empty.")
        self._verify_crc(request, "ciphertext_crc32c", ciphertext, "ciphertext")
        self._verify_crc(request, "additional_authenticated_data_crc32c", aad, "additional_authenticated_data")
        invalid = _invalid("Decryption failed: the ciphertext is invalid.")
        if len(ciphertext) < _HEADER + _NONCE + _TAG or ciphertext[:1] != CIPHERTEXT_FORMAT:
            raise invalid
        version = self._by_uid.get(ciphertext[1:_HEADER])
        if version is None or version.key_name != key.name:
            raise invalid
        if version.state != State.ENABLED:
            raise _state_precondition(version.name, version.state)
        header, nonce, body = ciphertext[:_HEADER], ciphertext[_HEADER:_HEADER + _NONCE], ciphertext[_HEADER + _NONCE:]
        try:
            plaintext = AESGCM(version.material).decrypt(nonce, body, header + aad)
        except InvalidTag:
            raise invalid from None
        return kms_v1.DecryptResponse(plaintext=plaintext, plaintext_crc32c=_crc(plaintext),
                                      used_primary=version.number == key.primary,
                                      protection_level=version.protection_level)

    @staticmethod
    def _verify_crc(request, field_name: str, data: bytes, data_field: str) -> bool:
        if field_name not in request:
            return False
        if getattr(request, field_name) != _crc(data):
            raise _invalid(f"The checksum in field {field_name} did not match the data in field {data_field}.")
        return True

    # ----------------------------------------------------------------------------------------- IAM RPCs

    def _iam_resource(self, resource: str, action: str) -> str:
        if _NAME_PATTERNS["crypto_key"].fullmatch(resource or ""):
            permission = f"cloudkms.cryptoKeys.{action}"
        elif _NAME_PATTERNS["key_ring"].fullmatch(resource or ""):
            permission = f"cloudkms.keyRings.{action}"
        else:
            raise _invalid(f"Resource name [{resource}] does not match any known resource name pattern.")
        return permission

    def _check_iam_target(self, resource: str, email: str, action: str) -> None:
        self._require(email, self._iam_resource(resource, action), resource)
        if "/cryptoKeys/" in resource:
            self._existing_key(resource)
        else:
            self._existing_key_ring(resource)

    def _policy_pb(self, resource: str) -> policy_pb2.Policy:
        policy = self._policies.get(resource) or _Policy()
        bindings = [policy_pb2.Binding(role=role, members=sorted(members))
                    for role, members in sorted(policy.bindings.items())]
        return policy_pb2.Policy(version=1, etag=policy.etag, bindings=bindings)

    def GetIamPolicy(self, request: iam_policy_pb2.GetIamPolicyRequest, email: str) -> policy_pb2.Policy:
        self._check_iam_target(request.resource, email, "getIamPolicy")
        return self._policy_pb(request.resource)

    def SetIamPolicy(self, request: iam_policy_pb2.SetIamPolicyRequest, email: str) -> policy_pb2.Policy:
        self._check_iam_target(request.resource, email, "setIamPolicy")
        current = self._policies.get(request.resource) or _Policy()
        if request.policy.etag and request.policy.etag != current.etag:
            raise RpcError(grpc.StatusCode.ABORTED,
                           "There were concurrent policy changes. Please retry the whole read-modify-write with "
                           "exponential backoff.")
        bindings: dict[str, set[str]] = {}
        for binding in request.policy.bindings:
            if binding.HasField("condition"):
                raise _invalid("Conditional role bindings are not supported by the test server.")
            bindings.setdefault(binding.role, set()).update(binding.members)
        self._validate_bindings(bindings, _invalid)
        self._store_policy(request.resource, bindings)
        return self._policy_pb(request.resource)

    def TestIamPermissions(self, request: iam_policy_pb2.TestIamPermissionsRequest,
                           email: str) -> iam_policy_pb2.TestIamPermissionsResponse:
        self._iam_resource(request.resource, "get")
        granted = self._permissions_of(email, request.resource)
        return iam_policy_pb2.TestIamPermissionsResponse(permissions=[p for p in request.permissions if p in granted])

    # ----------------------------------------------------------------------------------------- gRPC wiring

    def _wrap(self, method: str) -> Callable:
        implementation = getattr(self, method)

        def handler(request, context):
            with self._lock:
                self.calls[method] += 1
            try:
                email = self._authenticate(context)
                with self._lock:
                    return implementation(request, email)
            except RpcError as error:
                context.abort(error.code, error.message)
            except Exception:
                self.errors.append(traceback.format_exc())
                context.abort(grpc.StatusCode.INTERNAL, f"Internal error in the test server's {method}.")

        return handler

    def _kms_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        methods = {
            "CreateKeyRing": (kms_v1.CreateKeyRingRequest, kms_v1.KeyRing),
            "GetKeyRing": (kms_v1.GetKeyRingRequest, kms_v1.KeyRing),
            "ListKeyRings": (kms_v1.ListKeyRingsRequest, kms_v1.ListKeyRingsResponse),
            "CreateCryptoKey": (kms_v1.CreateCryptoKeyRequest, kms_v1.CryptoKey),
            "GetCryptoKey": (kms_v1.GetCryptoKeyRequest, kms_v1.CryptoKey),
            "ListCryptoKeys": (kms_v1.ListCryptoKeysRequest, kms_v1.ListCryptoKeysResponse),
            "UpdateCryptoKey": (kms_v1.UpdateCryptoKeyRequest, kms_v1.CryptoKey),
            "CreateCryptoKeyVersion": (kms_v1.CreateCryptoKeyVersionRequest, kms_v1.CryptoKeyVersion),
            "GetCryptoKeyVersion": (kms_v1.GetCryptoKeyVersionRequest, kms_v1.CryptoKeyVersion),
            "ListCryptoKeyVersions": (kms_v1.ListCryptoKeyVersionsRequest, kms_v1.ListCryptoKeyVersionsResponse),
            "UpdateCryptoKeyVersion": (kms_v1.UpdateCryptoKeyVersionRequest, kms_v1.CryptoKeyVersion),
            "UpdateCryptoKeyPrimaryVersion": (kms_v1.UpdateCryptoKeyPrimaryVersionRequest, kms_v1.CryptoKey),
            "DestroyCryptoKeyVersion": (kms_v1.DestroyCryptoKeyVersionRequest, kms_v1.CryptoKeyVersion),
            "RestoreCryptoKeyVersion": (kms_v1.RestoreCryptoKeyVersionRequest, kms_v1.CryptoKeyVersion),
            "Encrypt": (kms_v1.EncryptRequest, kms_v1.EncryptResponse),
            "Decrypt": (kms_v1.DecryptRequest, kms_v1.DecryptResponse),
        }
        return {
            method: grpc.unary_unary_rpc_method_handler(self._wrap(method), request_deserializer=req.deserialize,
                                                        response_serializer=resp.serialize)
            for method, (req, resp) in methods.items()
        }

    def _iam_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        methods = {
            "GetIamPolicy": (iam_policy_pb2.GetIamPolicyRequest, policy_pb2.Policy),
            "SetIamPolicy": (iam_policy_pb2.SetIamPolicyRequest, policy_pb2.Policy),
            "TestIamPermissions": (iam_policy_pb2.TestIamPermissionsRequest, iam_policy_pb2.TestIamPermissionsResponse),
        }
        return {
            method: grpc.unary_unary_rpc_method_handler(self._wrap(method), request_deserializer=req.FromString,
                                                        response_serializer=resp.SerializeToString)
            for method, (req, resp) in methods.items()
        }
