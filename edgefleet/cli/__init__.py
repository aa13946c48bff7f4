"""The ``edgefleet`` command: daemons, model store and client commands.

One module per command group; each registers its subcommands with ``add``
and imports what it needs when it runs, so ``edgefleet --help`` and the
client commands start fast. Nothing imports this package.
"""

from __future__ import annotations

import argparse
import sys

from edgefleet import __version__
from edgefleet.cli import access, bundle, coordinator, fleet, local, models, node


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet", description="Small language models across a fleet of edge devices."
    )
    parser.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (node, models, coordinator, local, fleet, access, bundle):
        group.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from edgefleet.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
