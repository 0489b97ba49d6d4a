"""Installed like a user installs it: the wheel built from pyproject.toml, into a fresh virtualenv with stock Airflow
3.3.2 (pinned by the project's lock), run from a temporary folder with no checkout on the path. The DAG folder holds
only a two-line DAG file and its key class YAML; the whole cycle (rotate, re-encrypt, retire) runs through
``airflow dags test`` against the session's OpenBao.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers import CONN_ID, KEY_CLASS_YAML, days, runtime, seed
from keyrotation import __version__
from keyrotation.config import load_key_class

ROOT = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).parent / "uv"
KEY_CLASS = "installed_pii"
DATASET = "installed_customers"

pytestmark = [pytest.mark.slow, pytest.mark.airflow]

DAG_FILE = f'''"""Airflow DAGs of key class {KEY_CLASS}."""

from keyrotation_airflow.dags import key_class_dags

globals().update(key_class_dags("{KEY_CLASS}"))
'''


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """One virtualenv per session: the wheel and its dependencies, resolved against constraints.txt (uv's cache
    makes it seconds). Returns the venv's bin folder, the user's Airflow home and the measured durations."""
    base = tmp_path_factory.mktemp("install")
    timings = {}
    started = time.monotonic()
    built = _run([str(UV), "build", "--wheel", "--out-dir", str(base / "dist"), str(ROOT)], os.environ.copy(), base)
    assert built.returncode == 0, built.stderr
    wheels = list((base / "dist").glob("keyrotation-*.whl"))
    assert [w.name for w in wheels] == [f"keyrotation-{__version__}-py3-none-any.whl"]
    timings["build"] = time.monotonic() - started

    started = time.monotonic()
    venv = base / "venv"
    made = _run([str(UV), "venv", "--quiet", "--python", sys.executable, str(venv)], os.environ.copy(), base)
    assert made.returncode == 0, made.stderr
    done = _run([str(UV), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), str(wheels[0]),
                 "-c", str(ROOT / "constraints.txt")], os.environ.copy(), base, timeout=900)
    assert done.returncode == 0, done.stderr
    timings["install"] = time.monotonic() - started
    return {"bin": venv / "bin", "base": base, "timings": timings}


@pytest.fixture(scope="session")
def user_env(installed, openbao):
    """The environment of a user's Airflow: no PYTHONPATH, no KEYROTATION_CONFIG_DIR (the key classes are found in
    the DAG folder's key_classes/), the vault connection as AIRFLOW_CONN_*, a migrated SQLite metadata DB."""
    home = installed["base"] / "airflow"
    (home / "dags" / "key_classes").mkdir(parents=True)
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "UV_CACHE_DIR", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({
        "PATH": f"{installed['bin']}{os.pathsep}{os.environ['PATH']}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "KEYROTATION_HOME": str(home / "keyrotation"),
        f"AIRFLOW_CONN_{CONN_ID.upper()}": openbao.airflow_connection_uri(),
    })
    started = time.monotonic()
    migrated = _run([str(installed["bin"] / "airflow"), "db", "migrate"], env, installed["base"])
    assert migrated.returncode == 0, migrated.stdout[-3000:] + migrated.stderr[-3000:]
    installed["timings"]["db migrate"] = time.monotonic() - started
    return env


def test_the_wheel_installs_its_modules_not_the_checkouts(installed, user_env):
    where = _run([str(installed["bin"] / "python"), "-c",
                  "import keyrotation, keyrotation_airflow.dags, keyrotation_airflow.plugin; "
                  "print(keyrotation.__version__, keyrotation.__file__, keyrotation_airflow.dags.__file__)"],
                 user_env, installed["base"])
    assert where.returncode == 0, where.stderr
    version, *files = where.stdout.split()
    assert version == __version__
    site = str(installed["base"] / "venv" / "lib")
    assert all(f.startswith(site) for f in files), files
    dev = _run([str(installed["bin"] / "python"), "-c", "import keyrotation_dev"], user_env, installed["base"])
    assert dev.returncode == 1 and "No module named 'keyrotation_dev'" in dev.stderr
    templates = installed["base"] / "venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    shipped = templates / "site-packages" / "keyrotation_airflow" / "templates" / "dags"
    assert sorted(p.name for p in shipped.iterdir()) == [
        "compliance_report.py", "customer_pii.py", "key_classes", "ledger_checkpoint.py", "payment_tokens.py"]
    assert sorted(p.name for p in (shipped / "key_classes").iterdir()) == ["customer_pii.yaml", "payment_tokens.yaml"]


