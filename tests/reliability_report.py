"""docs/reliability.md, generated from what the test run did (issue 18, item 6).

A pytest plugin (registered in ``tests/conftest.py``) that records, for every test, its outcome by node id and
the ``user_properties`` it recorded (``record_property``). At the end of every run it writes what it collected to
``var/reliability-results.json`` (``$KEYROTATION_RELIABILITY_JSON`` overrides); when the run was the whole suite
it also renders ``tests/reliability_template.md`` into ``docs/reliability.md`` (``$KEYROTATION_RELIABILITY_DOC``
overrides, for the plugin's own test). Every figure in the document comes
from the collected results, and every table row names the test id it comes from.

Render from saved results (one or more files, merged by node id; a later file wins)::

    python tests/reliability_report.py var/reliability-results.json --out /tmp/reliability-preview.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
TEMPLATE = TESTS / "reliability_template.md"
DOC = ROOT / "docs" / "reliability.md"
RESULTS = ROOT / "var" / "reliability-results.json"

KILL_MATRIX_FILE = "tests/test_kill_matrix.py"
OUTCOMES = ("PASS", "FAIL", "SKIP")

# The sections besides the kill matrix: (what the tests do, node id prefix). A test belongs to a section when its id
# starts with one of the prefixes; its row shows the first matching description. Prefixes are selectors, not
# figures: whatever the run collected under them is what the tables show (a prefix no test matched is reported).
FAULTS = [
    ("SIGKILL at a seeded time (inside pyarrow writes, KMS calls, ledger writes), proven mid-run; re-run; old "
     "version retired", "tests/test_faults.py::test_sigkill_at_seeded_times"),
    ("KMS stopped mid-run and started again: the run waits with backoff and completes",
     "tests/test_faults.py::test_kms_stopped_mid_run_and_started_again"),
    ("KMS staying down: a clean failure per partition, in the ledger; a re-run completes",
     "tests/test_faults.py::test_kms_staying_down"),
    ("disk full on the data location: source untouched, re-run completes", "tests/test_faults.py::test_disk_full"),
    ("permission denied on a partition directory (chattr +i): the others done, source untouched",
     "tests/test_faults.py::test_permission_denied"),
    ("an exception at a commit step (in process), then a re-run", "tests/test_engine.py::test_crash_"),
    ("two runs over the same partitions at once: each partition changed once",
     "tests/test_engine.py::test_two_runs_of_the_same_partitions_at_once"),
    ("a partition lease left by a killed process on this host: taken over",
     "tests/test_engine.py::test_a_lease_left_by_a_killed_process"),
    ("an exception at a commit step of a GCS partition (in process), then a re-run",
     "tests/test_gcp.py::test_crash_in_a_gcs_partition"),
    ("AWS KMS throttling (a proxy answering ThrottlingException): retried, every partition done",
     "tests/test_aws_throttling.py::test_a_rewrap_sweep_completes_through_throttling"),
    ("an AWS KMS quota that never frees up: clear error, partitions untouched",
     "tests/test_aws_throttling.py::test_a_quota_that_never_frees_up"),
    ("an S3 object rewritten between HeadObject and the copy: refused by the ETag guard",
     "tests/test_s3_objects.py::test_an_object_rewritten_after_head"),
    ("a multipart S3 copy raced by a writer: aborted, the writer's content kept",
     "tests/test_s3_objects.py::test_a_multipart_copy_raced_by_a_writer"),
    ("a SQL re-encryption failing mid-batch (injected exception, in process), then a re-run",
     "tests/test_sql_tables.py::test_a_crash_mid_partition"),
    ("an application writing rows during a SQL re-encryption: no update lost",
     "tests/test_sql_tables.py::test_concurrent_writers_lose_no_update"),
    ("the KMS unreachable when a task starts, or lost after set-up (through Airflow)",
     "tests/test_fail_fast.py::test_kms_"),
    ("a Celery worker killed (SIGKILL of its process groups) mid-sweep: its tasks retried on the other worker",
     "tests/test_scale_out.py::test_sweep_scales_out_over_two_celery_workers"),
    ("the KMS down behind the sidecar: 503, cached keys served", "tests/test_sidecar.py::test_sidecar_answers_503"),
    ("a rotation, rewrap and retirement during sidecar traffic: no request lost",
     "tests/test_sidecar.py::test_a_rotation_rewrap_and_retirement_during_traffic"),
    ("other fault-injection test (marked `faults`)", "@faults"),
]
BAD_INPUTS = [
    ("a damaged partition fails alone, with the whole error, recorded, left byte for byte",
     "tests/test_bad_input.py::test_bad_partition_fails_alone"),
    ("a dataset under another key class's master key", "tests/test_bad_input.py::test_wrong_key_class"),
    ("a dataset location that does not exist", "tests/test_bad_input.py::test_missing_dataset_location"),
    ("other bad-input test", "tests/test_bad_input.py::"),
    ("a tampered partition", "tests/test_engine.py::test_tampered_partition"),
    ("a wrong key class for a dataset", "tests/test_engine.py::test_wrong_key_class"),
    ("a digest mismatch at validation", "tests/test_engine.py::test_validation_detects"),
    ("SQL values tampered, moved to another row, under an unknown data key",
     "tests/test_sql_tables.py::test_tampered_moved_and_unknown_values"),
    ("an SSE-KMS object under a foreign key", "tests/test_aws_objects.py::test_an_object_under_a_foreign_key"),
    ("a malformed S3 location", "tests/test_s3_objects.py::test_a_bad_location_is_named"),
    ("missing partitions, buckets, keys, datasets on S3", "tests/test_s3_objects.py::test_missing_partitions"),
    ("an unreadable partition through Airflow: fails once, not retried",
     "tests/test_fail_fast.py::test_unreadable_partition"),
    ("a config made invalid after parsing: the task fails at once", "tests/test_fail_fast.py::test_config_error"),
    ("a malformed config value: names file, key class and field", "tests/test_config.py::test_bad_values"),
    ("other config errors", "tests/test_config.py::test_other_config_errors"),
    ("a malformed duration", "tests/test_config.py::test_parse_duration_rejects"),
    ("GCP config mistakes", "tests/test_gcp.py::test_config_names_the_field"),
    ("malformed run parameters (scope, dates)", "tests/test_planning.py::test_bad_parameters"),
]
SAFETY = [("hostile edit of key material, data files or partition folders", "tests/test_safety.py::")]
DENIALS = {
    "OpenBao Transit": [("", "tests/test_least_privilege.py::")],
    "AWS KMS and S3 (moto enforcing IAM)": [("", "tests/test_aws_least_privilege.py::")],
    "Cloud KMS (test server enforcing IAM)": [
        ("", "tests/test_gcp.py::test_each_role_is_refused"),
        ("", "tests/test_gcp_kms_server.py::test_least_privilege_roles"),
        ("", "tests/test_gcp_kms_server.py::test_missing_expired_or_narrow_tokens"),
        ("", "tests/test_gcp_kms_server.py::test_unregistered_or_revoked_credentials"),
        ("", "tests/test_gcp_kms_server.py::test_custom_role_and_iam_policy_rpcs"),
    ],
}
LEDGER = [("ledger tamper evidence and read-only verification", "tests/test_ledger.py::"),
          ("ledger anchoring: a cut tail, a recomputed chain, a replaced checkpoint",
           "tests/test_ledger_anchoring.py::")]
PROPERTY_DENIALS, PROPERTY_CANARIES, PROPERTY_INVARIANT = "denials", "canary_scan", "invariant_progress"
NOT_RECORDED = "Not recorded in this run"
_IMPORTED = time.time()  # with tests/conftest.py, before any server starts: the run's start


# -- collecting --------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


def _short(text: str, limit: int = 140) -> str:
    line = re.sub(r" at 0x[0-9a-f]+", "", " ".join(str(text).split()))
    return line if len(line) <= limit else line[: limit - 1] + "…"


class Collector:
    """Outcomes and recorded properties, by node id, for one pytest session."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.started = _IMPORTED
        self.items: list[tuple[str, list[str]]] = []  # (node id, marker names), in collection order
        self.deselected = 0
        self.collection_errors: list[str] = []
        self.tests: dict[str, dict[str, Any]] = {}
        self.message = ""

    # hooks
    def pytest_deselected(self, items) -> None:  # noqa: ANN001
        self.deselected += len(items)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collection_errors.append(report.nodeid or "(session)")

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if session.items:  # under pytest-xdist the controller collects nothing: its workers say (below)
            self._collected(_items(session), self.deselected)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:  # noqa: ANN001
        """A pytest-xdist worker's end: every worker collects the whole selection, the first one to end gives it."""
        items = getattr(node, "workeroutput", {}).get("reliability_items")
        if items is not None and not self.items:
            self._collected(items, node.workeroutput["reliability_deselected"])

    def _collected(self, items: list[tuple[str, list[str]]], deselected: int) -> None:
        self.items, self.deselected = items, deselected
        for nodeid, markers in items:
            test = self.tests.setdefault(nodeid, {"nodeid": nodeid, "outcome": "NOT RUN", "duration": 0.0,
                                                  "properties": [], "message": ""})
            test["markers"] = markers

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        test = self.tests.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "NOT RUN", "duration": 0.0,
                                                     "markers": [], "properties": [], "message": ""})
        test["duration"] = round(test["duration"] + report.duration, 3)
        test["properties"] = [[name, _jsonable(value)] for name, value in report.user_properties]
        if report.failed:
            test["outcome"] = "FAIL"
            crash = getattr(report.longrepr, "reprcrash", None)
            if not test["message"]:
                test["message"] = _short(crash.message if crash else report.longreprtext)
        elif report.skipped and test["outcome"] != "FAIL":
            test["outcome"] = "XFAIL" if hasattr(report, "wasxfail") else "SKIP"
            if isinstance(report.longrepr, tuple):
                test["message"] = _short(report.longrepr[2].removeprefix("Skipped: "))
        elif report.when == "call" and report.passed and test["outcome"] == "NOT RUN":
            test["outcome"] = "PASS"

    def partial_because(self, session: pytest.Session) -> list[str]:
        """Why this run is not the whole suite ([] when it is): everything under testpaths selected, and run."""
        config, why = self.config, []
        testpaths = [str((config.rootpath / p).resolve()) for p in config.getini("testpaths")]
        if config.args_source != pytest.Config.ArgsSource.TESTPATHS:
            given = [str((config.invocation_params.dir / a).resolve()) if "::" not in a else a for a in config.args]
            if sorted(set(given)) != sorted(testpaths):
                why.append(f"arguments {' '.join(config.args)} (not the testpaths {' '.join(testpaths)})")
        for option, label in (("keyword", "-k"), ("markexpr", "-m")):
            if getattr(config.option, option, ""):
                why.append(f"{label} {getattr(config.option, option)!r}")
        for option, label in (("deselect", "--deselect"), ("ignore", "--ignore"), ("ignore_glob", "--ignore-glob"),
                              ("lf", "--last-failed"), ("stepwise", "--stepwise"), ("collectonly", "--collect-only")):
            if getattr(config.option, option, None):
                why.append(label)
        if self.deselected:
            why.append(f"{self.deselected} tests deselected")
        if self.collection_errors:
            why.append(f"collection errors in {', '.join(self.collection_errors)}")
        not_run = [t for t in self.tests.values() if t["outcome"] == "NOT RUN"]
        if not_run or session.shouldstop or session.shouldfail:
            why.append(f"stopped early ({len(not_run)} selected tests not run)")
        if not self.items:
            why.append("no tests collected")
        return why

    def data(self, session: pytest.Session, exitstatus: int) -> dict[str, Any]:
        why = self.partial_because(session)
        order = {nodeid: i for i, (nodeid, _) in enumerate(self.items)}
        tests = sorted(self.tests.values(), key=lambda t: order.get(t["nodeid"], len(order)))
        return {
            "version": 1,
            "started_at": datetime.fromtimestamp(self.started, UTC).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.started, 1),
            "commit": git_commit(),
            "args": list(self.config.invocation_params.args),
            "whole_suite": not why,
            "partial_because": why,
            "collected": len(self.items) + self.deselected,
            "deselected": self.deselected,
            "exitstatus": int(exitstatus),
            "tests": tests,
        }

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if getattr(self.config.option, "collectonly", False):
            return
        data = self.data(session, exitstatus)
        path = Path(os.environ.get("KEYROTATION_RELIABILITY_JSON", RESULTS))
        _write(path, json.dumps(data, indent=1) + "\n")
        doc = Path(os.environ.get("KEYROTATION_RELIABILITY_DOC", DOC))
        shown = doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc
        if data["whole_suite"]:
            _write(doc, render(data, TEMPLATE.read_text()))
            self.message = f"reliability: {shown} regenerated from this run (results in {path})"
        else:
            self.message = (f"reliability: {shown} not regenerated (partial run: "
                            f"{'; '.join(data['partial_because'])}); results in {path}")
        if not self.config.pluginmanager.has_plugin("terminalreporter"):
            print(self.message)

    def pytest_terminal_summary(self, terminalreporter) -> None:  # noqa: ANN001
        if self.message:  # after the session's own lines (sessionfinish runs inside the reporter's wrapper)
            terminalreporter.write_line(self.message)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def _items(session: pytest.Session) -> list[tuple[str, list[str]]]:
    return [(item.nodeid, sorted({m.name for m in item.iter_markers()})) for item in session.items]


