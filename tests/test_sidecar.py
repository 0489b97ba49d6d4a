"""The sidecar (python -m keyrotation.sidecar) as a real uvicorn process on loopback, a Unix socket and mTLS,
in front of a real OpenBao and PostgreSQL: endpoints, health, metrics, errors, and a rotation with its rewrap
sweep and retirement in the middle of 2,000 requests."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import re
import secrets
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from helpers import CANARY, KEY_CLASS_YAML, PG_URL
from keyrotation import ledger as lg
from keyrotation.backends.vault_transit import VaultTransitBackend
from keyrotation.client import KeyRotationClient
from keyrotation.ledger import Ledger, RunContext
from keyrotation.rotation import update_reference
from keyrotation.stores.data_keys import DataKeyStore
from keyrotation_dev.devserver import OpenBaoDevServer, free_port, stop_process

ROOT = Path(__file__).resolve().parents[1]
ACTOR = RunContext(actor="test")


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def sample(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    """The key of one sample in :func:`exposition`."""
    return name, frozenset(labels.items())


def exposition(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {sample(s.name, **s.labels): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class Sidecar:
    """A key class (fresh Transit key at v1, the ledger's reference) and its sidecar in a subprocess."""

    def __init__(self, tmp: Path, bao: OpenBaoDevServer, pg: sa.Engine, tables: list[str]) -> None:
        self.tmp, self.bao, self.pg = tmp, bao, pg
        self.name = f"side_{secrets.token_hex(3)}"
        self.key_ref = f"sidecar-{secrets.token_hex(4)}"
        self.backend = VaultTransitBackend(bao.client(), self.key_ref)
        self.backend.create_key()
        (tmp / "config").mkdir(exist_ok=True)
        (tmp / "config" / f"{self.name}.yaml").write_text(KEY_CLASS_YAML.format(
            name=self.name, key_ref=self.key_ref, conn_id="unused", mode="rewrap", chunk_size=16, grace="0s",
            dataset="accounts", location=tmp / "data"))
        self.ledger_url = f"sqlite:///{tmp / 'ledger.db'}"
        self.ledger = Ledger(self.ledger_url)
        update_reference(self.name, 1, self.ledger, ACTOR)
        self.table = f"sc_{secrets.token_hex(3)}"
        tables.append(self.table)
        self.store = DataKeyStore(pg, self.backend, self.name)
        self.log = tmp / "sidecar.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, *extra: str, port: int | None = None, scheme: str = "http", transport=None, verify=True,
              token_file: bool = False) -> Sidecar:
        port = port or free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "VAULT_TOKEN": self.bao.token,
               "KEYROTATION_LEDGER_URL": self.ledger_url, "KEYROTATION_DB_URL": PG_URL}
        if token_file:  # as a Docker or Kubernetes secret would hand it over
            env.pop("VAULT_TOKEN")
            (self.tmp / "token").write_text(self.bao.token + "\n")
            env["VAULT_TOKEN_FILE"] = str(self.tmp / "token")
        args = [sys.executable, "-m", "keyrotation.sidecar", "--key-class", self.name, "--config-dir",
                str(self.tmp / "config"), "--vault-url", self.bao.url, "--port", str(port), "--poll-interval", "0.5",
                "--access-log", *extra]
        log = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._logfile = log
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, transport=transport, verify=verify, timeout=10)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if self.http.get("/healthz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"sidecar not healthy after 30 s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc:
            self.http.close()  # an open keep-alive connection would hold up the graceful shutdown
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self._logfile.close()

    def ctx(self, pk, partition: str | None = "2024-05-01", column: str = "email") -> dict:
        return {"table": self.table, "column": column, "pk": pk, "partition": partition}

    def encrypt(self, plaintext: str, pk, partition: str = "2024-05-01", http: httpx.Client | None = None
                ) -> httpx.Response:
        return (http or self.http).post("/v1/encrypt", json={"plaintext": b64(plaintext),
                                                             "context": self.ctx(pk, partition)})

    def decrypt(self, ciphertext: str, pk, http: httpx.Client | None = None) -> httpx.Response:
        return (http or self.http).post("/v1/decrypt", json={"ciphertext": ciphertext, "context": self.ctx(pk, None)})

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples ``name`` whose labels include ``labels``."""
        return sum(value for (sample, sample_labels), value in exposition(self.http.get("/metrics").text).items()
                   if sample == name and labels.items() <= dict(sample_labels).items())

    def kms_data_calls(self) -> float:
        return (self.metric("keyrotation_client_kms_calls_total", operation="wrap")
                + self.metric("keyrotation_client_kms_calls_total", operation="unwrap"))

    def rotate(self) -> int:
        version = self.backend.rotate()
        update_reference(self.name, version, self.ledger, ACTOR)
        return version

    def assert_clean_log(self) -> None:
        text = self.log.read_text()
        assert CANARY not in text and b64(CANARY)[:12] not in text
        assert self.bao.token not in text



@pytest.fixture
def make_sidecar(tmp_path, openbao, pg):
    started: list[Sidecar] = []

    def make(bao: OpenBaoDevServer | None = None, sub: str = "a") -> Sidecar:
        (tmp_path / sub).mkdir()
        sidecar = Sidecar(tmp_path / sub, bao or openbao, *pg)
        started.append(sidecar)
        return sidecar

    yield make
    for sidecar in started:
        sidecar.stop()


def test_sidecar_encrypts_decrypts_and_reports_health_and_metrics(make_sidecar):
    s = make_sidecar().start()
    r = s.encrypt(f"{CANARY}-a@example.test", 42)
    assert r.status_code == 200 and r.json()["key_version"] == 1
    ciphertext = r.json()["ciphertext"]
    r = s.decrypt(ciphertext, 42)
    assert r.status_code == 200 and base64.b64decode(r.json()["plaintext"]) == f"{CANARY}-a@example.test".encode()
    # The same bytes as the library (and so the DAGs) write and read.
    library = KeyRotationClient(s.backend, s.ledger, s.name, db=s.pg)
    assert library.decrypt(base64.b64decode(ciphertext), s.ctx(42)) == f"{CANARY}-a@example.test".encode()
    theirs = library.encrypt("from the library", s.ctx("k-7"))
    assert base64.b64decode(s.decrypt(b64(theirs), "k-7").json()["plaintext"]) == b"from the library"
    for _ in range(50):
        assert s.decrypt(ciphertext, 42).status_code == 200

    health = s.http.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "key_class": s.name, "current_version": 1, "min_decryption_version": 0,
                             "checks": {"kms": "ok", "ledger": "ok", "data_keys_db": "ok"}}

    text = s.http.get("/metrics").text
    samples = exposition(text)
    assert samples[sample("keyrotation_sidecar_requests_total", endpoint="/v1/decrypt", status="200")] == 52
    assert samples[sample("keyrotation_sidecar_requests_total", endpoint="/v1/encrypt", status="200")] == 1
    assert samples[sample("keyrotation_sidecar_request_duration_seconds_bucket", endpoint="/v1/decrypt",
                          le="+Inf")] == 52
    assert "# TYPE keyrotation_sidecar_request_duration_seconds histogram" in text
    assert s.metric("keyrotation_client_cache_hits_total") >= 50
    # One data key for the partition, made by the sidecar (one wrap) and used by the library too.
    assert s.metric("keyrotation_client_cache_misses_total") == 1
    assert s.metric("keyrotation_client_kms_calls_total", operation="wrap") == 1
    assert s.metric("keyrotation_client_kms_calls_total", operation="unwrap") == 0
    assert samples[sample("keyrotation_client_current_version", key_class=s.name)] == 1
    assert CANARY not in text
    s.assert_clean_log()


def test_sidecar_bad_input_is_a_json_error_that_echoes_nothing(make_sidecar):
    s = make_sidecar().start()
    good = s.encrypt(f"{CANARY}-b", 1).json()["ciphertext"]
    tampered = base64.b64decode(good)
    tampered = b64(tampered[:-1] + bytes([tampered[-1] ^ 1]))
    cases = [
        ({"plaintext": f"{CANARY}!!", "context": s.ctx(1)}, "/v1/encrypt", 400, "bad_input", "not valid base64"),
        ({"plaintext": b64(CANARY), "context": {"table": s.table, "column": "email", "pk": 1}}, "/v1/encrypt", 400,
         "bad_input", "context.partition is required"),
        ({"plaintext": b64(CANARY)}, "/v1/encrypt", 400, "bad_input", "context: Field required"),
        ({"plaintext": 5, "context": s.ctx(1)}, "/v1/encrypt", 400, "bad_input", "plaintext: Input should be a valid"),
        ({"plaintext": b64(CANARY), "context": {**s.ctx(1), "pk": [CANARY]}}, "/v1/encrypt", 400, "bad_input",
         "context.pk"),
        ({"plaintext": b64(CANARY), "context": s.ctx(1), "extra": 1}, "/v1/encrypt", 400, "bad_input",
         "extra: Extra inputs are not permitted"),
        ({"ciphertext": good, "context": s.ctx(2, None)}, "/v1/decrypt", 400, "does_not_decrypt",
         f"{s.table}.email row 2: does not decrypt"),
        ({"ciphertext": tampered, "context": s.ctx(1, None)}, "/v1/decrypt", 400, "does_not_decrypt", "altered"),
        ({"ciphertext": b64(CANARY), "context": s.ctx(1, None)}, "/v1/decrypt", 400, "does_not_decrypt",
         "not a keyrotation envelope"),
        ({"plaintext": b64(b"x" * ((1 << 20) + 1)), "context": s.ctx(1)}, "/v1/encrypt", 413, "too_large", "larger"),
    ]
    for body, path, status, kind, message in cases:
        r = s.http.post(path, json=body)
        assert r.status_code == status, (body.keys(), r.text[:300])
        assert r.json()["error"] == kind and message in r.json()["message"], r.text[:300]
        assert CANARY not in r.text and b64(CANARY) not in r.text
    r = s.http.post("/v1/encrypt", content=b"{" + b" " * (3 << 20) + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    r = s.http.post("/v1/decrypt", content=f"{{not json {CANARY}", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "bad_input" and CANARY not in r.text
    assert s.http.get("/nowhere").status_code == 404
    text = s.http.get("/metrics").text
    samples = exposition(text)
    assert samples[sample("keyrotation_sidecar_requests_total", endpoint="/v1/encrypt", status="400")] == 6
    assert sample("keyrotation_sidecar_requests_total", endpoint="/other", status="404") not in samples
    assert samples[sample("keyrotation_sidecar_requests_total", endpoint="other", status="404")] == 1
    assert CANARY not in text
    s.assert_clean_log()


def test_sidecar_refuses_a_retired_version_with_409(make_sidecar):
    s = make_sidecar().start()
    old = s.encrypt(f"{CANARY}-old", 1, "2024-05-01").json()["ciphertext"]
    kept = s.encrypt(f"{CANARY}-kept", 2, "2024-05-02").json()["ciphertext"]
    v2 = s.rotate()
    s.store.rewrap(s.store.keys_of(s.table, "2024-05-02"), v2)  # one partition swept
    s.ledger.record(lg.VERSIONS_RETIRED, s.name, ACTOR, from_version=1, to_version=v2)
    deadline = time.monotonic() + 5
    while (r := s.decrypt(old, 1)).status_code == 200:  # until the next poll of the ledger
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert r.status_code == 409 and r.json()["error"] == "retired_version"
    assert re.search(rf"{s.table}\.email row 1: refusing to decrypt: its data key \S+ \(table {s.table}, partition "
                     r"2024-05-01\) is wrapped under v1 .* ledger marks it retired: versions below v2",
                     r.json()["message"])
    assert s.decrypt(kept, 2).status_code == 200
    assert s.encrypt("new", 3).json()["key_version"] == v2
    assert s.http.get("/healthz").json()["min_decryption_version"] == v2
    assert s.metric("keyrotation_client_errors_total", kind="retired_version") == 1
    s.assert_clean_log()


def test_sidecar_answers_503_when_the_kms_is_down_and_serves_cached_keys(make_sidecar, tmp_path):
    bao = OpenBaoDevServer(log_path=str(tmp_path / "bao2.log")).start()
    try:
        s = make_sidecar(bao).start()
        cached = s.encrypt(f"{CANARY}-c", 1, "2024-05-01").json()["ciphertext"]
    finally:
        bao.stop()
    assert s.decrypt(cached, 1).status_code == 200  # its data key is in the cache
    r = s.encrypt(f"{CANARY}-d", 2, "2024-05-09")  # a new partition needs the KMS
    assert r.status_code == 503 and r.json()["error"] == "kms_unavailable"
    assert r.json()["message"].startswith("KMS unreachable:") and CANARY not in r.text
    health = s.http.get("/healthz")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert health.json()["checks"]["kms"].startswith("KMS unreachable") and health.json()["checks"]["ledger"] == "ok"
    assert s.metric("keyrotation_client_errors_total", kind="kms_unavailable") == 1
    s.assert_clean_log()


def test_sidecar_on_a_unix_socket(make_sidecar, tmp_path):
    sock = tmp_path / "run" / "sidecar.sock"
    s = make_sidecar().start("--uds", str(sock), transport=httpx.HTTPTransport(uds=str(sock)), token_file=True)
    assert oct(sock.stat().st_mode & 0o777) == "0o660"
    ciphertext = s.encrypt(f"{CANARY}-u", 5).json()["ciphertext"]
    assert base64.b64decode(s.decrypt(ciphertext, 5).json()["plaintext"]) == f"{CANARY}-u".encode()
    s.stop()
    assert not sock.exists()
    s.assert_clean_log()


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, and a client certificate from
    another CA, all made here."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    out: dict[str, Path] = {}

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(label: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        out[label + "_cert"] = directory / f"{label}.pem"
        out[label + "_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[label + "_key"] = directory / f"{label}.key"
        out[label + "_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))

    def ca(label: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(label)).issuer_name(name(label))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        save(label, cert, key)
        return cert, key

    def leaf(label: str, issuer: tuple, usage, san: list | None = None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(label)).issuer_name(issuer[0].subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
                                  critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        save(label, builder.sign(issuer[1], hashes.SHA256()), key)

    root = ca("ca")
    leaf("server", root, ExtendedKeyUsageOID.SERVER_AUTH,
         [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    leaf("client", root, ExtendedKeyUsageOID.CLIENT_AUTH)
    leaf("stranger", ca("other_ca"), ExtendedKeyUsageOID.CLIENT_AUTH)
    return out


def test_sidecar_with_mtls_requires_a_client_certificate_from_its_ca(make_sidecar, tmp_path):
    certs = _certificates(tmp_path)

    def context(client: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(certs["ca_cert"]))
        if client:
            ctx.load_cert_chain(str(certs[f"{client}_cert"]), str(certs[f"{client}_key"]))
        return ctx

    s = make_sidecar().start("--ssl-certfile", str(certs["server_cert"]), "--ssl-keyfile", str(certs["server_key"]),
                             "--ssl-ca-certs", str(certs["ca_cert"]), scheme="https", verify=context("client"))
    ciphertext = s.encrypt(f"{CANARY}-m", 9).json()["ciphertext"]
    assert base64.b64decode(s.decrypt(ciphertext, 9).json()["plaintext"]) == f"{CANARY}-m".encode()
    for client in (None, "stranger"):  # no certificate, or one from another CA: refused in the handshake
        with httpx.Client(base_url=s.url, verify=context(client), timeout=5) as other, \
                pytest.raises(httpx.TransportError):
            other.get("/healthz")
    with httpx.Client(base_url=s.url.replace("https", "http"), timeout=5) as plain, pytest.raises(httpx.TransportError):
        plain.get("/healthz")
    s.assert_clean_log()


def test_a_rotation_rewrap_and_retirement_during_traffic_lose_no_request(make_sidecar):
    """2,000 requests from 8 connections while the key rotates, the reference moves, the data keys are
    re-wrapped, and then v1 is retired: every request answered, every value decrypts, few KMS calls."""
    s = make_sidecar().start()
    library = KeyRotationClient(s.backend, s.ledger, s.name, db=s.pg)
    days = [f"2024-06-{d:02d}" for d in range(1, 9)]
    stored = [(pk, f"{CANARY}-{pk}", b64(library.encrypt(f"{CANARY}-{pk}", s.ctx(pk, days[pk % 8]))))
              for pk in range(200)]
    kms_before = s.kms_data_calls()
    total, done, failures = 2000, [0], []
    written: list[tuple[int, str, str, int]] = []
    lock = threading.Lock()
    local = threading.local()

    def connection() -> httpx.Client:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=s.url, timeout=10)
        return local.http

    def request(i: int) -> None:
        http = connection()
        if i % 2:
            pk, plaintext, ciphertext = stored[i % len(stored)]
            r = s.decrypt(ciphertext, pk, http=http)
            ok = r.status_code == 200 and base64.b64decode(r.json()["plaintext"]) == plaintext.encode()
        else:
            pk, plaintext = 10_000 + i, f"{CANARY}-new-{i}"
            r = s.encrypt(plaintext, pk, days[i % 8], http=http)
            ok = r.status_code == 200
            if ok:
                with lock:
                    written.append((pk, plaintext, r.json()["ciphertext"], r.json()["key_version"]))
        with lock:
            done[0] += 1
            if not ok:
                failures.append((i, r.status_code, r.text[:200]))

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(request, i) for i in range(total)]
        while done[0] < total // 4:
            time.sleep(0.01)
        v2 = s.backend.rotate()  # the rotate DAG...
        update_reference(s.name, v2, s.ledger, ACTOR)
        swept = sum(s.store.rewrap(s.store.keys_of(s.table, day), v2) for day in days)  # ...and the rewrap sweep
        during = done[0]
        for f in futures:
            f.result()
    elapsed = time.monotonic() - start
    print(f"traffic: {total} requests in {elapsed:.2f}s, rotation+rewrap at request {during}")
    assert failures == [] and len(written) == total // 2
    assert during < total, "the rotation finished after the traffic; nothing was tested"
    assert swept >= 8
    late = [w for w in written if w[3] == v2]
    assert late, "no encryption under the new version during the traffic"
    assert elapsed < 30

    # Retire v1 (the KMS and the ledger): everything written before, during and after still decrypts.
    s.backend.retire_below(v2)
    s.ledger.record(lg.VERSIONS_RETIRED, s.name, ACTOR, from_version=1, to_version=v2)
    time.sleep(0.6)
    check = [(pk, p, c) for pk, p, c in stored] + [(pk, p, c) for pk, p, c, _ in written]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda w: s.decrypt(w[2], w[0], http=connection()), check[::3]))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:3]
    assert [base64.b64decode(a.json()["plaintext"]).decode() for a in answers] == [w[1] for w in check[::3]]

    requests = s.metric("keyrotation_client_requests_total")
    kms = s.kms_data_calls() - kms_before
    # 8 partitions: v1 data keys read once, v2 data keys made once, v1-era keys read again after the retirement.
    assert requests >= total and kms <= 3 * len(days) + 4, (requests, kms)
    assert s.metric("keyrotation_client_errors_total") == 0
    s.assert_clean_log()


def test_sidecar_keeps_credentials_out_of_argv(tmp_path, monkeypatch):
    from keyrotation import sidecar

    for option, env in (("--db-url", "KEYROTATION_DB_URL"), ("--ledger-url", "KEYROTATION_LEDGER_URL")):
        with pytest.raises(SystemExit) as err:
            sidecar.main(["--key-class", "x", option, "postgresql://app:hunter2@db/app"])
        assert f"{option} carries a password" in str(err.value) and f"${env}" in str(err.value)
        assert "hunter2" not in str(err.value)
    (tmp_path / "tok.yaml").write_text(KEY_CLASS_YAML.format(
        name="tok", key_ref="k", conn_id="unused", mode="rewrap", chunk_size=16, grace="0s", dataset="d",
        location=tmp_path))
    for name in ("VAULT_TOKEN", "VAULT_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KEYROTATION_LEDGER_URL", f"sqlite:///{tmp_path / 'l.db'}")
    monkeypatch.setenv("KEYROTATION_DB_URL", f"sqlite:///{tmp_path / 'd.db'}")
    with pytest.raises(SystemExit, match="VAULT_TOKEN .* is not set"):
        sidecar.main(["--key-class", "tok", "--config-dir", str(tmp_path), "--vault-url", "http://127.0.0.1:1"])


@pytest.mark.parametrize("cloud", ["aws_kms", "gcp_kms"])
def test_sidecar_serves_aws_kms_and_cloud_kms(cloud, request, tmp_path, pg):
    """The sidecar opens its backend through the same registry as the DAGs: AWS KMS on the moto server (the AWS
    credential chain from the environment) and Cloud KMS on the gRPC test server (a service account key file
    of the key class's re-encrypt role in GOOGLE_APPLICATION_CREDENTIALS); a value encrypted through it decrypts
    through it and through the library."""
    from keyrotation.backends.registry import open_backend

    engine, tables = pg
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "KEYROTATION_DB_URL": PG_URL,
           "KEYROTATION_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}"}
    if cloud == "aws_kms":
        moto = request.getfixturevalue("moto")
        config = request.getfixturevalue("make_aws_key_class")(f"sc_aws_{secrets.token_hex(2)}")
        backend = open_backend(config.key_class, moto.client("kms"))
        env.update(AWS_ACCESS_KEY_ID=moto.access_key, AWS_SECRET_ACCESS_KEY=moto.secret_key,
                   AWS_DEFAULT_REGION=moto.region)
        extra = ["--aws-endpoint-url", moto.url]
    else:
        import json

        from helpers import gcp_runtime

        gcp = request.getfixturevalue("gcp")
        config = request.getfixturevalue("make_gcp_key_class")(f"sc_gcp_{secrets.token_hex(2)}")
        backend = gcp_runtime(config, gcp).backend
        role = json.loads(os.environ[f"AIRFLOW_CONN_{config.key_class.conn_for('reencrypt').upper()}"])
        keyfile = tmp_path / "reencrypt.json"
        keyfile.write_text(role["extra"]["keyfile_dict"])
        env["GOOGLE_APPLICATION_CREDENTIALS"] = str(keyfile)  # the gRPC roots of the test server are inherited
        extra = ["--gcp-kms-endpoint", gcp.kms.endpoint]
    kc = config.key_class
    version = backend.create_key().latest_version
    ledger = Ledger(env["KEYROTATION_LEDGER_URL"])
    update_reference(kc.name, version, ledger, ACTOR)
    table = f"sc_{secrets.token_hex(3)}"
    tables.append(table)
    port = free_port()
    log = tmp_path / "sidecar.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "keyrotation.sidecar", "--key-class", kc.name, "--config-dir",
                                 str(Path(config.source).parent), "--port", str(port), *extra], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    health = http.get("/healthz")
                    if health.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            assert health.json()["current_version"] == version and health.json()["checks"]["kms"] == "ok"
            ctx = {"table": table, "column": "email", "pk": 7, "partition": "2024-05-01"}
            sealed = http.post("/v1/encrypt", json={"plaintext": b64(f"{CANARY}-{cloud}"), "context": ctx})
            assert sealed.status_code == 200 and sealed.json()["key_version"] == version, sealed.text
            opened = http.post("/v1/decrypt", json={"ciphertext": sealed.json()["ciphertext"],
                                                    "context": {**ctx, "partition": None}})
            assert opened.status_code == 200, opened.text
            assert base64.b64decode(opened.json()["plaintext"]) == f"{CANARY}-{cloud}".encode()
            library = KeyRotationClient(backend, ledger, kc.name, db=engine)
            assert library.decrypt(base64.b64decode(sealed.json()["ciphertext"]), ctx) == f"{CANARY}-{cloud}".encode()
    finally:
        stop_process(proc)
    assert CANARY not in log.read_text()
