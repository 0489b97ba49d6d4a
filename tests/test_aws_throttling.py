"""Throttling: KMS answering ``ThrottlingException`` to a share of requests (a proxy in front of
moto_server). Retries with backoff and jitter carry the run through with every partition readable;
a quota that never frees up ends in a clear error with the data untouched."""

from __future__ import annotations

import pytest
from botocore.config import Config
from throttle_proxy import ThrottlingProxy

from helpers import aws_runtime, days, partition_digests, seed
from keyrotation.backends.base import KmsBackend
from keyrotation.backends.registry import open_backend
from keyrotation.backends.retry import RetryPolicy
from keyrotation.errors import BackendError

# botocore's own retries off, so these tests prove the backend's.
NO_BOTO_RETRIES = Config(retries={"mode": "standard", "max_attempts": 1})


def throttled_backend(moto, proxy: ThrottlingProxy, rt, attempts: int = 8) -> KmsBackend:
    kc = rt.config.key_class
    client = moto.client("kms", endpoint_url=proxy.url, config=NO_BOTO_RETRIES)
    return open_backend(kc, client, RetryPolicy(attempts=attempts, initial=0.01, maximum=0.05, jitter=True))


def test_a_rewrap_sweep_completes_through_throttling(make_aws_key_class, moto):
    config = make_aws_key_class("throttled", dataset="throttled_customers")
    rt = aws_runtime(config, moto)
    parts = days("2024-03-01", 12)
    seed(rt, "throttled_customers", parts, rows=10)
    digests = partition_digests(rt, "throttled_customers", parts)
    target = rt.backend.rotate()
    with ThrottlingProxy(moto.url, share=0.3) as proxy:
        rt.backend = throttled_backend(moto, proxy, rt)
        engine = rt.engine("throttled_customers")
        results = engine.run(parts, lambda p: engine.process(p, target, "rewrap"))
        assert [r.action for r in results] == ["rewrapped"] * 12
        assert proxy.throttled >= 5 and proxy.forwarded > proxy.throttled
    rt.backend = aws_runtime(config, moto).backend
    assert rt.census("throttled_customers").by_version() == {target: 12}
    assert partition_digests(rt, "throttled_customers", parts) == digests


def test_a_quota_that_never_frees_up_fails_clearly_and_changes_nothing(make_aws_key_class, moto):
    config = make_aws_key_class("always_throttled", dataset="always_customers")
    rt = aws_runtime(config, moto)
    parts = days("2024-03-01", 2)
    seed(rt, "always_customers", parts, rows=10)
    digests = partition_digests(rt, "always_customers", parts)
    target = rt.backend.rotate()
    with ThrottlingProxy(moto.url, share=1.0) as proxy:
        backend = throttled_backend(moto, proxy, rt, attempts=3)
        with pytest.raises(BackendError, match=r"throttled.*gave up after 3 attempts.*ThrottlingException"):
            backend.rewrap(["aws:v1:AAAA"], target)
        rt.backend = backend
        engine = rt.engine("always_customers")
        results = engine.run(parts, lambda p: engine.process(p, target, "rewrap"))
        assert [r.action for r in results] == ["failed", "failed"]
        assert "ThrottlingException" in results[0].error
    rt.backend = aws_runtime(config, moto).backend
    assert rt.census("always_customers").by_version() == {1: 2}
    assert partition_digests(rt, "always_customers", parts) == digests
