"""The alternatives to PME's KEK rotation, measured at a size they can finish, on the same data.

(a) one KMS request per value: Transit ``encrypt`` per value (how such data is written), ``rewrap``
    per value (the cheapest rotation of it: one request each) and ``decrypt`` per value.
(b) batch ``rewrap`` of per-value Transit ciphertexts, ``batch_input`` of 250 (OpenBao's default JSON
    limits refuse 500), through the package's ``VaultTransitBackend.rewrap``.

The values are those of the encrypted columns (email, phone, ssn) of the benchmark's synthetic
customers, so one row holds ``len(ENCRYPTED_COLUMNS)`` values.
"""

from __future__ import annotations

import base64
import math
import time
from typing import Any

from bench.common import ENCRYPTED_COLUMNS, KmsCounter

BATCH = 250  # keyrotation.backends.vault_transit.REWRAP_BATCH


def column_values(count: int, partition: str = "2024-01-01") -> list[bytes]:
    """``count`` values of the encrypted columns of partition ``partition``, row by row."""
    from keyrotation_dev.sample_data import customers

    table = customers(partition, math.ceil(count / len(ENCRYPTED_COLUMNS)))
    columns = [table.column(c).to_pylist() for c in ENCRYPTED_COLUMNS]
    values = [str(v).encode() for row in zip(*columns, strict=True) for v in row]
    return values[:count]


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def measure(client: Any, counter: KmsCounter, per_value: int, batch_values: int) -> dict:
    from keyrotation.backends.vault_transit import VaultTransitBackend

    backend = VaultTransitBackend(client, "bench-values")
    backend.create_key()
    values = column_values(max(per_value, batch_values))
    out: dict[str, Any] = {"values_per_row": len(ENCRYPTED_COLUMNS), "columns": ENCRYPTED_COLUMNS,
                           "mean_value_bytes": round(sum(map(len, values)) / len(values), 1)}

    def timed(name: str, count: int, fn: Any) -> Any:
        counter.reset()
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        out[name] = {"values": count, "seconds": round(seconds, 3), "values_per_s": round(_rate(count, seconds), 1),
                     "kms_requests": counter.total}
        return result

    sample = values[:per_value]
    wrapped = timed("encrypt_per_value", per_value, lambda: [backend.wrap(v) for v in sample])
    target = backend.rotate()
    rewrapped = timed("rewrap_per_value", per_value, lambda: [backend.rewrap([c], target)[0] for c in wrapped])
    plain = timed("decrypt_per_value", per_value, lambda: [backend.unwrap(c) for c in rewrapped])
    assert plain == sample, "per-value round trip changed the data"
    assert {backend.version_of(c) for c in rewrapped} == {target}

    # (b): per-value ciphertexts made with batch encrypt (250 a request), then rotated by batch rewrap.
    many = values[:batch_values]

    def batch_encrypt() -> list[str]:
        out_ct: list[str] = []
        for start in range(0, len(many), BATCH):
            items = [{"plaintext": base64.b64encode(v).decode()} for v in many[start:start + BATCH]]
            resp = client.secrets.transit.encrypt_data("bench-values", plaintext="", batch_input=items)
            out_ct += [item["ciphertext"] for item in resp["data"]["batch_results"]]
        return out_ct

    batch_wrapped = timed("encrypt_batch_250", batch_values, batch_encrypt)
    target = backend.rotate()
    batch_rewrapped = timed("rewrap_batch_250", batch_values, lambda: backend.rewrap(batch_wrapped, target))
    assert len(batch_rewrapped) == batch_values and {backend.version_of(c) for c in batch_rewrapped} == {target}
    out["rewrap_batch_250"]["batch_size"] = BATCH
    # Full re-encryption per value through the KMS: decrypt, then encrypt under the new version.
    per_value_s = 1 / out["decrypt_per_value"]["values_per_s"] + 1 / out["encrypt_per_value"]["values_per_s"]
    out["decrypt_encrypt_per_value"] = {"values_per_s": round(1 / per_value_s, 1), "derived": True}
    return out


def extrapolate(alt: dict, rows: int) -> dict:
    """Wall time and KMS requests of rotating ``rows`` rows' values with each alternative, at the measured rates."""
    values = rows * alt["values_per_row"]
    return {
        "per_value_rewrap": {"seconds": values / alt["rewrap_per_value"]["values_per_s"], "kms_requests": values},
        "per_value_decrypt_encrypt": {"seconds": values / alt["decrypt_encrypt_per_value"]["values_per_s"],
                                      "kms_requests": 2 * values},
        "batch_rewrap_250": {"seconds": values / alt["rewrap_batch_250"]["values_per_s"],
                             "kms_requests": math.ceil(values / BATCH)},
    }
