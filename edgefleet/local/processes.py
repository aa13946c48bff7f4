"""Starting daemons as separate OS processes and waiting until they serve.

Used by ``edgefleet up``/``demo`` and by the tests: every node is its own
process, so killing one is a real node failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now, never the same twice in this process."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def health_status(address: str, service: str = "", timeout_s: float = 1.0) -> int | None:
    """The grpc.health.v1 status of a daemon, or None if it does not answer."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
            return reply.status
    except grpc.RpcError:
        return None


@dataclass
class DaemonProcess:
    name: str
    address: str
    process: subprocess.Popen
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_serving(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with code {self.process.returncode} before serving"
                    + self._log_tail()
                )
            if self._ready():
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"{self.name} at {self.address} not serving after {timeout_s}s" + self._log_tail()
        )

    def _ready(self) -> bool:
        # A secure daemon's health answers over (mutual) TLS only: it says it
        # is ready in its log once it serves.
        ready_line = self.extra.get("ready_line")
        if ready_line:
            return bool(self.log_path and ready_line in self.log_path.read_text(errors="replace"))
        return health_status(self.address) == health_pb2.HealthCheckResponse.SERVING

    def _log_tail(self) -> str:
        if self.log_path and self.log_path.exists():
            lines = self.log_path.read_text(errors="replace").splitlines()[-15:]
            return "\n--- log tail ---\n" + "\n".join(lines)
        return ""

    def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait()


def edgefleet_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgefleet", *args]


def start_daemon(
    args: list[str],
    *,
    address: str,
    name: str,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    wrap: tuple[str, ...] = (),
) -> DaemonProcess:
    """Start ``edgefleet ARGS...`` as its own process (own session: a terminal's
    Ctrl-C reaches only the parent, which stops its children in order).
    ``wrap`` prefixes the command, e.g. ``ip netns exec NS`` (it must exec)."""
    out = log_path.open("ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(
        [*wrap, *edgefleet_command(*args)],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    if log_path:
        out.close()
    return DaemonProcess(name=name, address=address, process=process, log_path=log_path)


def start_coordinator(
    *,
    grpc_address: str,
    etcd: list[str],
    http_address: str = "",
    extra_args: tuple[str, ...] = (),
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    name: str = "coordinator",
    state_dir: Path | None = None,
) -> DaemonProcess:
    """``state_dir``: a secure coordinator (fleet CA, TLS, keys) keeping its
    fleet secret and admin profile there; None: ``--insecure``."""
    http_address = http_address or f"{grpc_address.rsplit(':', 1)[0]}:{free_port()}"
    security = (
        ["--state-dir", str(state_dir), "--node-grpc", f"{grpc_address.rsplit(':', 1)[0]}:0"]
        if state_dir is not None
        else ["--insecure"]
    )
    args = [
        "coordinator",
        "--grpc",
        grpc_address,
        "--http",
        http_address,
        "--etcd",
        ",".join(etcd),
        *security,
        *extra_args,
    ]
    process = start_daemon(args, address=grpc_address, name=name, log_path=log_path, env=env)
    process.extra["http"] = http_address
    if state_dir is not None:
        process.extra["ready_line"] = "edgefleet coordinator ready"
        process.extra["profile"] = state_dir / "admin-profile.json"
    return process


def admin_client(coordinator: DaemonProcess):
    """A client of a secure coordinator, with its admin profile."""
    from edgefleet.client import FleetClient
    from edgefleet.profile import Profile

    profile = Profile.load(coordinator.extra["profile"])
    return FleetClient.from_profile(profile, [coordinator.address])


def join_token(
    coordinator: DaemonProcess, *, uses: int = 0, ttl_s: float = 3600, approve: bool = True
) -> str:
    """A new join token from a secure coordinator (its admin profile)."""
    from edgefleet.v1 import access_pb2

    with admin_client(coordinator) as client:
        reply = client.access(
            "CreateJoinToken",
            access_pb2.CreateJoinTokenRequest(ttl_seconds=ttl_s, uses=uses, approve=approve),
        )
    return reply.token


def start_node(
    *,
    listen: str,
    models: str = "",
    slots: int | None = None,
    queue: int | None = None,
    extra_args: tuple[str, ...] = (),
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    name: str = "node",
    join: tuple[str, Path] | None = None,
    wrap: tuple[str, ...] = (),
) -> DaemonProcess:
    """``join``: (token, state dir) for a node of a secure fleet; None: ``--insecure``.
    ``wrap``: as for ``start_daemon``."""
    args = ["node", "--listen", listen]
    if join is not None:
        args += ["--join", join[0], "--state-dir", str(join[1])]
    else:
        args += ["--insecure"]
    if models:
        args += ["--models", models]
    if slots is not None:
        args += ["--slots", str(slots)]
    if queue is not None:
        args += ["--queue", str(queue)]
    args += list(extra_args)
    process = start_daemon(args, address=listen, name=name, log_path=log_path, env=env, wrap=wrap)
    if join is not None:
        process.extra["ready_line"] = "edgefleet node ready"
    return process
