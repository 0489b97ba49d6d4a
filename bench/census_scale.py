"""The census at scale: the shipped key class's dataset of P partitions, on the local filesystem and on S3 (the
moto server), through ``KeyClassRuntime.census`` as the DAGs call it.

Each store is measured three ways: a **fresh** census (every partition read; what the retirement gate, the census
after a sweep and the reports take; it keeps each partition's census for reuse), a census that **reuses** the kept
ones (what the plan and the key inventory page take) with nothing changed, and the same after a rewrap of 1% of
the partitions (those are read again, the rest reused); then the **plan** as ``PlanReencryptionOperator`` makes
it (the reused census, the ledger's evidence, the selection, the chunks sized by work, the estimate).

The partitions are copies of one partition the engine wrote (its data file, key material and manifest): the census
reads labels, footers and manifests, never data, so copies cost it what distinct partitions cost. S3 is moto's
server, started in this process so that the objects can be put into its backend directly (a PUT per object over
HTTP would take longer than the rest of the benchmark); the census reaches it over HTTP as it reaches S3. Requests
= HTTP requests the server answered, counted by kind. Moto lists a bucket in time proportional to the whole bucket
on every page of 1,000 keys and answers about 400 requests a second on one core, so on S3 the census is measured
at a smaller P than locally; its requests per partition are exact at any P.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, setup_path  # noqa: E402

setup_path()

DATASET = "customers"
KEY_CLASS = "customer_pii"
CHANGED_SHARE = 0.01


class RequestCounter:
    """HTTP requests answered by the in-process moto server, by kind (LIST, GET, HEAD, ...)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def install(self) -> None:
        from werkzeug.serving import WSGIRequestHandler

        counter = self

        def log_request(handler: Any, code: Any = "-", size: Any = "-") -> None:
            method, _, rest = handler.requestline.partition(" ")
            kind = "LIST" if method == "GET" and ("list-type=" in rest or "?prefix=" in rest) else method
            with counter._lock:
                counter.counts[kind] += 1

        WSGIRequestHandler.log_request = log_request  # type: ignore[method-assign]

    def take(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.counts)
            self.counts.clear()
        return {"total": sum(out.values()), **dict(sorted(out.items()))}


def _config(location: str, key_ref: str) -> Any:
    """The shipped key class on Transit key ``key_ref``, its dataset at ``location``."""
    import yaml

    from keyrotation.config import KeyClassConfig

    raw = yaml.safe_load((ROOT / "include" / "config" / "key_classes" / f"{KEY_CLASS}.yaml").read_text())
    raw["key_class"]["key_ref"] = key_ref
    raw["datasets"] = [{**raw["datasets"][0], "location": location}]
    return KeyClassConfig.model_validate(raw)


def _plan(rt: Any, target: int) -> dict:
    """What ``PlanReencryptionOperator.execute`` computes for a sweep, timed step by step."""
    from keyrotation.planning import chunk_by_work, estimate, select_partitions

    policy = rt.config.key_class.reencryption
    steps: dict[str, float] = {}
    start = time.perf_counter()
    census = rt.census(DATASET, reuse=True)
    steps["census (reused)"] = time.perf_counter() - start
    t = time.perf_counter()
    unfinished = rt.unfinished(census, target)
    steps["ledger evidence (unfinished)"] = time.perf_counter() - t
    t = time.perf_counter()
    partitions = select_partitions(census, target, policy.mode, "sweep", unfinished=unfinished)
    chunks = chunk_by_work(partitions, census, policy.mode, policy.chunk_target.total_seconds())
    estimate(census, partitions, policy.mode, "parquet", rt.backend.server_side_rewrap)
    steps["selection, chunks, estimate"] = time.perf_counter() - t
    return {"seconds": round(time.perf_counter() - start, 3), "steps": {k: round(v, 3) for k, v in steps.items()},
            "partitions": len(partitions), "chunks": len(chunks), "unfinished": len(unfinished)}


