"""Config files as an operator meets them: `edgefleet node|coordinator --config
FILE` (same keys as the flags; flags > env > file > defaults) and `edgefleet
up --config FLEET_YAML`, against real daemons; every mistake is one clear line
naming the file and the key, and exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgefleet.local.processes import free_port, start_daemon
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fleet.yaml"


def edgefleet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *args],
        capture_output=True,
        text=True,
        env={**environment, **(env or {})},
        timeout=120,  # a hang fails the test instead of blocking the suite
    )


def refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The one error line of a refused config, after checking it says what it should."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr


NODE_MISTAKES = [
    ("slot: 3\n", "unknown key 'slot' (did you mean 'slots'?)"),
    ("slots: three\n", "slots: expected a whole number, got the text 'three'"),
    ("slots: 2.5\n", "slots: expected a whole number, got 2.5"),
    ("shutdown-grace: soon\n", "shutdown-grace: expected a number"),
    ("runtime: vllm\n", "runtime: 'vllm' is not one of llama.cpp, simulated"),
    ("insecure: please\n", "insecure: expected true or false"),
    ("node-id: {a: 1}\n", "node-id: expected a single value, got a mapping"),
    ("listen: [127.0.0.1:1\n", "not valid YAML at line"),
    ("- slots\n", "expected 'key: value' lines at the top level, got a list"),
    ("slots: 3\nslots: 4\n", "key 'slots' appears twice"),
    ("gpu-layers: 1\ngpu_layers: 2\n", "'gpu-layers' and 'gpu_layers' set the same key"),
    ("node-id:\n", "node-id: has no value"),
]


@pytest.mark.parametrize(("text", "message"), NODE_MISTAKES)
def test_a_node_refuses_a_config_file_with_a_mistake(tmp_path, text, message):
    config = tmp_path / "node.yaml"
    config.write_text(text)
    refused(edgefleet("node", "--config", str(config)), f"{config}: ", message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("polcy: round_robin\n", "unknown key 'polcy' (did you mean 'policy'?)"),
        ("http: off\n", "http: expected text, got false (YAML reads bare yes/no/on/off"),
        ("etcd: [127.0.0.1:2379, {x: 1}]\n", "etcd[1]: expected a single value"),
        ("api-key: {a: b}\n", "api-key[0]: expected a single value"),
    ],
)
def test_a_coordinator_refuses_a_config_file_with_a_mistake(tmp_path, text, message):
    config = tmp_path / "coordinator.yaml"
    config.write_text(text)
    refused(edgefleet("coordinator", "--config", str(config)), f"{config}: ", message)


def test_a_missing_config_file_is_an_error_when_named(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    refused(edgefleet("node", "--config", str(missing)), f"{missing}: no such file")
    refused(
        edgefleet("coordinator", env={"EDGEFLEET_CONFIG": str(missing)}),
        f"{missing}: no such file (named by $EDGEFLEET_CONFIG)",
    )


def test_help_names_the_config_file():
    result = edgefleet("node", "--help")
    assert result.returncode == 0
    assert "--config PATH" in result.stdout
    assert "/etc/edgefleet/node.yaml" in result.stdout


def test_a_node_takes_the_file_below_env_and_flags(tmp_path, default_model_path):
    """The file sets the listener, id, slots and queue; the environment beats
    the file's queue, a flag beats its slots."""
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "node.yaml"
    config.write_text(
        f"listen: {address}\n"
        "node_id: from-the-file\n"
        "models: [smollm2-135m]\n"
        "slots: 3\n"
        "queue: 5\n"
        "continuation_slots: 0\n"
        "threads: 1\n"
        "insecure: true\n"
    )
    node = start_daemon(
        ["node", "--config", str(config), "--slots", "2"],
        address=address,
        name="node",
        log_path=tmp_path / "node.log",
        env={"EDGEFLEET_NODE_QUEUE": "7"},
    )
    try:
        node.wait_serving(timeout_s=180)
        capacity = json.loads(edgefleet("capacity", "--node", address).stdout)
        assert capacity["slotsTotal"] == 2  # the flag, not the file's 3
        assert capacity["queueLimit"] == 7  # the environment, not the file's 5
        ready = [line for line in node.log_path.read_text().splitlines() if "node ready" in line]
        assert f"id=from-the-file address={address}" in ready[0]  # the file, not the default
    finally:
        assert node.terminate() == 0


