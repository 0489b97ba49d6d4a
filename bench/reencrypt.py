"""Full re-encryption (mode ``reencrypt``: new data keys, data rewritten) through the package's engine.

Rows/s and MB/s, per wall second and per CPU second (pyarrow decodes and encodes on threads, so
CPU seconds, not wall seconds, is what "per core" divides by), with the time split between the
engine's steps (timed by wrapping them, not changing them). The engine streams a partition in two
passes of ``batch_rows`` rows at a time: the copy (decrypt + decode a batch, digest it, encode +
encrypt it into the new generation through ``pq.ParquetWriter``) and the read-back check (decrypt +
decode the staged file batch by batch and digest it again). Stages: PME read (every batch of both
passes), PME write (``write_batch`` and ``close``), the plaintext digest (``DigestBuilder.update``:
SHA-256 over the canonical Arrow buffers of every column, both passes), KMS requests, and the rest
(file opens and footers, manifest, ledger, leases). Each pass is timed whole as well.
Beside it, plain Parquet without encryption on one partition of the same data, for the codec's share.
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Any

from bench.common import KmsCounter, Stopwatch, cpu_seconds
from bench.rewrap import engine_for

MB = 1_000_000
STAGES = {"pme.read": "PME read: decrypt + decode, batch by batch (2 passes: copy, read-back check)",
          "pme.write": "PME write: encode + encrypt (ParquetWriter.write_batch, close)",
          "digest": "plaintext digest (DigestBuilder: SHA-256 of canonical Arrow buffers, 2 passes)"}


def _wrap_batches(watch: Stopwatch, owner: Any, label: str) -> None:
    """Time each ``next()`` of the iterators ``owner.iter_batches`` returns (the decrypt + decode of a batch)."""
    original = owner.iter_batches

    def iter_batches(self: Any, *args: Any, **kwargs: Any) -> Any:
        inner = original(self, *args, **kwargs)
        while True:
            with watch.time(label):
                batch = next(inner, None)
            if batch is None:
                return
            yield batch

    iter_batches.__wrapped__ = original  # type: ignore[attr-defined]
    owner.iter_batches = iter_batches


def measure(backend: Any, ledger: Any, counter: KmsCounter, dataset: dict, location: str) -> dict:
    import pyarrow.parquet as pq

    from keyrotation.formats.digest import DigestBuilder
    from keyrotation.formats.parquet_pme import ROW_GROUP_ROWS, EncryptedParquetFile
    from keyrotation.parquet_engine import ParquetEngine
    from keyrotation_dev.sample_data import daily_partitions

    partitions = daily_partitions(dataset["partitions"])
    target = backend.rotate()
    engine = engine_for(backend, ledger, location, dataset["name"])
    engine.module_path = False  # this measures decoding and encoding; bench/pme_modules.py the module path
    watch, passes = Stopwatch(), Stopwatch()
    _wrap_batches(watch, EncryptedParquetFile, "pme.read")
    watch.wrap(pq.ParquetWriter, "write_batch", "pme.write")
    watch.wrap(pq.ParquetWriter, "close", "pme.write")
    watch.wrap(DigestBuilder, "update", "digest")
    # _commit_generation = the copy pass + the read-back pass (_digest of the staged file) + moves, manifest.
    passes.wrap(ParquetEngine, "_commit_generation", "commit")
    passes.wrap(ParquetEngine, "_digest", "read_back")
    wrapped = [(EncryptedParquetFile, "iter_batches"), (pq.ParquetWriter, "write_batch"), (pq.ParquetWriter, "close"),
               (DigestBuilder, "update"), (ParquetEngine, "_commit_generation"), (ParquetEngine, "_digest")]
    counter.reset()
    try:
        cpu0, start = cpu_seconds(), time.perf_counter()
        results = engine.run(partitions, lambda p: engine.process(p, target, "reencrypt"))
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    finally:
        for owner, name in wrapped:
            Stopwatch.unwrap(owner, name)
    actions = {r.action for r in results}
    if actions != {"reencrypted"}:
        raise RuntimeError(f"{dataset['name']}: reencrypt ended {actions}: {[r.error for r in results][:3]}")
    rows = sum(r.rows for r in results)
    file_bytes = sum(r.bytes for r in results)
    stages = {STAGES[k]: round(v, 3) for k, v in watch.seconds.items()}
    stages["KMS requests"] = round(counter.seconds, 3)
    other = wall - sum(watch.seconds.values()) - counter.seconds
    stages["other (file opens and footers, manifest, ledger, leases, census, moves)"] = round(other, 3)
    return {
        "dataset": dataset["name"], "partitions": len(partitions), "rows": rows, "file_bytes": file_bytes,
        "arrow_bytes": dataset.get("arrow_bytes"), "to_version": target,
        "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "cores_used": round(cpu / wall, 2),
        "rows_per_s": round(rows / wall, 1), "rows_per_cpu_s": round(rows / cpu, 1),
        "file_mb_s": round(file_bytes / MB / wall, 2), "file_mb_per_cpu_s": round(file_bytes / MB / cpu, 2),
        "arrow_mb_per_cpu_s": round(dataset["arrow_bytes"] / MB / cpu, 2) if dataset.get("arrow_bytes") else None,
        "kms": counter.snapshot(), "stages_s": stages, "stage_calls": dict(watch.calls),
        "batch_rows": engine.batch_rows, "row_group_rows": ROW_GROUP_ROWS,
        "passes_s": {"copy: read + digest + write": round(passes.seconds["commit"] - passes.seconds["read_back"], 3),
                     "read-back check: read + digest": round(passes.seconds["read_back"], 3)},
    }


def plain_parquet(rows: int, partition: str = "2024-01-01") -> dict:
    """Parquet write + read of one partition's table without encryption, and the digest alone (one core)."""
    import pyarrow.parquet as pq

    from keyrotation.formats.digest import table_digest
    from keyrotation_dev.sample_data import customers

    table = customers(partition, rows)
    cpu0, start = cpu_seconds(), time.perf_counter()
    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_s = time.perf_counter() - start
    data = sink.getvalue()
    start = time.perf_counter()
    back = pq.read_table(io.BytesIO(data))
    read_s = time.perf_counter() - start
    codec_cpu = cpu_seconds() - cpu0
    start = time.perf_counter()
    table_digest(back)
    digest_s = time.perf_counter() - start
    size = len(data) / MB
    return {"rows": rows, "file_bytes": len(data), "arrow_bytes": table.nbytes,
            "write_s": round(write_s, 3), "read_s": round(read_s, 3), "digest_s": round(digest_s, 3),
            "write_read_file_mb_per_cpu_s": round(size / codec_cpu, 2),
            "write_read_file_mb_s": round(size / (write_s + read_s), 2)}


