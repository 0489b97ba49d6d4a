"""The ``keyrotation`` command (console script of the installed package): one entry for the command-line tools
of the core package, each also runnable as ``python -m keyrotation.<module>``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from keyrotation import __version__


def _ledger(argv: list[str]) -> int:
    from keyrotation.ledger import main

    return main(argv, prog="keyrotation ledger")


def _policies(argv: list[str]) -> int:
    from keyrotation.policies.__main__ import main

    return main(argv, prog="keyrotation policies")


CREDENTIALS = ("KMS credentials come from the environment only, as the sidecar takes them: VAULT_ADDR and VAULT_TOKEN "
               "(or VAULT_TOKEN_FILE), the AWS credential chain, Google's application default credentials.")


def _kms_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-dir", help="key class folder (default: $KEYROTATION_CONFIG_DIR, else key_classes/ "
                                             "in Airflow's DAG folder)")
    parser.add_argument("--ledger-url", help="ledger database URL (default: $KEYROTATION_LEDGER_URL, where a password "
                                             "belongs, or in PGPASSWORD: never on the command line)")
    parser.add_argument("--vault-url", help="vault_transit: Vault/OpenBao address (default: $VAULT_ADDR)")
    parser.add_argument("--aws-endpoint-url", help="aws_kms: KMS endpoint (e.g. a local server)")
    parser.add_argument("--aws-region", help="aws_kms: region (default: the key class's, or the AWS chain's)")
    parser.add_argument("--gcp-kms-endpoint", help="gcp_kms: Cloud KMS endpoint (host:port)")


def _runtime(name: str, args: argparse.Namespace) -> Any:
    from keyrotation.backends.base import ClientOptions
    from keyrotation.backends.registry import client_from_environment, open_backend
    from keyrotation.config import load_key_class
    from keyrotation.ledger import Ledger
    from keyrotation.runtime import KeyClassRuntime

    config = load_key_class(name, args.config_dir)
    client = client_from_environment(config.key_class, ClientOptions(
        vault_url=args.vault_url, aws_endpoint_url=args.aws_endpoint_url, aws_region=args.aws_region,
        gcp_kms_endpoint=args.gcp_kms_endpoint))
    return KeyClassRuntime(config, open_backend(config.key_class, client), Ledger(args.ledger_url))


def _census(argv: list[str]) -> int:
    from keyrotation.census import take_census
    from keyrotation.errors import KeyRotationError

    parser = argparse.ArgumentParser(
        prog="keyrotation census",
        description="Print which master key version protects each partition of a key class's datasets, read from "
                    "the data's key material (read only; nothing is cached or recorded). " + CREDENTIALS)
    parser.add_argument("key_class")
    parser.add_argument("--dataset", action="append", help="only this dataset (repeatable; default: all)")
    parser.add_argument("--json", action="store_true", help="one JSON summary per dataset instead of a line")
    _kms_options(parser)
    args = parser.parse_args(argv)
    try:
        rt = _runtime(args.key_class, args)
        names = args.dataset or [ds.name for ds in rt.config.datasets]
        censuses = [take_census(rt.engine(name)) for name in names]
    except (KeyRotationError, OSError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    for census in censuses:
        print(json.dumps(census.summary()) if args.json else census.format())
    return 1 if any(c.errors for c in censuses) else 0


def _report(argv: list[str]) -> int:
    from datetime import UTC, date, datetime, timedelta

    from keyrotation.config import list_key_classes
    from keyrotation.errors import KeyRotationError
    from keyrotation.ledger import Ledger, home_dir
    from keyrotation.reports import write_report
    from keyrotation.reports.evidence import KeyClassEvidence, Period

    parser = argparse.ArgumentParser(
        prog="keyrotation report",
        description="Write the compliance report (HTML, PDF, CSV/Parquet) of the key classes for a period, from the "
                    "ledger, the KMS and a census, without Airflow's run history (the compliance_report DAG adds "
                    "it); the report and its hashes are recorded in the ledger. " + CREDENTIALS)
    parser.add_argument("--key-class", action="append", help="report on this key class (repeatable; default: all)")
    parser.add_argument("--start", type=date.fromisoformat, help="first day (default: the first of this month)")
    parser.add_argument("--end", type=date.fromisoformat, help="last day, inclusive (default: today)")
    parser.add_argument("--output", help="folder (default: $KEYROTATION_HOME/reports/<start>_<time>)")
    _kms_options(parser)
    args = parser.parse_args(argv)
    today = datetime.now(UTC).date()
    start, end = args.start or today.replace(day=1), args.end or today
    period = Period(datetime(start.year, start.month, start.day, tzinfo=UTC),
                    datetime(end.year, end.month, end.day, tzinfo=UTC) + timedelta(days=1))
    try:
        items = []
        for name in args.key_class or list_key_classes(args.config_dir):
            rt = _runtime(name, args)
            items.append(KeyClassEvidence(rt.config.key_class, rt.backend.key_state(), rt.censuses(),
                                          rt.backend.deletion_dates()))
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = args.output or f"{home_dir()}/reports/{start.isoformat()}_{stamp}"
        result = write_report(items, Ledger(args.ledger_url), out, period)
    except (KeyRotationError, OSError, ValueError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    print(json.dumps(result.summary()))
    return 0


def _spark_client(argv: list[str]) -> int:
    from keyrotation.spark.client_jar import CLIENT_CLASS, ClientBuildError, build_client_jar, spark_jars

    parser = argparse.ArgumentParser(
        prog="keyrotation spark-client",
        description="Build the Transit KmsClient jar that lets Spark (parquet-java) read and write the lake's PME "
                    f"files ({CLIENT_CLASS}), compiled with the JDK's javac against a Spark installation's jars. "
                    "See docs/spark.md for the settings.")
    parser.add_argument("--out", default="keyrotation-transit-kms-client.jar", help="the jar to write "
                        "(default: %(default)s)")
    parser.add_argument("--spark-home", help="the Spark installation (default: $SPARK_HOME, else the pyspark "
                                             "package of this Python)")
    args = parser.parse_args(argv)
    try:
        print(build_client_jar(args.out, spark_jars(args.spark_home)))
    except ClientBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "ledger": ("verify the ledger's hash chain, or append a KMS-HMAC'd checkpoint of its head", _ledger),
    "policies": ("print the least-privilege KMS policy of each role of a key class", _policies),
    "census": ("print which key version protects each partition of a key class's datasets", _census),
    "report": ("write the compliance report of the key classes for a period", _report),
    "spark-client": ("build the Transit KmsClient jar Spark needs to read the lake", _spark_client),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="keyrotation",
        description="Key rotation tools: check the ledger, print each role's least-privilege KMS policies, take "
                    "a census, write the compliance report. The rotations themselves run as Airflow DAGs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, _) in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help, --version, or an error naming the commands
        return 2
    return COMMANDS[argv[0]][1](argv[1:])


def sidecar() -> int:
    from keyrotation.sidecar import main as sidecar_main

    return sidecar_main(sys.argv[1:], prog="keyrotation-sidecar")


if __name__ == "__main__":
    sys.exit(main())
