#!/opt/edgefleet/bin/python
"""grpc.health.v1 check of the edgefleet daemon in this container.

Used by the images' HEALTHCHECK and by the Kubernetes probes (exec). Prints
one line and exits 0 when the daemon answers SERVING (with ``--live``: when it
answers at all, so a node that is loading its models or draining is not
restarted), else 1.

It finds the daemon's address and state dir in the daemon's own command line
(the container's PID 1: ``--listen``/``--grpc``, ``--state-dir``), else in
the environment (EDGEFLEET_NODE_LISTEN, EDGEFLEET_COORDINATOR_GRPC,
EDGEFLEET_STATE_DIR), else takes the defaults.

A secure daemon's gRPC port speaks TLS only, and a node's mutual TLS with a
fleet certificate, which plain gRPC probes (Kubernetes' ``grpc:``) cannot do.
This check uses what the daemon keeps in its state dir instead:

  node          its own fleet certificate (mutual TLS), from --state-dir
  coordinator   the fleet CA, from the admin profile in --state-dir
  either one    plaintext when the state dir holds no identity (--insecure)

  edgefleet-healthcheck node|coordinator [--address HOST:PORT] [--state-dir DIR] [--live]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgefleet import defaults, tls

DEFAULT_ADDRESS = {"node": defaults.NODE_LISTEN, "coordinator": defaults.COORDINATOR_GRPC}


def dial_address(address: str) -> str:
    """A wildcard listen address is dialled on loopback."""
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def daemon_flag(name: str, cmdline: Path = Path("/proc/1/cmdline")) -> str:
    """A flag of the daemon this container runs (its PID 1), as it was given."""
    try:
        args = cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return ""
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return ""


def channel_for(role: str, address: str, state_dir: Path) -> tuple[grpc.Channel, str]:
    if role == "node" and (state_dir / "identity.json").is_file():
        identity = json.loads((state_dir / "identity.json").read_text())
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(state_dir / "ca.crt").read_bytes(),
            private_key=(state_dir / "node.key").read_bytes(),
            certificate_chain=(state_dir / "node.crt").read_bytes(),
        )
        options = tls.channel_options(tls.node_dns(identity["node_id"]))
        return grpc.secure_channel(address, credentials, options=options), "mutual TLS"
    profile = state_dir / "admin-profile.json"
    if role == "coordinator" and profile.is_file():
        ca_pem = json.loads(profile.read_text()).get("ca_pem", "")
        if ca_pem:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem.encode())
            options = tls.channel_options(tls.COORDINATOR_DNS)
            return grpc.secure_channel(address, credentials, options=options), "TLS"
    return grpc.insecure_channel(address), "plaintext"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edgefleet-healthcheck", description=__doc__.split("\n")[0]
    )
    parser.add_argument("role", choices=sorted(DEFAULT_ADDRESS))
    parser.add_argument("--address", default="", help="default: the daemon's own flag")
    parser.add_argument("--state-dir", default="", help="default: the daemon's own flag")
    parser.add_argument("--live", action="store_true", help="any answer will do (liveness)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    # Where the daemon listens and keeps its identity: its own flags, else
    # the environment it reads, else its defaults.
    if args.role == "node":
        listen = daemon_flag("--listen") or os.environ.get("EDGEFLEET_NODE_LISTEN", "")
    else:
        listen = daemon_flag("--grpc") or os.environ.get("EDGEFLEET_COORDINATOR_GRPC", "")
    address = dial_address(args.address or listen or DEFAULT_ADDRESS[args.role])
    state_dir = (
        args.state_dir
        or daemon_flag("--state-dir")
        or os.environ.get("EDGEFLEET_STATE_DIR", "/var/lib/edgefleet/state")
    )
    try:
        channel, how = channel_for(args.role, address, Path(state_dir))
    except (OSError, ValueError, KeyError) as error:
        print(f"unhealthy: cannot read the identity in {state_dir}: {error}")
        return 1
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"unhealthy: {args.role} at {address} ({how}): {error.code().name}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    healthy = args.live or reply.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{'healthy' if healthy else 'unhealthy'}: {args.role} at {address} ({how}): {status}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
