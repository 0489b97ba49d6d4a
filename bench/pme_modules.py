"""Module-level PME re-encryption (issue 21) against bulk AES-256-GCM, on one core: ``python -m bench.pme_modules``.

A file of about ``--mb`` MB is written by pyarrow with one explicit key (uniform encryption: every column, the
harshest case per file byte), then re-encrypted under a new key in memory (:func:`reencrypt_in_place`) and file
to file (:func:`reencrypt_file`), each run between two runs of ``AESGCM.encrypt_into`` on a 64 MiB buffer; the
ratios are per file byte, medians over ``--repeats`` runs. Verification (each new module decrypted again and
compared) is included. Pin it to one core (``taskset -c 1``) on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotation.formats.pme_modules import ModuleKeys, reencrypt_file, reencrypt_in_place

MB = 1_000_000


def _table(rows: int) -> pa.Table:
    rng = np.random.default_rng(1)
    return pa.table({
        "id": pa.array(np.arange(rows)),
        "email": pa.array([f"user{i}@example.com" for i in rng.integers(0, 10**9, rows)]),
        "ssn": pa.array(rng.integers(0, 10**9, rows)),
        "score": pa.array(rng.random(rows)),
        "city": pa.array([f"city{i}" for i in rng.integers(0, 50_000, rows)]),
    })


def measure(mb: int, repeats: int, checksums: bool) -> dict:
    old, new = os.urandom(16), os.urandom(16)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = str(Path(tmp) / "src.parquet"), str(Path(tmp) / "dst.parquet")
        pq.write_table(_table(mb * 31_000), src, write_page_checksum=checksums,
                       encryption_properties=pe.create_encryption_properties(old))
        data = Path(src).read_bytes()
        big = bytearray(64 << 20)
        sealed = bytearray(len(big) + 16)
        aes, nonce = AESGCM(AESGCM.generate_key(bit_length=256)), os.urandom(12)

        def bulk() -> float:
            start = time.perf_counter()
            aes.encrypt_into(nonce, big, None, sealed)
            return len(big) / (time.perf_counter() - start)

        memory, files, bulks = [], [], []
        for _ in range(repeats):
            before = bulk()
            buf = bytearray(data)
            start = time.perf_counter()
            result = reencrypt_in_place(buf, ModuleKeys(old), ModuleKeys(new))
            in_memory = len(data) / (time.perf_counter() - start)
            middle = bulk()
            start = time.perf_counter()
            reencrypt_file(src, dst, pafs.LocalFileSystem(), ModuleKeys(old), ModuleKeys(new))
            to_file = len(data) / (time.perf_counter() - start)
            after = bulk()
            bulks.append(max(before, middle, after))
            memory.append((in_memory, in_memory / max(before, middle)))
            files.append((to_file, to_file / max(middle, after)))
        properties = pe.create_decryption_properties(new)
        assert pq.read_table(dst, decryption_properties=properties, page_checksum_verification=True).num_rows
    return {
        "file_mb": round(len(data) / MB, 1), "page_checksums": checksums, "modules": result.modules,
        "crc_retries": result.crc_retries, "bulk_mb_s": round(statistics.median(bulks) / MB),
        "in_memory_mb_s": round(statistics.median(m for m, _ in memory) / MB),
        "in_memory_x_bulk": round(statistics.median(r for _, r in memory), 2),
        "file_to_file_mb_s": round(statistics.median(f for f, _ in files) / MB),
        "file_to_file_x_bulk": round(statistics.median(r for _, r in files), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    for checksums in (False, True):
        print(json.dumps(measure(args.mb, args.repeats, checksums)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