class WorkerItems:
    """On a pytest-xdist worker: what it collected (node ids, markers) and deselected, for its controller's
    :class:`Collector` (outcomes and properties reach the controller in the workers' reports)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.deselected = 0

    def pytest_deselected(self, items) -> None:  # noqa: ANN001
        self.deselected += len(items)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.config.workeroutput["reliability_items"] = _items(session)
        self.config.workeroutput["reliability_deselected"] = self.deselected


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # a pytest-xdist worker reports to its controller
        config.pluginmanager.register(WorkerItems(config), "reliability_worker_items")
    else:
        config.pluginmanager.register(Collector(config), "reliability_collector")


# -- rendering ---------------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, dict):
        text = ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    elif isinstance(value, list | tuple):
        text = ", ".join(_cell(v) for v in value) if len(value) <= 8 else \
            ", ".join(_cell(v) for v in value[:8]) + f", … ({len(value)} in all)"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _outcome(test: dict) -> str:
    return f"{test['outcome']} ({test['message']})" if test["outcome"] != "PASS" and test["message"] else \
        test["outcome"]


def _id(nodeid: str) -> str:
    return f"`{nodeid}`"


def _counts(tests: list[dict]) -> str:
    counts = Counter(t["outcome"] for t in tests)
    return ", ".join(f"{counts[o]} {o}" for o in (*OUTCOMES, *sorted(set(counts) - set(OUTCOMES))) if counts[o])


def _matches(test: dict, prefix: str) -> bool:
    return prefix[1:] in test["markers"] if prefix.startswith("@") else test["nodeid"].startswith(prefix)


def _section(tests: list[dict], selectors: list[tuple[str, str]], exclude: set[str] = frozenset()) -> str:
    """One row per test id matched by a selector: what, test id, outcome; then the selectors that matched none."""
    rows, seen = [], set()
    for test in tests:
        if test["nodeid"] in exclude:
            continue
        for what, prefix in selectors:
            if _matches(test, prefix):
                # the description once per run of rows it describes
                shown = "" if rows and rows[-1][-1] == what else what
                rows.append([shown, _id(test["nodeid"]), _outcome(test), what])
                seen.add(test["nodeid"])
                break
    if not rows:
        return "No test of this section ran in this run."
    chosen = [t for t in tests if t["nodeid"] in seen]
    unmatched = [p for _, p in selectors if not p.startswith("@") and not any(_matches(t, p) for t in tests)]
    text = f"{len(rows)} test ids: {_counts(chosen)}.\n\n" + _table(["what", "test id", "outcome"],
                                                                   [row[:3] for row in rows])
    if unmatched:
        text += "\n\nNo test id in this run starts with " + ", ".join(_id(p) for p in unmatched) + "."
    return text


def kill_matrix(tests: list[dict]) -> tuple[str, set[str]]:
    """Rows: checkpoints; columns: mode × store; from the ids ``[MODE-CHECKPOINT-STORE]`` of test_kill_matrix."""
    cells: dict[tuple[str, str, str], dict] = {}
    functions: set[str] = set()
    for test in tests:
        path, _, name = test["nodeid"].partition("::")
        if path != KILL_MATRIX_FILE or not name.endswith("]") or "[" not in name:
            continue
        function, _, params = name[:-1].partition("[")
        parts = params.split("-")
        if len(parts) < 3:
            continue
        functions.add(function)
        cells[parts[0], "-".join(parts[1:-1]), parts[-1]] = test
    if not cells:
        return "No kill-matrix test ran in this run.", set()
    modes = list(dict.fromkeys(m for m, _, _ in cells))
    points = list(dict.fromkeys(p for _, p, _ in cells))
    stores = list(dict.fromkeys(s for _, _, s in cells))
    columns = [(m, s) for m in modes for s in stores]
    rows = [[f"`{p}`"] + [cells[m, p, s]["outcome"] if (m, p, s) in cells else "—" for m, s in columns]
            for p in points]
    listed = list(cells.values())
    head = (f"{len(listed)} cells ({len(points)} checkpoints, {len(modes)} modes × {len(stores)} stores; "
            f"— where a mode has no such checkpoint): {_counts(listed)}. Cell (checkpoint, mode, store) is the test id "
            + ", ".join(f"`{KILL_MATRIX_FILE}::{f}[MODE-CHECKPOINT-STORE]`" for f in sorted(functions)) + ".")
    text = head + "\n\n" + _table(["checkpoint"] + [f"{m} / {s}" for m, s in columns], rows)
    problems = [t for t in listed if t["outcome"] != "PASS"]
    if problems:
        text += "\n\n" + _table(["test id", "outcome"], [[_id(t["nodeid"]), _outcome(t)] for t in problems])
    others = [t for t in tests if t["nodeid"].startswith(KILL_MATRIX_FILE + "::") and t["nodeid"] not in
              {c["nodeid"] for c in listed}]
    if others:
        text += "\n\nAlso in the file:\n\n" + _table(["test id", "outcome"],
                                                     [[_id(t["nodeid"]), _outcome(t)] for t in others])
    return text, {t["nodeid"] for t in listed}


def _decoded(value: Any) -> Any:
    """A value recorded as JSON text (``record_property(name, json.dumps(...))``) as the object it encodes."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _properties(tests: list[dict], name: str) -> list[tuple[str, Any]]:
    return [(t["nodeid"], _decoded(value)) for t in tests for key, value in t["properties"] if key == name]


