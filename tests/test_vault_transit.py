"""The Vault/OpenBao Transit backend against a real OpenBao server."""

from __future__ import annotations

import secrets

import pytest

from keyrotation.backends.base import versions_text
from keyrotation.backends.vault_transit import REWRAP_BATCH, VaultTransitBackend
from keyrotation.errors import BackendError, KeyNotFoundError


@pytest.fixture
def backend(vault):
    return VaultTransitBackend(vault, f"t-{secrets.token_hex(4)}")


def test_state_create_rotate(backend):
    assert backend.key_state().exists is False
    with pytest.raises(KeyNotFoundError, match=backend.key_ref):
        backend.rotate()
    state = backend.create_key()
    assert (state.exists, state.latest_version, state.min_decryption_version) == (True, 1, 1)
    assert state.created_at(1) is not None
    assert backend.rotate() == 2
    assert sorted(backend.key_state().versions) == [1, 2]
    assert backend.key_state().summary()["latest_version"] == 2


def test_wrap_unwrap_versions_and_rewrap_in_batches(backend):
    backend.create_key()
    secret = secrets.token_bytes(32)
    w1 = backend.wrap(secret)
    assert backend.version_of(w1) == 1 and backend.unwrap(w1) == secret
    backend.rotate()
    assert backend.version_of(backend.wrap(secret)) == 2
    assert backend.version_of(backend.wrap(secret, version=1)) == 1
    # More than one batch: OpenBao refuses 500 strings in one request; the backend splits at 250.
    items = [backend.wrap(secrets.token_bytes(16), version=1) for _ in range(REWRAP_BATCH + 10)]
    rewrapped = backend.rewrap(items)
    assert len(rewrapped) == len(items) and {backend.version_of(c) for c in rewrapped} == {2}
    assert backend.unwrap(rewrapped[-1]) == backend.unwrap(items[-1])


def test_rewrap_sends_each_distinct_ciphertext_once_in_batches_of_max_batch(backend, monkeypatch):
    assert VaultTransitBackend.max_batch == REWRAP_BATCH == 250  # OpenBao's default JSON limits refuse 500
    backend.create_key()
    distinct = [backend.wrap(secrets.token_bytes(16)) for _ in range(5)]
    backend.rotate()
    sent: list[int] = []
    real = backend._transit.rewrap_data

    def counting(*args, **kwargs):
        sent.append(len(kwargs["batch_input"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(backend._transit, "rewrap_data", counting)
    monkeypatch.setattr(backend, "max_batch", 2)
    items = distinct * 3 + distinct[:1]
    rewrapped = backend.rewrap(items, 2)
    assert sent == [2, 2, 1]  # 5 distinct ciphertexts, 2 a request
    assert len(rewrapped) == len(items) and rewrapped[:5] * 3 + rewrapped[:1] == rewrapped
    assert [backend.unwrap(c) for c in rewrapped] == [backend.unwrap(c) for c in items]
    assert {backend.version_of(c) for c in rewrapped} == {2}


def test_retire_below_refuses_old_versions_and_trims(backend):
    backend.create_key()
    old = backend.wrap(b"k" * 32)
    backend.rotate()
    backend.rotate()
    assert backend.retirement_effect([1], trim=True) == (
        f"raises the minimum decryption and encryption version of Transit key `{backend.key_ref}` to v2: v1 can no "
        "longer decrypt or encrypt; trim deletes that key material at once, permanently")
    assert versions_text([1, 2, 3]) == "versions v1..v3" and versions_text([1, 3]) == "versions v1, v3"
    state = backend.retire_below(2)
    assert (state.min_decryption_version, state.min_encryption_version) == (2, 2)
    with pytest.raises(BackendError, match=r"decrypt \(ciphertext version v1\) failed"):
        backend.unwrap(old)
    assert not backend.is_version_usable(1)
    assert backend.is_version_usable(3)
    with pytest.raises(BackendError, match="latest is v3"):
        backend.retire_below(4)


def test_version_of_rejects_foreign_ciphertext(backend):
    with pytest.raises(BackendError, match="no vault:vN: prefix"):
        backend.version_of("AQICAHh...")
