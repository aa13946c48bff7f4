"""The container images, built and run with podman (``make containers``).

Builds the node and coordinator images (deploy/container/Containerfile) on a
base made here from Debian packages (no image registry is reachable on the
developers' machines), then runs etcd, one coordinator and two nodes as
containers on the host network: the nodes join with a token, serve a chat,
and a node container killed mid-stream (``podman kill``, SIGKILL) leaves the
client's stream whole. Slow (the first build takes minutes), so it runs only
when asked for: ``make containers``, ``pytest -m containers``, or
EDGEFLEET_CONTAINER_TESTS=1; it skips with the reason when podman cannot run.

Environment: BASE_IMAGE (default: build localhost/edgefleet-base:bookworm
with deploy/container/build-base.sh), CONTAINERS_CONF (default:
deploy/container/containers.conf, the sandbox's podman settings),
EDGEFLEET_SKIP_IMAGE_BUILD=1 (use the images already built).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.client import FleetClient
from edgefleet.local.processes import free_port
from edgefleet.profile import Profile
from edgefleet.v1.common_pb2 import NODE_STATE_READY as READY
from tests.helpers import wait_until
from tests.test_chaos import LONG, Reader

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
VERSION = "latest"
NODE_IMAGE = f"edgefleet-node:{VERSION}"
COORDINATOR_IMAGE = f"edgefleet-coordinator:{VERSION}"
LOCAL_BASE = "localhost/edgefleet-base:bookworm"
STATE = "/var/lib/edgefleet/state"
MODELS = "/var/lib/edgefleet/models"
UID = 10001  # the images' user


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(ROOT / "deploy/container/containers.conf"))
    return env


def podman_problem() -> str | None:
    if not shutil.which("podman"):
        return "podman is not installed (apt-get install podman runc)"
    conf = podman_env()["CONTAINERS_CONF"]
    if "runc" in Path(conf).read_text(errors="replace") and not shutil.which("runc"):
        return f"{conf} asks for runc, which is not installed (apt-get install runc)"
    info = subprocess.run(
        ["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
        env=podman_env(),
        capture_output=True,
        text=True,
    )
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip()[-300:]}"
    if not os.environ.get("BASE_IMAGE") and os.geteuid() != 0:
        return "building the local base image (debootstrap) needs root; or set BASE_IMAGE"
    return None


@pytest.fixture(scope="module", autouse=True)
def asked_for(request) -> None:
    """Only on request: the first image build takes minutes."""
    markexpr = request.config.getoption("markexpr", "") or ""
    if "containers" not in markexpr and os.environ.get("EDGEFLEET_CONTAINER_TESTS") != "1":
        pytest.skip("container tests build images (minutes): run `make containers`")
    problem = podman_problem()
    if problem:
        pytest.skip(problem)


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return done


@pytest.fixture(scope="module")
def images() -> None:
    """Both images, built from this working tree."""
    if os.environ.get("EDGEFLEET_SKIP_IMAGE_BUILD") == "1":
        return
    env = podman_env()
    if not env.get("BASE_IMAGE"):
        subprocess.run([str(ROOT / "deploy/container/build-base.sh")], env=env, check=True)
        env["BASE_IMAGE"] = LOCAL_BASE
    env.setdefault("OFFLINE", "1")  # nothing fetched inside the build
    subprocess.run([str(ROOT / "deploy/container/build.sh")], env=env, check=True, cwd=ROOT)


class Containers:
    """Containers of one test, on the host network, removed at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.label = f"edgefleet-test={uuid.uuid4().hex[:12]}"
        self.tmp_path = tmp_path

    def state_dir(self, name: str) -> Path:
        """A host folder for a container's state volume, owned by the images' user."""
        path = self.tmp_path / name
        path.mkdir(mode=0o700)
        os.chown(path, UID, UID)
        return path

    def run(self, name: str, image: str, *args: str, options: tuple[str, ...] = ()) -> str:
        """A container with a read-only root file system, like deploy/k8s runs them."""
        full = f"ef-{self.label[-12:]}-{name}"
        podman(
            "run",
            "-d",
            "--read-only",
            "--name",
            full,
            "--label",
            self.label,
            *options,
            image,
            *args,
        )
        return full

    def logs(self, name: str) -> str:
        done = podman("logs", name, check=False)
        return done.stdout + done.stderr

    def wait_log(self, name: str, line: str, timeout_s: float = 120) -> str:
        def seen() -> bool:
            state = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            assert state == "true", f"{name} exited:\n{self.logs(name)[-3000:]}"
            return line in self.logs(name)

        wait_until(seen, timeout_s=timeout_s, interval_s=0.5, what=f"{name}: {line!r}")
        return self.logs(name)

    def remove_all(self) -> None:
        """Every container of the test and its anonymous volumes (the state
        folders are the test's tmp_path)."""
        problems = []
        for _ in range(3):
            listed = podman("ps", "-a", "-q", "--filter", f"label={self.label}", check=False)
            if not listed.stdout.split():
                return
            for container in listed.stdout.split():
                done = podman("rm", "-f", "-v", "-t", "2", container, check=False)
                if done.returncode != 0:
                    problems.append(done.stderr.strip()[-500:])
        raise AssertionError(f"containers of {self.label} left behind: {problems}")


@pytest.fixture
def containers(images, tmp_path) -> Iterator[Containers]:
    made = Containers(tmp_path)
    yield made
    made.remove_all()


