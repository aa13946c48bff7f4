"""What the command modules share: environment defaults, address lists, the client."""

from __future__ import annotations

import os

from edgefleet import defaults


def env(name: str, default):
    """``EDGEFLEET_<name>`` from the environment, else ``default``."""
    return os.environ.get(f"EDGEFLEET_{name}", default)


def option(p, *flags: str, env: str | None = None, many: bool = False, **kwargs):
    """``p.add_argument`` for a daemon's flag. ``env``: the default comes from
    ``EDGEFLEET_<env>`` when that is set (argparse converts it with ``type``),
    and a config file gives way to it (flags > env > config file > defaults).
    ``many``: a comma-separated list, which a config file may write as a list."""
    if env is not None:
        value = os.environ.get(f"EDGEFLEET_{env}")
        if value is not None:
            kind = kwargs.get("action")
            if kind == "store_true":
                kwargs["default"] = value == "1"
            elif kind == "append":
                kwargs["default"] = [value] if value else []
            else:
                kwargs["default"] = value
    action = p.add_argument(*flags, **kwargs)
    action.env = f"EDGEFLEET_{env}" if env else None
    action.many = many
    return action


def addresses(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


def coordinator_arg(p) -> None:
    p.add_argument(
        "--coordinator",
        default=env("COORDINATOR", ""),
        help="coordinator address(es) host:port[,host:port...] (env EDGEFLEET_COORDINATOR; "
        f"default: the profile's, else {defaults.COORDINATOR_GRPC})",
    )
    p.add_argument(
        "--profile",
        default="",
        help="client profile: fleet CA, API key, addresses (default $EDGEFLEET_PROFILE, "
        "else ~/.config/edgefleet/profile.json; 'none': plaintext, no key)",
    )
    p.add_argument(
        "--api-key",
        default=env("API_KEY", ""),
        help="API key instead of the profile's (env EDGEFLEET_API_KEY)",
    )


def client(args):
    """A client from the flags, then the profile (TLS to the fleet CA, its API key)."""
    from edgefleet import profile as profiles
    from edgefleet.client import FleetClient

    targets = list(addresses(args.coordinator or ""))
    found = profiles.find(getattr(args, "profile", ""), targets)
    if found is None:
        return FleetClient(targets or [defaults.COORDINATOR_GRPC])
    return FleetClient.from_profile(found, targets or None, api_key=getattr(args, "api_key", ""))


def run_command(work, *, usage_errors: tuple[type[Exception], ...] = (ValueError,)) -> int:
    """A command's work with its errors as one line: a fleet error with its
    reason (exit 1), a usage or local error (exit 2)."""
    import sys

    from edgefleet.errors import EdgefleetError

    try:
        return work() or 0
    except EdgefleetError as error:
        print(f"error: {error.message} ({error.reason.name})", file=sys.stderr)
        return 1
    except usage_errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