def _measure(rt: Any, partitions: list[str], counter: RequestCounter | None) -> dict:
    from keyrotation.ledger import RunContext
    from keyrotation.rotation import update_reference

    def timed(label: str, **kwargs: Any) -> dict:
        if counter:
            counter.take()
        start = time.perf_counter()
        census = rt.census(DATASET, **kwargs)
        seconds = time.perf_counter() - start
        if len(census.partitions) != len(partitions) or census.errors:
            raise RuntimeError(f"{label}: census of {len(census.partitions)} partitions, errors {census.errors}")
        out = {"seconds": round(seconds, 3), "by_version": {f"v{v}": n for v, n in census.by_version().items()}}
        if counter:
            out["requests"] = counter.take()
        return out

    res = {"partitions": len(partitions), "fresh": timed("fresh"), "reused": timed("reused", reuse=True)}
    target = rt.backend.rotate()
    update_reference(rt.name, target, rt.ledger, RunContext(actor="bench"))
    changed = partitions[:: int(1 / CHANGED_SHARE)]
    results = rt.engine(DATASET, RunContext(actor="bench")).process_many(changed, target, "rewrap")
    if {r.action for r in results} != {"rewrapped"}:
        raise RuntimeError(f"rewrap of the changed partitions: {[r.error for r in results if r.error][:3]}")
    res["changed"] = len(changed)
    res["reused_after_changes"] = timed("reused after changes", reuse=True)
    if counter:
        counter.take()
    res["plan"] = _plan(rt, target)
    if counter:
        res["plan"]["requests"] = counter.take()
    res["fresh_again"] = timed("fresh again")
    return res


def _seed_one(rt: Any, location: Path, partition: str) -> Path:
    """One partition written by the engine under the key's current version, in a local folder."""
    from keyrotation.ledger import RunContext
    from keyrotation.rotation import update_reference
    from keyrotation_dev.sample_data import customers

    version = rt.backend.create_key().latest_version
    update_reference(rt.name, version, rt.ledger, RunContext(actor="bench"))
    rt.engine(DATASET, RunContext(actor="bench")).write_partition(partition, customers(partition, 10), version)
    return location / f"dt={partition}"


def measure(client: Any, work: Path, local_partitions: int, s3_partitions: int) -> dict:
    """Both stores, each with its own Transit key and ledger."""
    from keyrotation.backends.registry import open_backend
    from keyrotation.ledger import Ledger
    from keyrotation.runtime import KeyClassRuntime
    from keyrotation_dev.sample_data import daily_partitions

    out: dict[str, Any] = {}

    # Local filesystem.
    location = work / "census_local"
    config = _config(str(location), "census-local")
    ledger = Ledger(f"sqlite:///{work / 'census_local.db'}")
    rt = KeyClassRuntime(config, open_backend(config.key_class, client), ledger)
    partitions = daily_partitions(local_partitions)
    source = _seed_one(rt, location, partitions[0])
    start = time.perf_counter()
    for partition in partitions[1:]:
        shutil.copytree(source, location / f"dt={partition}")
    copy_s = time.perf_counter() - start
    out["local"] = {**_measure(rt, partitions, None), "copy_s": round(copy_s, 2)}
    shutil.rmtree(location, ignore_errors=True)

    # S3 on moto's server.
    out["s3"] = _measure_s3(client, work, daily_partitions(s3_partitions))
    return out


def _measure_s3(client: Any, work: Path, partitions: list[str]) -> dict:
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    from keyrotation.backends.registry import open_backend
    from keyrotation.ledger import Ledger
    from keyrotation.runtime import KeyClassRuntime
    from keyrotation.stores.filesystems import AwsCredentials, Storage
    from keyrotation_dev.devserver import free_port

    counter = RequestCounter()
    counter.install()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        storage = Storage(AwsCredentials("testing", "testing", region_name="us-east-1", endpoint_url=url))
        local = work / "census_s3_source"
        seed_config = _config(str(local), "census-s3")
        ledger = Ledger(f"sqlite:///{work / 'census_s3.db'}")
        seeder = KeyClassRuntime(seed_config, open_backend(seed_config.key_class, client), ledger)
        source = _seed_one(seeder, local, partitions[0])
        files = {f.name: f.read_bytes() for f in source.iterdir()}
        s3 = storage.s3_client("s3://census")
        s3.create_bucket(Bucket="census")
        backend = s3_backends["123456789012"]["aws"]
        start = time.perf_counter()
        for partition in partitions:
            for name, body in files.items():
                backend.put_object("census", f"{DATASET}/dt={partition}/{name}", body)
        seed_s = time.perf_counter() - start
        config = _config(f"s3://census/{DATASET}", "census-s3")
        rt = KeyClassRuntime(config, seeder.backend, ledger, storage=lambda _ds: storage)
        counter.take()
        return {**_measure(rt, partitions, counter), "seed_s": round(seed_s, 2), "objects": 3 * len(partitions)}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.census_scale --local N --s3 M``: :func:`measure` alone, on a fresh OpenBao; prints it."""
    import argparse
    import json
    import tempfile

    from keyrotation_dev.devserver import OpenBaoDevServer

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--local", type=int, default=100_000, help="partitions on the local filesystem")
    parser.add_argument("--s3", type=int, default=5_000, help="partitions on S3 (moto)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-census-") as work, \
            OpenBaoDevServer(log_path=str(Path(work) / "openbao.log")) as bao:
        out = measure(bao.client(), Path(work), args.local, args.s3)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