def start_fleet(containers: Containers, default_model_path: Path):
    """etcd, a coordinator and two nodes joined with a token, all containers."""
    etcd_client, etcd_peer = free_port(), free_port()
    etcd_data = containers.state_dir("etcd")
    etcd = containers.run(
        "etcd",
        COORDINATOR_IMAGE,
        "--name=etcd-0",
        "--data-dir=/data/etcd",
        f"--listen-client-urls=http://127.0.0.1:{etcd_client}",
        f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
        f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
        f"--initial-cluster=etcd-0=http://127.0.0.1:{etcd_peer}",
        options=("--entrypoint", "etcd", "-v", f"{etcd_data}:/data"),
    )
    containers.wait_log(etcd, "ready to serve client requests")
    grpc_port = free_port()
    coordinator_state = containers.state_dir("coordinator")
    coordinator = containers.run(
        "coordinator",
        COORDINATOR_IMAGE,
        "coordinator",
        "--id=c1",
        f"--etcd=127.0.0.1:{etcd_client}",
        f"--grpc=127.0.0.1:{grpc_port}",
        "--http=off",
        f"--state-dir={STATE}",
        options=("-v", f"{coordinator_state}:{STATE}"),
    )
    containers.wait_log(coordinator, "edgefleet coordinator ready")
    profile_path = coordinator_state / "admin-profile.json"
    wait_until(profile_path.exists, timeout_s=30, what="the coordinator's admin profile")
    created = podman(
        "exec",
        coordinator,
        "edgefleet",
        "token",
        "create",
        f"--profile={STATE}/admin-profile.json",
        "--uses=2",
        "--approve",
    )
    token = next(line for line in created.stdout.splitlines() if line.startswith("EF1."))
    models = default_model_path.parent.parent  # the host's model store, read-only
    nodes = {}
    for name in ("n1", "n2"):
        state = containers.state_dir(name)
        nodes[name] = (
            containers.run(
                name,
                NODE_IMAGE,
                "node",
                f"--coordinator=127.0.0.1:{grpc_port}",
                f"--listen=127.0.0.1:{free_port()}",
                f"--node-id={name}",
                "--threads=1",
                options=(
                    "-e",
                    f"EDGEFLEET_JOIN_TOKEN={token}",
                    "-v",
                    f"{models}:{MODELS}:ro",
                    "-v",
                    f"{state}:{STATE}",
                ),
            ),
            state,
        )
    for container, _ in nodes.values():
        containers.wait_log(container, "edgefleet node ready")
    profile = Profile.load(profile_path)
    client = FleetClient.from_profile(profile, [f"127.0.0.1:{grpc_port}"])
    wait_for_ready(client, {"n1", "n2"})
    return coordinator, nodes, client, grpc_port


def wait_for_ready(client: FleetClient, expected: set[str]) -> None:
    def ready() -> bool:
        return {n.node_id for n in client.status().nodes if n.state == READY} == expected

    wait_until(ready, timeout_s=60, interval_s=0.2, what=f"nodes {sorted(expected)} ready")


def test_images_run_as_a_non_root_user_with_volumes_and_a_health_check(images):
    for image, target in ((NODE_IMAGE, "node"), (COORDINATOR_IMAGE, "coordinator")):
        config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
        assert config["User"].split(":")[0] == str(UID), image
        assert config["Entrypoint"] == ["edgefleet"], image
        volumes = {MODELS, STATE} if target == "node" else {STATE}
        assert set(config["Volumes"]) == volumes, image
        health = json.loads(podman("image", "inspect", image).stdout)[0]["Healthcheck"]
        assert health["Test"] == ["CMD", "edgefleet-healthcheck", target], image
        version = podman("run", "--rm", image, "--version").stdout
        assert version.startswith("edgefleet "), version
    # The coordinator image carries etcd for compose's members.
    etcd = podman("run", "--rm", "--entrypoint", "etcd", COORDINATOR_IMAGE, "--version")
    assert "etcd Version" in etcd.stdout


def test_node_containers_join_serve_and_a_killed_one_loses_no_stream(
    containers, default_model_path
):
    coordinator, nodes, client, grpc_port = start_fleet(containers, default_model_path)
    with client:
        # The images' HEALTHCHECK (grpc.health.v1 over the daemons' own TLS) says healthy.
        for container in (coordinator, *(c for c, _ in nodes.values())):
            check = podman("healthcheck", "run", container, check=False)
            assert check.returncode == 0, (container, check.stdout, check.stderr)

        session = client.create_session("smollm2-135m")
        reader = Reader(client.chat(session.session_id, LONG, max_tokens=160, temperature=0))
        reader.wait_text()
        victim = reader.nodes()[0]
        podman("kill", nodes[victim][0])  # SIGKILL, like a device losing power
        last = reader.finish()
        survivor = ({"n1", "n2"} - {victim}).pop()
        assert reader.nodes() == [victim, survivor]
        assert last.failovers == 1 and last.usage.completion_tokens == 160
        stored = client.get_session(session.session_id)
        assert [(m.role, m.content) for m in stored.messages] == [
            ("user", LONG),
            ("assistant", reader.text),
        ]
        state = podman("inspect", "--format", "{{.State.Running}}", nodes[victim][0])
        assert state.stdout.strip() == "false"
        wait_for_ready(client, {survivor})

        # A new container on the killed node's state volume rejoins with no token.
        podman("rm", "-f", "-v", nodes[victim][0])
        again = containers.run(
            f"{victim}-again",
            NODE_IMAGE,
            "node",
            f"--coordinator=127.0.0.1:{grpc_port}",
            f"--listen=127.0.0.1:{free_port()}",
            "--threads=1",
            options=(
                "-v",
                f"{default_model_path.parent.parent}:{MODELS}:ro",
                "-v",
                f"{nodes[victim][1]}:{STATE}",
            ),
        )
        containers.wait_log(again, f"edgefleet node ready id={victim}")
        wait_for_ready(client, {"n1", "n2"})
        reply = "".join(c.text for c in client.chat(session.session_id, "Go on.", max_tokens=8))
        assert reply
