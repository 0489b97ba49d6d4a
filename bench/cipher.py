"""The local cipher limit, measured in the same run: AES-256-GCM through ``cryptography``.

* bulk: one large buffer, encrypted and decrypted whole into buffers made once (the ceiling for bytes/s on
  one core), and the same through the allocating calls;
* per value: each small value encrypted with its own nonce (what per-value envelope encryption
  costs), on the benchmark's own column values and on 100-byte values.
"""

from __future__ import annotations

import os
import statistics
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MB = 1_000_000


class BulkYardstick:
    """Bulk AES-GCM (``encrypt_into``, one buffer, one core) with keys of ``key_bits``, measured one call at a time:
    what a measurement that runs beside it divides by, taken just before or around it so that both see the
    machine in the same state (a share of figures taken minutes apart mixes in how busy the machine was)."""

    def __init__(self, key_bits: int, buffer_mib: int = 64) -> None:
        self.key_bits = key_bits
        self.key = AESGCM(AESGCM.generate_key(bit_length=key_bits))
        self.data = os.urandom(buffer_mib * 1024 * 1024)
        self.sealed = bytearray(len(self.data) + 16)
        self.nonce = os.urandom(12)

    def seconds(self) -> float:
        """One ``encrypt_into`` of the buffer into ``sealed``, timed."""
        start = time.perf_counter()
        self.key.encrypt_into(self.nonce, self.data, None, self.sealed)
        return time.perf_counter() - start

    def mb_s(self) -> float:
        return len(self.data) / MB / self.seconds()


def bulk(buffer_mib: int, repeats: int) -> dict:
    """``encrypt_mb_s``/``decrypt_mb_s``: the non-allocating ``encrypt_into``/``decrypt_into`` into buffers made
    once, the cipher's own limit (what every share of "bulk AES-GCM" divides by); ``*_alloc_mb_s``: the allocating
    ``encrypt``/``decrypt``, which copy the result into a new bytes object each call."""
    yardstick = BulkYardstick(256, buffer_mib)
    key, data, nonce, sealed_into = yardstick.key, yardstick.data, yardstick.nonce, yardstick.sealed
    opened_into = bytearray(len(data))
    enc, dec, enc_alloc, dec_alloc = [], [], [], []
    for _ in range(repeats):
        enc.append(yardstick.seconds())
        start = time.perf_counter()
        key.decrypt_into(nonce, sealed_into, None, opened_into)
        dec.append(time.perf_counter() - start)
        start = time.perf_counter()
        sealed = key.encrypt(nonce, data, None)
        enc_alloc.append(time.perf_counter() - start)
        start = time.perf_counter()
        opened = key.decrypt(nonce, sealed, None)
        dec_alloc.append(time.perf_counter() - start)
        assert opened == data == opened_into and sealed == sealed_into
    size = len(data) / MB
    return {"buffer_bytes": len(data), "repeats": repeats, "call": "encrypt_into/decrypt_into",
            "encrypt_mb_s": round(size / statistics.median(enc), 1),
            "decrypt_mb_s": round(size / statistics.median(dec), 1),
            "encrypt_mb_s_best": round(size / min(enc), 1),
            "encrypt_alloc_mb_s": round(size / statistics.median(enc_alloc), 1),
            "decrypt_alloc_mb_s": round(size / statistics.median(dec_alloc), 1)}


def per_value(values: list[bytes]) -> dict:
    key = AESGCM(AESGCM.generate_key(bit_length=256))
    start = time.perf_counter()
    sealed = [(n := os.urandom(12)) + key.encrypt(n, v, None) for v in values]
    enc_s = time.perf_counter() - start
    new_key = AESGCM(AESGCM.generate_key(bit_length=256))
    start = time.perf_counter()
    for item in sealed:  # full re-encryption of each value: decrypt, encrypt with a new data key
        plain = key.decrypt(item[:12], item[12:], None)
        n = os.urandom(12)
        new_key.encrypt(n, plain, None)
    reenc_s = time.perf_counter() - start
    size = sum(map(len, values)) / MB
    return {"values": len(values), "mean_value_bytes": round(sum(map(len, values)) / len(values), 1),
            "encrypt_values_per_s": round(len(values) / enc_s, 1), "encrypt_mb_s": round(size / enc_s, 2),
            "reencrypt_values_per_s": round(len(values) / reenc_s, 1), "reencrypt_mb_s": round(size / reenc_s, 2)}


def measure(buffer_mib: int, repeats: int, column_values: list[bytes]) -> dict:
    return {
        "bulk": bulk(buffer_mib, repeats),
        "per_value_columns": per_value(column_values),
        "per_value_100_bytes": per_value([os.urandom(100) for _ in range(len(column_values))]),
    }