MODULE_STAGES = {"reencrypt_modules": "modules: every module decrypted, re-encrypted and verified, file to file; "
                                      "new key material",
                 "check": "checks: the old footer key refused, pyarrow reads the encrypted columns of the first and "
                          "last row groups"}


def measure_modules(backend: Any, ledger: Any, counter: KmsCounter, dataset: dict, location: str,
                    repeats: int = 7, yardstick_repeats: int = 3) -> dict:
    """The same partitions re-encrypted module by module (mode ``reencrypt``, the engine's default path): each
    partition's file written as a new generation through the partition store, committed as the decode path
    commits, every new module decrypted again and compared in the same pass; then one partition's file
    re-encrypted in memory (``reencrypt_in_place``, verification included), ``repeats`` times.

    The yardstick is the issue's, bulk AES-256-GCM (``encrypt_into``), measured around the engine run
    (``yardstick_repeats`` calls before it and as many after) and just before each in-memory repeat; each share
    divides by it. Bulk AES-GCM with keys of the data keys' size (AES-128 for pyarrow's default 128-bit data keys:
    the cipher these modules are sealed with, a little faster here) is measured beside it and its shares reported
    too."""
    import json
    import os

    from bench.cipher import BulkYardstick
    from keyrotation import ledger as lg
    from keyrotation.formats import pme_modules
    from keyrotation.formats.parquet_pme import ParquetEncryption
    from keyrotation.formats.pme_modules import ModuleKeys, reencrypt_in_place
    from keyrotation_dev.sample_data import daily_partitions

    partitions = daily_partitions(dataset["partitions"])
    target = backend.rotate()
    engine = engine_for(backend, ledger, location, dataset["name"])
    store, pme = engine.store, engine.pme

    def first_file() -> tuple[str, ModuleKeys]:
        path = store.path(partitions[0], store.read_manifest(partitions[0]).files[0])
        return path, pme._old_data_keys(path, store.fs, pme.key_material(path, store.fs))[0]

    yardstick, data_key_cipher = BulkYardstick(256), BulkYardstick(8 * len(first_file()[1].footer))
    around = [yardstick.mb_s() for _ in range(yardstick_repeats)]
    around_data_key = [data_key_cipher.mb_s() for _ in range(yardstick_repeats)]
    watch = Stopwatch()
    watch.wrap(ParquetEncryption, "reencrypt_modules", "reencrypt_modules")
    watch.wrap(ParquetEncryption, "_check_reencrypted", "check")
    seen = len(ledger.rows(events_in=(lg.PARTITION_REENCRYPTED,)))
    counter.reset()
    try:
        cpu0, start = cpu_seconds(), time.perf_counter()
        results = engine.run(partitions, lambda p: engine.process(p, target, "reencrypt"))
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    finally:
        for name in ("reencrypt_modules", "_check_reencrypted"):
            Stopwatch.unwrap(ParquetEncryption, name)
    around += [yardstick.mb_s() for _ in range(yardstick_repeats)]
    around_data_key += [data_key_cipher.mb_s() for _ in range(yardstick_repeats)]
    paths = [json.loads(r["detail"]).get("path") for r in ledger.rows(events_in=(lg.PARTITION_REENCRYPTED,))[seen:]]
    if {r.action for r in results} != {"reencrypted"} or set(paths) != {"module"}:
        raise RuntimeError(f"{dataset['name']}: module path ended {[r.action for r in results]} by {paths}")
    file_bytes = sum(r.bytes for r in results)
    # Disjoint steps: the checks and the KMS requests (all made inside reencrypt_modules) taken out of its time.
    whole, check = watch.seconds["reencrypt_modules"], watch.seconds["check"]
    stages = {MODULE_STAGES["reencrypt_modules"]: round(whole - check - counter.seconds, 3),
              MODULE_STAGES["check"]: round(check, 3), "KMS requests": round(counter.seconds, 3),
              "other (census, manifest, ledger, leases, moves)": round(wall - whole, 3)}
    bulk_around = statistics.median(around)

    # In memory: one partition's file (as the store holds it now) under its keys, new keys of the same sizes.
    path, old = first_file()
    with store.fs.open_input_stream(path) as stream:
        data = stream.read()
    new = ModuleKeys(os.urandom(len(old.footer)), {c: os.urandom(len(k)) for c, k in old.columns.items()})

    def repeat() -> tuple[list[float], list[float], list[float], list[float], list[float], Any]:
        """``repeats`` in-memory runs, each just after the yardsticks: wall and CPU seconds, bulk MB/s, shares."""
        times, cpus, bulks, shares, data_key_shares = [], [], [], [], []
        result = None
        for _ in range(repeats):
            buf = bytearray(data)
            bulks.append(yardstick.mb_s())
            data_key_bulk = data_key_cipher.mb_s()
            cpu0, start = time.thread_time(), time.perf_counter()
            result = reencrypt_in_place(buf, old, new)
            times.append(time.perf_counter() - start)
            cpus.append(time.thread_time() - cpu0)
            shares.append(len(data) / MB / cpus[-1] / bulks[-1])
            data_key_shares.append(len(data) / MB / cpus[-1] / data_key_bulk)
        return times, cpus, bulks, shares, data_key_shares, result

    times, cpus, bulks, shares, data_key_shares, result = repeat()
    in_memory_cpu = statistics.median(cpus)
    # The same file on the Python page walk, for comparison (the engine's path is the C walk where it is built).
    python_walk: dict = {}
    if pme_modules.NATIVE:
        pme_modules.NATIVE = False
        try:
            _, py_cpus, _, py_shares, _, _ = repeat()
        finally:
            pme_modules.NATIVE = True
        python_walk = {"file_mb_per_cpu_s": round(len(data) / MB / statistics.median(py_cpus), 1),
                       "cpu_s": round(statistics.median(py_cpus), 4),
                       "share_of_bulk": round(statistics.median(py_shares), 4)}
    return {
        "dataset": dataset["name"], "partitions": len(partitions), "file_bytes": file_bytes, "to_version": target,
        "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "cores_used": round(cpu / wall, 2),
        "file_mb_s": round(file_bytes / MB / wall, 1), "file_mb_per_cpu_s": round(file_bytes / MB / cpu, 1),
        "kms": counter.snapshot(), "stages_s": stages, "paths": sorted(set(paths)),
        "page_walk": "C" if pme_modules.NATIVE else "Python (the C walk is not built)",
        "bulk_mb_s": round(bulk_around, 1), "bulk_mb_s_calls": [round(b, 1) for b in around],
        "share_of_bulk": round(file_bytes / MB / cpu / bulk_around, 4),
        "data_key_bits": data_key_cipher.key_bits,
        "share_of_bulk_data_key_cipher": round(file_bytes / MB / cpu / statistics.median(around_data_key), 4),
        "in_memory": {"file_bytes": len(data), "modules": result.modules, "repeats": repeats,
                      "seconds": round(statistics.median(times), 4), "cpu_s": round(in_memory_cpu, 4),
                      "file_mb_per_cpu_s": round(len(data) / MB / in_memory_cpu, 1),
                      "bulk_mb_s": round(statistics.median(bulks), 1),
                      "share_of_bulk": round(statistics.median(shares), 4),
                      "shares": [round(x, 4) for x in shares],
                      "share_of_bulk_data_key_cipher": round(statistics.median(data_key_shares), 4),
                      "python_walk": python_walk},
    }