def test_airflow_lists_the_provider_and_the_plugin(installed, user_env):
    airflow = str(installed["bin"] / "airflow")
    providers = _run([airflow, "providers", "list", "--output", "json"], user_env, installed["base"])
    assert providers.returncode == 0, providers.stderr
    ours = [p for p in json.loads(providers.stdout) if p["package_name"] == "keyrotation"]
    assert len(ours) == 1 and ours[0]["version"] == __version__
    assert ours[0]["description"].startswith("Rotates KMS master keys")

    notifications = _run([airflow, "providers", "notifications", "--output", "json"], user_env, installed["base"])
    assert notifications.returncode == 0, notifications.stderr
    assert {"notification_class_name": "keyrotation_airflow.notifications.KeyClassNotifier"} in json.loads(
        notifications.stdout)

    plugins = _run([airflow, "plugins", "--output", "json"], user_env, installed["base"])
    assert plugins.returncode == 0, plugins.stderr
    [plugin] = [p for p in json.loads(plugins.stdout) if p["name"] == "keyrotation"]
    assert plugin["source"].startswith(f"keyrotation=={__version__}: EntryPoint(name='keyrotation', "
                                       "value='keyrotation_airflow.plugin:KeyRotationPlugin', group='airflow.plugins')")
    assert plugin["external_views"][0]["href"] == "/keyrotation/inventory"


@pytest.mark.parametrize(("command", "description"), [
    (["keyrotation"], "Key rotation tools: check the ledger, print each role's least-privilege KMS"),
    (["keyrotation", "ledger"], "Ledger maintenance."),
    (["keyrotation", "ledger", "verify"], "Walk the ledger's hash chain and report the first broken link"),
    (["keyrotation", "ledger", "checkpoint"], "Verify the ledger against its latest checkpoint, then append"),
    (["keyrotation", "policies"], "Print the least-privilege policy of each role of a key class"),
    (["keyrotation", "census"], "Print which master key version protects each partition of a key class's datasets"),
    (["keyrotation", "report"], "Write the compliance report (HTML, PDF, CSV/Parquet) of the key classes"),
    (["keyrotation", "spark-client"], "Build the Transit KmsClient jar that lets Spark (parquet-java) read and write"),
    (["keyrotation-sidecar"], "Encrypt/decrypt over HTTP for one key class."),
])
def test_each_console_script_says_what_it_does(installed, user_env, command, description):
    done = _run([str(installed["bin"] / command[0]), *command[1:], "--help"], user_env, installed["base"])
    assert done.returncode == 0, done.stderr
    prog = " ".join(command)
    assert done.stdout.startswith(f"usage: {prog} ")
    assert description in " ".join(done.stdout.split()), done.stdout


