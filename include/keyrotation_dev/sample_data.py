"""Synthetic datasets for the demo and the benchmarks: daily partitions with PII-like columns."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def daily_partitions(count: int, start: str = "2024-01-01") -> list[str]:
    first = date.fromisoformat(start)
    return [(first + timedelta(days=i)).isoformat() for i in range(count)]


def _seed(partition: str, seed: int) -> int:
    # Stable across processes (str hash() is salted per process).
    return seed * 1_000_003 + date.fromisoformat(partition).toordinal()


def _digits(rng: np.random.Generator, rows: int, width: int) -> pa.Array:
    values = rng.integers(0, 10**width, rows)
    return pc.utf8_lpad(pa.array(values).cast(pa.string()), width, "0")


def customers(partition: str, rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(_seed(partition, seed))
    ids = pa.array(np.arange(rows, dtype=np.int64))
    first = pa.array(rng.choice(["ana", "bo", "chen", "dana", "eli", "femi", "gus", "hana"], rows))
    return pa.table({
        "customer_id": ids,
        "signup_day": pa.array([partition] * rows),
        "name": first,
        "email": pc.binary_join_element_wise(first, ids.cast(pa.string()), "@example.test", "."),
        "phone": pc.binary_join_element_wise("+1-555-", _digits(rng, rows, 7), ""),
        "ssn": _digits(rng, rows, 9),
        "country": pa.array(rng.choice(["DE", "FR", "US", "JP", "BR"], rows)),
    })


def payments(partition: str, rows: int, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(_seed(partition, seed))
    return pa.table({
        "payment_id": pa.array(np.arange(rows, dtype=np.int64)),
        "day": pa.array([partition] * rows),
        "amount_cents": pa.array(rng.integers(100, 100_000, rows)),
        "card_token": pc.binary_join_element_wise("tok_", _digits(rng, rows, 16), ""),
    })


def dataset_writer(make: Callable[[str, int], pa.Table]) -> Callable[[int, int], Iterator[tuple[str, pa.Table]]]:
    def write(partitions: int, rows: int) -> Iterator[tuple[str, pa.Table]]:
        for partition in daily_partitions(partitions):
            yield partition, make(partition, rows)

    return write


DATASET_WRITERS = {"customers": dataset_writer(customers), "payments": dataset_writer(payments)}
