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
            if health_status(self.address) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"{self.name} at {self.address} not serving after {timeout_s}s" + self._log_tail()
        )

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
) -> DaemonProcess:
    http_address = http_address or f"{grpc_address.rsplit(':', 1)[0]}:{free_port()}"
    args = [
        "coordinator",
        "--grpc",
        grpc_address,
        "--http",
        http_address,
        "--etcd",
        ",".join(etcd),
        *extra_args,
    ]
    process = start_daemon(args, address=grpc_address, name=name, log_path=log_path, env=env)
    process.extra["http"] = http_address
    return process


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
) -> DaemonProcess:
    args = ["node", "--listen", listen]
    if models:
        args += ["--models", models]
    if slots is not None:
        args += ["--slots", str(slots)]
    if queue is not None:
        args += ["--queue", str(queue)]
    args += list(extra_args)
    return start_daemon(args, address=listen, name=name, log_path=log_path, env=env)