def test_the_installed_package_builds_the_spark_kms_client(installed, user_env, tmp_path):
    """The Java source ships in the wheel; the command compiles it against a Spark installation (here the
    development environment's pyspark: the installed one has no Spark)."""
    import zipfile

    import pyspark

    out = tmp_path / "client.jar"
    done = _run([str(installed["bin"] / "keyrotation"), "spark-client", "--spark-home",
                 str(Path(pyspark.__file__).parent), "--out", str(out)], user_env, installed["base"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    with zipfile.ZipFile(out) as jar:
        assert "io/keyrotation/parquet/TransitKmsClient.class" in jar.namelist()
    missing = _run([str(installed["bin"] / "keyrotation"), "spark-client", "--spark-home", str(tmp_path)],
                   user_env, installed["base"])
    assert (missing.returncode, missing.stderr.strip()) == (
        2, f"error: {tmp_path / 'jars'} holds no parquet-hadoop jar: not a Spark installation's jars/ folder")


def test_the_whole_cycle_runs_from_the_installed_package(installed, user_env, vault, openbao, record_property):
    home = Path(user_env["AIRFLOW_HOME"])
    dags = home / "dags"
    (dags / f"{KEY_CLASS}.py").write_text(DAG_FILE)
    yaml_file = dags / "key_classes" / f"{KEY_CLASS}.yaml"
    yaml_file.write_text(KEY_CLASS_YAML.format(
        name=KEY_CLASS, key_ref=f"{KEY_CLASS}-{os.urandom(4).hex()}", conn_id=CONN_ID, mode="rewrap", chunk_size=2,
        grace="0s", dataset=DATASET, location=home / "data" / DATASET))
    assert sorted(p.name for p in dags.rglob("*") if p.is_file()) == [f"{KEY_CLASS}.py", f"{KEY_CLASS}.yaml"]

    # The test process writes the data under the first version, through the user's ledger.
    ledger_url = f"sqlite:///{home / 'keyrotation' / 'ledger.db'}"
    (home / "keyrotation").mkdir(exist_ok=True)
    rt = runtime(load_key_class(KEY_CLASS, yaml_file.parent), vault, ledger_url)
    partitions = days("2024-03-01", 5)
    assert seed(rt, DATASET, partitions) == 1

    airflow = str(installed["bin"] / "airflow")
    timings = installed["timings"]
    for dag_id, conf in [
        (f"rotate__{KEY_CLASS}", {"force": True, "reason": "installed package: rotate"}),
        (f"reencrypt__{DATASET}", {"scope": "sweep", "dry_run": False}),
        (f"retire__{KEY_CLASS}", {}),
    ]:
        started = time.monotonic()
        done = _run([airflow, "dags", "test", dag_id, "--conf", json.dumps(conf)], user_env, installed["base"])
        timings[f"dags test {dag_id.split('__')[0]}"] = time.monotonic() - started
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        finished = [line for line in (done.stdout + done.stderr).splitlines()
                    if f"DagRun Finished: dag_id={dag_id}," in line]
        assert len(finished) == 1 and " state=success," in finished[0], done.stdout[-4000:]
        assert openbao.token not in done.stdout + done.stderr

    state = rt.backend.key_state()
    assert (state.latest_version, state.min_decryption_version) == (2, 2)
    assert rt.census(DATASET).by_version() == {2: len(partitions)}
    events = Counter(row["event"] for row in rt.ledger.rows(key_class=KEY_CLASS))
    assert {e: events[e] for e in ("version_created", "partition_rewrapped", "partition_validated",
                                   "versions_retired")} == {"version_created": 1, "partition_rewrapped": 5,
                                                            "partition_validated": 5, "versions_retired": 1}, events

    verify = _run([str(installed["bin"] / "keyrotation"), "ledger", "verify", "--url", ledger_url], user_env,
                  installed["base"])
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # The census and the report from the console script, outside Airflow, credentials from the environment.
    keyrotation = str(installed["bin"] / "keyrotation")
    cli_env = {**user_env, "KEYROTATION_LEDGER_URL": ledger_url, "VAULT_ADDR": openbao.url}
    no_token = _run([keyrotation, "census", KEY_CLASS], cli_env, installed["base"])
    assert (no_token.returncode, no_token.stdout, no_token.stderr) == (
        2, "", "error: VAULT_TOKEN (or VAULT_TOKEN_FILE) is not set: the sidecar reads its Vault/OpenBao token from "
               "the environment\n")
    cli_env["VAULT_TOKEN"] = openbao.token
    census = _run([keyrotation, "census", KEY_CLASS], cli_env, installed["base"])
    assert (census.returncode, census.stdout, census.stderr) == (
        0, f"census {DATASET}: 5 partitions (v2: 5)\n", "")
    out = installed["base"] / "report"
    report = _run([keyrotation, "report", "--key-class", KEY_CLASS, "--output", str(out)], cli_env, installed["base"])
    assert report.returncode == 0, report.stderr[-3000:]
    written = json.loads(report.stdout)
    assert written["html"] == f"{out}/report.html" and (out / "report.pdf").stat().st_size > 0
    assert KEY_CLASS in (out / "report.html").read_text()
    [recorded] = rt.ledger.rows(events_in=("report_written",))
    assert json.loads(recorded["detail"])["content_hash"] == written["content_hash"]
    assert openbao.token not in census.stdout + census.stderr + report.stdout + report.stderr

    record_property("install_durations_s", json.dumps({k: round(v, 1) for k, v in timings.items()}))


@pytest.mark.parametrize(("env", "expected"), [
    ({"KEYROTATION_CONFIG_DIR": "/etc/keyrotation/classes", "AIRFLOW__CORE__DAGS_FOLDER": "/x/dags"},
     "/etc/keyrotation/classes"),
    ({"AIRFLOW__CORE__DAGS_FOLDER": "/opt/airflow/dags/repo/dags", "AIRFLOW_HOME": "/opt/airflow"},
     "/opt/airflow/dags/repo/dags/key_classes"),
    ({"AIRFLOW_HOME": "/usr/local/airflow"}, "/usr/local/airflow/dags/key_classes"),
    ({"HOME": "/home/someone"}, "/home/someone/airflow/dags/key_classes"),
])
def test_where_the_installed_package_finds_the_key_classes(installed, env, expected):
    code = "from keyrotation.config import config_dir; print(config_dir())"
    done = _run([str(installed["bin"] / "python"), "-c", code],
                {"PATH": os.environ["PATH"], "HOME": "/nonexistent", **env}, installed["base"])
    assert (done.returncode, done.stdout, done.stderr) == (0, expected + "\n", "")
