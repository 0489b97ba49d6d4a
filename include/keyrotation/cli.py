"""The ``keyrotation`` command (console script of the installed package): one entry for the command-line tools
of the core package, each also runnable as ``python -m keyrotation.<module>``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from keyrotation import __version__


def _ledger(argv: list[str]) -> int:
    from keyrotation.ledger import main

    return main(argv, prog="keyrotation ledger")


def _policies(argv: list[str]) -> int:
    from keyrotation.policies.__main__ import main

    return main(argv, prog="keyrotation policies")


COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "ledger": ("verify the ledger's hash chain, or append a KMS-HMAC'd checkpoint of its head", _ledger),
    "policies": ("print the least-privilege KMS policy of each role of a key class", _policies),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="keyrotation",
        description="Key rotation tools: check the ledger, print each role's least-privilege KMS policies. "
                    "The rotations themselves run as Airflow DAGs.")
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