def test_a_coordinator_reads_the_file_named_by_the_environment(tmp_path, etcd_cluster):
    grpc_address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "coordinator.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "etcd": etcd_cluster.endpoints,  # a list is the comma-separated flag
                "grpc": grpc_address,
                "http": f"127.0.0.1:{free_port()}",
                "policy": "round_robin",
                "insecure": True,
            }
        )
    )
    coordinator = start_daemon(
        ["coordinator"],
        address=grpc_address,
        name="coordinator",
        log_path=tmp_path / "coordinator.log",
        env={"EDGEFLEET_CONFIG": str(config)},
    )
    try:
        coordinator.wait_serving(timeout_s=60)
        status = edgefleet("status", "--json", "--profile", "none", "--coordinator", grpc_address)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["placementPolicy"] == "round_robin"
    finally:
        assert coordinator.terminate() == 0


# -- edgefleet up --config ---------------------------------------------------------


FLEET_MISTAKES = [
    ("nodez: 2\n", "unknown key 'nodez' (did you mean 'nodes'?)"),
    ("nodes:\n  - id: a\n    slot: 2\n", "nodes[1] (a): unknown key 'slot' (did you mean 'slots'"),
    ("nodes:\n  - id: a\n  - id: a\n", "nodes[2]: id: 'a' is used by an earlier node"),
    ("nodes:\n  - id: 'a b'\n", "nodes[1]: id: 1-128 of letters"),
    ("nodes:\n  - join: EF1.x\n", "nodes[1] (node-1): join: set by edgefleet up"),
    ("nodes: 0\n", "nodes: a local fleet has 1 to 64 nodes"),
    ("nodes:\n  - labels: [shop]\n", "labels: expected a mapping"),
    (
        "insecure: true\nnodes:\n  - labels: {site: shop}\n",
        "labels need a secure fleet",
    ),
    ("coordinator:\n  etcd: 10.0.0.1:2379\n", "coordinator: etcd: set by edgefleet up"),
    (
        "coordination:\n  load_balancing: fastest\n",
        "coordination: load_balancing: 'fastest' is not one of scored, least_loaded, round_robin",
    ),
    (
        "coordination:\n  failover:\n    stall_timeout: soon\n",
        "coordination.failover: stall_timeout: expected a number",
    ),
    (
        "coordination:\n  failover:\n    retries: 2\n",
        "coordination.failover: unknown key 'retries'",
    ),
    (
        "coordination:\n  failover:\n    enabled: false\n    max_failovers: 2\n",
        "enabled is false but max_failovers is not 0",
    ),
]


@pytest.mark.parametrize(("text", "message"), FLEET_MISTAKES)
def test_up_refuses_a_fleet_file_with_a_mistake_before_starting_anything(tmp_path, text, message):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(text)
    result = edgefleet("up", "--config", str(fleet))
    refused(result, f"{fleet}: ", message)
    assert "starting etcd" not in result.stdout


def test_up_refuses_a_node_count_beside_a_fleet_file():
    refused(edgefleet("up", "--config", str(EXAMPLE), "--nodes", "3"), "both say how many nodes")


def test_up_runs_the_example_fleet_file(tmp_path, default_model_path):
    """The example's shape, with round-robin balancing: the nodes come up with
    their ids, labels and settings, and the coordinator with its policy."""
    fleet_file = tmp_path / "fleet.yaml"
    fleet = yaml.safe_load(EXAMPLE.read_text())
    fleet["coordination"]["load_balancing"] = "round_robin"
    for node in fleet["nodes"]:
        node["threads"] = 1
    fleet_file.write_text(yaml.safe_dump(fleet))
    grpc_address = f"127.0.0.1:{free_port()}"
    output = tmp_path / "up.out"
    with output.open("wb") as out:
        up = subprocess.Popen(
            [
                *(sys.executable, "-m", "edgefleet", "up", "--config", str(fleet_file)),
                *("--grpc", grpc_address, "--http", f"127.0.0.1:{free_port()}"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: "fleet ready" in output.read_text() or up.poll() is not None,
            timeout_s=300,
            what="edgefleet up to print 'fleet ready'",
        )
        printed = output.read_text()
        assert "fleet ready" in printed, printed
        assert "shop-1" in printed and "room=front,site=shop" in printed
        status = edgefleet("status", "--json", "--coordinator", grpc_address)
        assert status.returncode == 0, status.stderr
        fleet_status = json.loads(status.stdout)
        assert fleet_status["placementPolicy"] == "round_robin"
        nodes = {n["nodeId"]: n for n in fleet_status["nodes"]}
        assert set(nodes) == {"shop-1", "clinic-1"}
        assert nodes["shop-1"]["labels"] == {"site": "shop", "room": "front"}
        assert nodes["clinic-1"]["labels"] == {"site": "clinic"}
        assert nodes["clinic-1"]["capacity"]["queueLimit"] == 8  # a per-node key
        assert nodes["shop-1"]["capacity"]["slotsTotal"] == 2
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=120) == 0
    assert "fleet stopped" in output.read_text()