def _property_table(recorded: list[tuple[str, Any]]) -> str:
    """A row per recorded value: the test id, then one column per key (the union, in order of first use)."""
    keys = list(dict.fromkeys(k for _, v in recorded if isinstance(v, dict) for k in v))
    rows = []
    for nodeid, value in recorded:
        if isinstance(value, dict):
            rows.append([_id(nodeid)] + [value.get(k, "") for k in keys])
        else:
            rows.append([_id(nodeid)] + [value] + [""] * (len(keys) - 1 if keys else 0))
    return _table(["test id"] + (keys or ["value"]), rows)


def denials(tests: list[dict]) -> str:
    summary, details = [], []
    for backend, selectors in DENIALS.items():
        chosen = [t for t in tests if any(_matches(t, p) for _, p in selectors)]
        counts = Counter(t["outcome"] for t in chosen)
        summary.append([backend, len(chosen)] + [counts[o] for o in OUTCOMES])
        if not chosen:
            continue
        details.append(f"**{backend}**\n\n" + _table(["test id", "outcome"],
                                                     [[_id(t["nodeid"]), _outcome(t)] for t in chosen]))
        recorded = _properties(chosen, PROPERTY_DENIALS)
        details.append(f"Per-operation counts (`{PROPERTY_DENIALS}`): " +
                       ("\n\n" + _property_table(recorded) if recorded else NOT_RECORDED.lower() + "."))
    return "\n\n".join([_table(["backend", "test ids", *OUTCOMES], summary), *details])


