"""``python -m keyrotation.policies KEY_CLASS [--account ID] [--region REGION] | --anchor [KEY]``."""

from __future__ import annotations

import argparse
import sys

from keyrotation.config import load_key_class
from keyrotation.errors import ConfigError
from keyrotation.policies import anchor_policies, render


def main(argv: list[str], prog: str = "python -m keyrotation.policies") -> int:
    if argv[:1] == ["--anchor"] and len(argv) <= 2:
        from keyrotation.anchoring import DEFAULT_ANCHOR_KEY

        key = argv[1] if len(argv) == 2 else DEFAULT_ANCHOR_KEY
        for name, hcl in anchor_policies(key).items():
            print(f"# keyrotation-ledger-{name}: the ledger's anchor key {key!r}\n{hcl}")
        return 0
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s KEY_CLASS [--account ID] [--region REGION] | --anchor [KEY]",
        description="Print the least-privilege policy of each role of a key class, for its backend.")
    parser.add_argument("key_class")
    parser.add_argument("--account", help="aws_kms: the 12-digit AWS account id of the keys")
    parser.add_argument("--region", help="aws_kms: the region of the keys, if the key class names none")
    args = parser.parse_args(argv)
    target = {k: v for k, v in (("account", args.account), ("region", args.region)) if v is not None}
    try:
        text = render(load_key_class(args.key_class), **target)
    except (ConfigError, ValueError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line, whatever the cause
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
