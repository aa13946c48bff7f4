"""What the command modules share: environment defaults, address lists, the client."""

from __future__ import annotations

import os

from edgefleet import defaults


def env(name: str, default):
    """``EDGEFLEET_<name>`` from the environment, else ``default``."""
    return os.environ.get(f"EDGEFLEET_{name}", default)


def addresses(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


def coordinator_arg(p) -> None:
    p.add_argument(
        "--coordinator",
        default=env("COORDINATOR", defaults.COORDINATOR_GRPC),
        help="coordinator address(es) host:port[,host:port...] (env EDGEFLEET_COORDINATOR)",
    )


def client(args):
    from edgefleet.client import FleetClient

    return FleetClient(list(addresses(args.coordinator)))