def canaries(tests: list[dict]) -> str:
    recorded = _properties(tests, PROPERTY_CANARIES)
    return _property_table(recorded) if recorded else f"{NOT_RECORDED} (no test recorded `{PROPERTY_CANARIES}`)."


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(measure, value) pairs, nested keys joined with dots; a share (a fraction under a key naming shares) also as
    a percentage."""
    if not isinstance(value, dict):
        shown = value
        if "share" in prefix and isinstance(value, float) and 0 <= value <= 1:
            shown = f"{value:g} ({100 * value:.0f}%)"
        return [(prefix or "value", shown)]
    out = []
    for key, sub in value.items():
        out += _flatten(sub, f"{prefix}.{key}" if prefix else str(key))
    return out


def invariant(tests: list[dict]) -> str:
    recorded = _properties(tests, PROPERTY_INVARIANT)
    if not recorded:
        return f"{NOT_RECORDED} (no test recorded `{PROPERTY_INVARIANT}`)."
    rows = [[_id(nodeid) if i == 0 else "", name, value] for nodeid, v in recorded
            for i, (name, value) in enumerate(_flatten(v))]
    return _table(["test id", "measure", "value"], rows)


def per_file(tests: list[dict]) -> str:
    files: dict[str, list[dict]] = {}
    for test in tests:
        files.setdefault(test["nodeid"].partition("::")[0], []).append(test)
    rows = []
    for path, chosen in files.items():
        counts = Counter(t["outcome"] for t in chosen)
        seconds = sum(t["duration"] for t in chosen)
        rows.append([f"`{path}`", len(chosen)] + [counts[o] for o in OUTCOMES] + [f"{seconds:,.1f}"])
    return _table(["file", "tests", *OUTCOMES, "seconds"], rows)


def summary(data: dict) -> str:
    tests = data["tests"]
    counts = Counter(t["outcome"] for t in tests)
    other = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()) if o not in OUTCOMES)
    minutes, seconds = divmod(int(data["duration_s"]), 60)
    text = (f"Generated by `make test` on {data['started_at'].replace('T', ' ')} at commit `{data['commit']}` "
            f"(plus the working tree's changes, if any), in {minutes} min {seconds} s: **{data['collected']} tests "
            f"collected, {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped**"
            + (f", {other}" if other else "") + ".")
    if not data["whole_suite"]:
        text = ("**Partial run, not the whole suite** (" + "; ".join(data["partial_because"]) + "): the tables "
                "below cover only the tests it ran; `make test` regenerates this document from the whole suite.\n\n"
                + text.replace("Generated by `make test`", "Run"))
    return text


def sections(data: dict) -> dict[str, str]:
    tests = data["tests"]
    matrix, cells = kill_matrix(tests)
    return {
        "summary": summary(data),
        "kill_matrix": matrix,
        "faults": _section(tests, FAULTS, exclude=cells | {t["nodeid"] for t in tests
                                                           if t["nodeid"].startswith(KILL_MATRIX_FILE)}),
        "bad_inputs": _section(tests, BAD_INPUTS),
        "safety": _section(tests, SAFETY),
        "denials": denials(tests),
        "canaries": canaries(tests),
        "invariant": invariant(tests),
        "ledger": _section(tests, LEDGER),
        "per_file": per_file(tests),
    }


def render(data: dict, template: str) -> str:
    """The template with each line ``{{name}}`` replaced by its generated section."""
    generated = sections(data)
    out = []
    for line in template.splitlines():
        name = line.strip()[2:-2].strip() if line.strip().startswith("{{") and line.strip().endswith("}}") else None
        if name is None:
            out.append(line)
        elif name in generated:
            out.append(generated[name])
        else:
            raise KeyError(f"the template names an unknown section {{{{{name}}}}}")
    return "\n".join(out).rstrip() + "\n"


def merge(runs: list[dict]) -> dict:
    """Several saved runs as one (a later run's outcome wins for a test id); partial unless one run was whole."""
    if len(runs) == 1:
        return runs[0]
    tests: dict[str, dict] = {}
    for run in runs:
        tests.update({t["nodeid"]: t for t in run["tests"]})
    whole = [r for r in runs if r["whole_suite"]]
    return {**runs[-1], "tests": list(tests.values()), "collected": len(tests), "deselected": 0,
            "duration_s": sum(r["duration_s"] for r in runs), "whole_suite": bool(whole) and len(whole) == len(runs),
            "partial_because": [f"{len(runs)} runs merged: " + " + ".join(" ".join(r["args"]) or "(all)"
                                                                           for r in runs)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path, default=[RESULTS], help="saved results (JSON)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: standard output)")
    args = parser.parse_args(argv)
    text = render(merge([json.loads(p.read_text()) for p in args.results]), TEMPLATE.read_text())
    if args.out:
        _write(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
