"""The systemd units in deploy/systemd/: systemd itself accepts them, they say
what a hardened, restartable, draining service needs, and the daemons started
from the units' own ExecStart lines tell systemd (Type=notify) when they serve
and when they begin to stop."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from edgefleet import systemd
from edgefleet.local.processes import free_port, health_status
from node_agent.config import NodeConfig

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
NAMES = ("edgefleet-node.service", "edgefleet-coordinator.service", "edgefleet-etcd.service")
VENV = "/opt/edgefleet/venv"


def unit(name: str) -> dict[str, list[str]]:
    """``Section.Key -> [values]`` of a unit file (keys may repeat)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def one(settings: dict[str, list[str]], key: str) -> str:
    assert key in settings, f"{key} missing"
    return settings[key][-1]


def seconds(value: str) -> float:
    value = value.strip()
    for suffix, factor in (("min", 60), ("ms", 0.001), ("s", 1)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def test_systemd_accepts_the_units(tmp_path):
    """`systemd-analyze verify` on the units as installed, in a scratch root
    holding the executables their ExecStart lines name (stand-ins) and the
    system's own units: any complaint, even a warning, fails."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    system_units = Path("/usr/lib/systemd/system")
    if not (system_units / "sysinit.target").exists():
        pytest.skip(f"no systemd unit directory at {system_units} to verify against")
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    installed = root / "etc/systemd/system"
    installed.mkdir(parents=True)
    for name in NAMES:
        shutil.copy(UNITS / name, installed / name)
        executable = root / shlex.split(one(unit(name), "Service.ExecStart"))[0].lstrip("/")
        executable.parent.mkdir(parents=True, exist_ok=True)
        executable.write_text("#!/bin/sh\n")
        executable.chmod(0o755)
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", *NAMES],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("name", NAMES)
def test_each_unit_restarts_notifies_and_is_hardened(name):
    settings = unit(name)
    assert one(settings, "Service.Type") == "notify"
    assert one(settings, "Service.Restart") == "on-failure"
    assert one(settings, "Service.User") == "edgefleet"
    assert one(settings, "Service.KillSignal") == "SIGTERM"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictSUIDSGID": "yes",
    }.items():
        assert one(settings, f"Service.{key}") == value, key
    writable = " ".join(settings["Service.ReadWritePaths"]).split()
    assert writable and all(path.startswith("/var/") for path in writable)
    assert one(settings, "Install.WantedBy") == "multi-user.target"


def test_the_daemons_run_from_the_venv_with_their_config_files():
    node = unit("edgefleet-node.service")
    coordinator = unit("edgefleet-coordinator.service")
    assert one(node, "Service.ExecStart") == (
        f"{VENV}/bin/edgefleet node --config /etc/edgefleet/node.yaml"
    )
    assert one(coordinator, "Service.ExecStart") == (
        f"{VENV}/bin/edgefleet coordinator --config /etc/edgefleet/coordinator.yaml"
    )
    assert one(unit("edgefleet-etcd.service"), "Service.ExecStart") == f"{VENV}/bin/etcd"
    writable = " ".join(node["Service.ReadWritePaths"]).split()
    assert "/var/lib/edgefleet/node" in writable  # its identity
    assert "/var/lib/edgefleet/models" in writable  # its model store
    environment = dict(e.split("=", 1) for e in node["Service.Environment"])
    assert environment["EDGEFLEET_MODEL_DIR"] == "/var/lib/edgefleet/models"
    assert environment["XDG_STATE_HOME"] == "/var/lib"  # state dir /var/lib/edgefleet/node


def test_a_node_gets_time_to_drain_before_systemd_kills_it():
    stop = seconds(one(unit("edgefleet-node.service"), "Service.TimeoutStopSec"))
    assert stop > NodeConfig().shutdown_grace_s + 10


# -- sd_notify against real daemons -------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket like systemd's NOTIFY_SOCKET (a short path: AF_UNIX
    paths are limited to 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="ef-notify-", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(240)  # only so that a daemon that never notifies fails the test
    yield path, sock
    sock.close()
    shutil.rmtree(directory, ignore_errors=True)


def exec_start(name: str, config: Path) -> list[str]:
    """The unit's ExecStart with this checkout's venv and a test config file."""
    argv = shlex.split(one(unit(name), "Service.ExecStart"))
    argv[0] = argv[0].replace(VENV, sys.prefix)
    return [str(config) if a.startswith("/etc/edgefleet/") else a for a in argv]


def start_from_unit(name: str, config: Path, notify_path: str, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            exec_start(name, config),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
            start_new_session=True,
        )


def messages(sock: socket.socket) -> dict[str, str]:
    datagram = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in datagram.splitlines() if "=" in line)


def stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def test_a_node_started_from_its_unit_tells_systemd_when_it_serves(
    tmp_path, notify_socket, default_model_path
):
    path, sock = notify_socket
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "node.yaml"
    config.write_text(f"listen: {address}\nslots: 1\nthreads: 1\ninsecure: true\n")
    node = start_from_unit("edgefleet-node.service", config, path, tmp_path / "node.log")
    try:
        ready = messages(sock)
        assert ready.get("READY") == "1", (ready, (tmp_path / "node.log").read_text())
        assert address in ready.get("STATUS", "")
        # READY=1 means serving: a probe right after it gets SERVING.
        assert health_status(address) == health_pb2.HealthCheckResponse.SERVING
        node.send_signal(signal.SIGTERM)
        assert messages(sock).get("STOPPING") == "1"
        assert node.wait(timeout=60) == 0
    finally:
        stop(node)


def test_a_coordinator_started_from_its_unit_tells_systemd_when_it_serves(
    tmp_path, notify_socket, etcd_cluster
):
    path, sock = notify_socket
    grpc_address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "coordinator.yaml"
    config.write_text(
        f"etcd: {','.join(etcd_cluster.endpoints)}\ngrpc: {grpc_address}\n"
        f"http: 127.0.0.1:{free_port()}\ninsecure: true\n"
    )
    log = tmp_path / "coordinator.log"
    coordinator = start_from_unit("edgefleet-coordinator.service", config, path, log)
    try:
        ready = messages(sock)
        assert ready.get("READY") == "1", (ready, log.read_text())
        assert health_status(grpc_address) == health_pb2.HealthCheckResponse.SERVING
        coordinator.send_signal(signal.SIGTERM)
        assert messages(sock).get("STOPPING") == "1"
        assert coordinator.wait(timeout=60) == 0
    finally:
        stop(coordinator)


def test_notify_reaches_an_abstract_socket_and_is_silent_without_systemd(monkeypatch):
    name = f"edgefleet-test-{os.getpid()}-{free_port()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready("serving")
        assert messages(sock) == {"READY": "1", "STATUS": "serving"}
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert systemd.ready() is False


def test_the_sysusers_file_creates_the_units_user(tmp_path):
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed (Debian: apt-get install systemd)")
    (tmp_path / "etc").mkdir()
    target = tmp_path / "usr/lib/sysusers.d"
    target.mkdir(parents=True)
    shutil.copy(UNITS / "edgefleet.sysusers.conf", target / "edgefleet.conf")
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    users = {
        line.split(":")[0]: line for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    assert "edgefleet" in users
    assert users["edgefleet"].endswith(":/var/lib/edgefleet:/usr/sbin/nologin")
