"""The renderer of docs/reliability.md (tests/reliability_report.py), on synthetic results: no suite is run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import reliability_report as rr

KILL = "tests/test_kill_matrix.py::test_a_kill_at_each_checkpoint_loses_nothing_before_and_after_retirement"


def _test(nodeid: str, outcome: str = "PASS", properties=(), markers=(), message: str = "") -> dict:
    return {"nodeid": nodeid, "outcome": outcome, "duration": 0.1, "markers": list(markers),
            "properties": [list(p) for p in properties], "message": message}


def _data(tests: list[dict], whole: bool = True) -> dict:
    return {"version": 1, "started_at": "2026-01-02T03:04:05+00:00", "duration_s": 125.0, "commit": "abc123",
            "args": [], "whole_suite": whole, "partial_because": [] if whole else ["-k 'kill'"],
            "collected": len(tests), "deselected": 0, "exitstatus": 0, "tests": tests}


TESTS = [
    _test(f"{KILL}[reencrypt-staged-local]", markers=["faults"]),
    _test(f"{KILL}[reencrypt-staged-s3]", "FAIL", markers=["faults"], message="AssertionError: lost | a row"),
    _test(f"{KILL}[reencrypt-data_moved-local]", markers=["faults"]),
    _test(f"{KILL}[reencrypt-data_moved-s3]", markers=["faults"]),
    _test(f"{KILL}[rewrap-recorded-local]", markers=["faults"]),
    _test(f"{KILL}[rewrap-recorded-s3]", "SKIP", markers=["faults"], message="no moto"),
    _test("tests/test_kill_matrix.py::test_the_matrix_is_every_checkpoint_of_the_code", markers=["faults"]),
    _test("tests/test_faults.py::test_sigkill_at_seeded_times[0]", markers=["faults"]),
    _test("tests/test_faults.py::test_disk_full_leaves_the_source_untouched", "SKIP", markers=["faults"],
          message="cannot mount a small tmpfs here"),
    _test("tests/test_faults.py::test_something_new", markers=["faults"]),
    _test("tests/test_engine.py::test_crash_at_any_step_leaves_partition_decryptable_and_rerun_completes[staged]"),
    _test("tests/test_bad_input.py::test_bad_partition_fails_alone_clearly_and_untouched[truncated parquet]"),
    _test("tests/test_bad_input.py::test_bad_partition_fails_alone_clearly_and_untouched[empty partition]"),
    _test("tests/test_least_privilege.py::test_each_role_can_do_its_part_and_is_refused_the_rest[rotate]",
          properties=[("denials", {"role": "rotate", "refused": 28, "allowed": 3})]),
    _test("tests/test_aws_least_privilege.py::test_totals"),
    _test("tests/test_no_secrets.py::test_full_cycle_leaks_nothing",
          properties=[("canary_scan", {"backend": "vault", "where": ["task output", "xcom"], "files": 17,
                                       "canaries": 9, "hits": 0})]),
    _test("tests/test_invariant.py::test_no_interleaving_leaves_an_undecryptable_partition",
          properties=[("invariant_progress", json.dumps({"sequences": 25, "shares": {"rotated": 0.92},
                                                          "counts": {"ops_rotate": 30}}))]),
    _test("tests/test_config.py::test_shipped_key_classes_are_valid"),
]


def test_the_kill_matrix_is_derived_from_the_test_ids():
    text, cells = rr.kill_matrix(TESTS)
    assert len(cells) == 6
    assert text.startswith("6 cells (3 checkpoints, 2 modes × 2 stores; — where a mode has no such checkpoint): "
                           "4 PASS, 1 FAIL, 1 SKIP.")
    lines = text.splitlines()
    assert "| checkpoint | reencrypt / local | reencrypt / s3 | rewrap / local | rewrap / s3 |" in lines
    assert "| `staged` | PASS | FAIL | — | — |" in lines
    assert "| `data_moved` | PASS | PASS | — | — |" in lines
    assert "| `recorded` | — | — | PASS | SKIP |" in lines
    # the failure and the skip named by test id, with their messages (a | escaped)
    assert f"| `{KILL}[reencrypt-staged-s3]` | FAIL (AssertionError: lost \\| a row) |" in lines
    assert f"| `{KILL}[rewrap-recorded-s3]` | SKIP (no moto) |" in lines
    assert "| `tests/test_kill_matrix.py::test_the_matrix_is_every_checkpoint_of_the_code` | PASS |" in lines


def test_each_section_row_names_its_test_id_and_outcome():
    parts = rr.sections(_data(TESTS))
    faults = parts["faults"].splitlines()
    assert faults[0] == "4 test ids: 3 PASS, 1 SKIP."
    assert any("`tests/test_faults.py::test_sigkill_at_seeded_times[0]` | PASS |" in line for line in faults)
    assert any("`tests/test_faults.py::test_disk_full_leaves_the_source_untouched` | SKIP (cannot mount" in line
               for line in faults)
    assert any(line.startswith("| other fault-injection test (marked `faults`) | `tests/test_faults.py::"
                               "test_something_new` |") for line in faults)
    assert not any("test_kill_matrix" in line for line in faults)  # the matrix has its own table
    assert "`tests/test_faults.py::test_kms_staying_down`" in faults[-1]
    assert faults[-1].startswith("No test id in this run starts with ")  # a selector that matched nothing
    bad = parts["bad_inputs"].splitlines()
    assert bad[0] == "2 test ids: 2 PASS."
    assert any("[truncated parquet]` | PASS |" in line for line in bad)
    assert parts["safety"] == "No test of this section ran in this run."


def test_denials_count_test_ids_per_backend_and_show_recorded_counts():
    text = rr.sections(_data(TESTS))["denials"]
    lines = text.splitlines()
    assert "| OpenBao Transit | 1 | 1 | 0 | 0 |" in lines
    assert "| AWS KMS and S3 (moto enforcing IAM) | 1 | 1 | 0 | 0 |" in lines
    assert "| Cloud KMS (test server enforcing IAM) | 0 | 0 | 0 | 0 |" in lines
    assert "| test id | role | refused | allowed |" in lines
    assert any(line.endswith("[rotate]` | rotate | 28 | 3 |") for line in lines)
    assert "Per-operation counts (`denials`): not recorded in this run." in lines  # the AWS tests recorded none


def test_canaries_and_invariant_progress_come_from_the_recorded_properties():
    parts = rr.sections(_data(TESTS))
    assert parts["canaries"].splitlines()[0] == "| test id | backend | where | files | canaries | hits |"
    assert parts["canaries"].splitlines()[2] == (
        "| `tests/test_no_secrets.py::test_full_cycle_leaks_nothing` | vault | task output, xcom | 17 | 9 | 0 |")
    invariant = parts["invariant"].splitlines()
    assert invariant[0] == "| test id | measure | value |"
    assert invariant[2:] == [
        "| `tests/test_invariant.py::test_no_interleaving_leaves_an_undecryptable_partition` | sequences | 25 |",
        "|  | shares.rotated | 0.92 (92%) |", "|  | counts.ops_rotate | 30 |"]
    bare = rr.sections(_data([_test("tests/test_config.py::test_shipped_key_classes_are_valid")]))
    assert bare["canaries"].startswith("Not recorded in this run (no test recorded")
    assert bare["invariant"].startswith("Not recorded in this run (no test recorded")
    assert bare["kill_matrix"] == "No kill-matrix test ran in this run."


def test_the_template_renders_whole_with_the_totals_and_a_partial_run_says_so():
    template = rr.TEMPLATE.read_text()
    text = rr.render(_data(TESTS), template)
    assert "{{" not in text and "}}" not in text
    assert ("Generated by `make test` on 2026-01-02 03:04:05+00:00 at commit `abc123` (plus the working tree's "
            "changes, if any), in 2 min 5 s: **18 tests collected, 15 passed, 1 failed, 2 skipped**.") in text
    assert "## What stays unproven" in text
    assert "| `tests/test_faults.py` | 3 | 2 | 0 | 1 | 0.3 |" in text.splitlines()
    partial = rr.render(_data(TESTS, whole=False), template)
    assert partial.count("**Partial run, not the whole suite** (-k 'kill')") == 1
    with pytest.raises(KeyError, match="unknown section"):
        rr.render(_data(TESTS), "{{nonsense}}\n")


def test_saved_results_render_from_the_command_line_merged(tmp_path: Path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(_data(TESTS[:7], whole=False)))
    second.write_text(json.dumps(_data(TESTS[7:], whole=False)))
    out = tmp_path / "preview.md"
    assert rr.main([str(first), str(second), "--out", str(out)]) == 0
    text = out.read_text()
    assert "**18 tests collected, 15 passed, 1 failed, 2 skipped**" in text
    assert "**Partial run, not the whole suite** (2 runs merged" in text


def _collector(args_source, args, **options) -> rr.Collector:
    option = {"keyword": "", "markexpr": "", "deselect": None, "ignore": None, "ignore_glob": None, "lf": False,
              "stepwise": False, "collectonly": False, **options}
    config = SimpleNamespace(rootpath=rr.ROOT, getini=lambda name: ["tests"], args_source=args_source, args=args,
                             invocation_params=SimpleNamespace(dir=rr.ROOT, args=args),
                             option=SimpleNamespace(**option))
    collector = rr.Collector(config)
    collector.items = [SimpleNamespace(nodeid="tests/test_x.py::test_a")]
    collector.tests = {"tests/test_x.py::test_a": _test("tests/test_x.py::test_a")}
    return collector


def test_only_a_whole_suite_run_counts_as_whole():
    session = SimpleNamespace(shouldstop=False, shouldfail=False)
    testpaths = pytest.Config.ArgsSource.TESTPATHS
    assert _collector(testpaths, ["tests"]).partial_because(session) == []
    assert _collector(pytest.Config.ArgsSource.ARGS, ["tests/"]).partial_because(session) == []
    assert _collector(pytest.Config.ArgsSource.ARGS, ["tests/test_x.py"]).partial_because(session)[0].startswith(
        "arguments tests/test_x.py")
    assert _collector(testpaths, ["tests"], keyword="kill").partial_because(session) == ["-k 'kill'"]
    assert _collector(testpaths, ["tests"], markexpr="faults").partial_because(session) == ["-m 'faults'"]
    assert _collector(testpaths, ["tests"], lf=True).partial_because(session) == ["--last-failed"]
    deselected = _collector(testpaths, ["tests"])
    deselected.deselected = 3
    assert deselected.partial_because(session) == ["3 tests deselected"]
    stopped = _collector(testpaths, ["tests"])
    stopped.tests["tests/test_x.py::test_a"]["outcome"] = "NOT RUN"
    assert stopped.partial_because(session) == ["stopped early (1 selected tests not run)"]


TOY = '''
import pytest

def test_ok(record_property):
    record_property("canary_scan", {"backend": "toy", "where": {"log": 1}, "hits": 0})

@pytest.mark.parametrize("x", [1, 2])
def test_param(x):
    assert x

def test_skip():
    pytest.skip("not here")

def test_fails():
    assert False, "broken on purpose"
'''


def test_the_plugin_writes_the_doc_after_a_whole_run_only(tmp_path: Path):
    """The plugin in a real pytest run of a toy project: whole suite (even with a failure) writes the document;
    ``-k``, a file or a node id leaves it alone; the results are saved either way."""
    import os
    import subprocess
    import sys

    project = tmp_path / "toy"
    (project / "tests").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    (project / "tests" / "test_toy.py").write_text(TOY)
    doc, results = tmp_path / "reliability.md", tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(rr.TESTS), "KEYROTATION_RELIABILITY_DOC": str(doc),
           "KEYROTATION_RELIABILITY_JSON": str(results), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "pytest", "-p", "reliability_report", "-p", "no:cacheprovider",
                               "-q", *args], cwd=project, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stdout + done.stderr  # test_fails
        return done.stdout

    for partial in (["-k", "ok or fails"], ["tests/test_toy.py"], ["tests/test_toy.py::test_fails"]):
        out = run(*partial)
        assert "reliability: " + str(doc) + " not regenerated (partial run: " in out, out
        assert not doc.exists()
        assert json.loads(results.read_text())["whole_suite"] is False
    for whole in ([], ["tests"]):
        out = run(*whole)
        assert f"reliability: {doc} regenerated from this run" in out, out
        text = doc.read_text()
        assert "**5 tests collected, 3 passed, 1 failed, 1 skipped**" in text
        assert "| `tests/test_toy.py::test_ok` | toy | log: 1 | 0 |" in text.splitlines()
        saved = json.loads(results.read_text())
        seconds = sum(t["duration"] for t in saved["tests"])
        assert f"| `tests/test_toy.py` | 5 | 3 | 1 | 1 | {seconds:,.1f} |" in text.splitlines()
        assert saved["whole_suite"] is True
        assert {t["nodeid"]: t["outcome"] for t in saved["tests"]}["tests/test_toy.py::test_fails"] == "FAIL"
        doc.unlink()


def test_each_file_has_its_counts_and_seconds():
    tests = [{**_test("tests/test_a.py::one"), "duration": 61.25}, {**_test("tests/test_a.py::two", "FAIL"),
                                                                     "duration": 1200.0},
             _test("tests/test_b.py::one", "SKIP")]
    lines = rr.per_file(tests).splitlines()
    assert lines[0] == "| file | tests | PASS | FAIL | SKIP | seconds |"
    assert "| `tests/test_a.py` | 2 | 1 | 1 | 0 | 1,261.2 |" in lines
    assert "| `tests/test_b.py` | 1 | 0 | 0 | 1 | 0.1 |" in lines
