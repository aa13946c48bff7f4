"""The README's main job and the operator commands, end to end through the CLI."""

from __future__ import annotations

import json
import os
import subprocess

from edgefleet.local.processes import edgefleet_command, free_port


def run_cli(*args, env=None, timeout=300):
    return subprocess.run(
        edgefleet_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_up_brings_a_fleet_up_chats_through_it_and_stops_it(default_model_path):
    grpc_address = f"127.0.0.1:{free_port()}"
    result = run_cli(
        "up",
        "--nodes",
        "2",
        "--grpc",
        grpc_address,
        "--http",
        f"127.0.0.1:{free_port()}",
        "--chat",
        "Name a fruit.",
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "fleet ready in" in out
    assert "node-1" in out and "node-2" in out and f"grpc {grpc_address}" in out
    reply = out.split("> Name a fruit.", 1)[1].split("[served by", 1)[0]
    assert reply.strip(), out
    assert "[served by node-" in out and "reply " in out
    assert out.rstrip().endswith("fleet stopped")


def test_status_chat_and_drain_commands(fleet_factory):
    coordinator = fleet_factory.coordinator()
    fleet_factory.node("n1")
    fleet_factory.wait_ready_nodes(1)
    env = {"EDGEFLEET_COORDINATOR": coordinator.address}

    table = run_cli("status", env=env)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:4] == ["NODE", "ADDRESS", "PID", "STATE"]
    assert row.split()[:4] == [
        "n1",
        fleet_factory.nodes.started[0].address,
        str(fleet_factory.nodes.started[0].pid),
        "ready",
    ]
    as_json = json.loads(run_cli("status", "--json", env=env).stdout)
    assert as_json["nodes"][0]["nodeId"] == "n1"

    first = run_cli("chat", "--max-tokens", "8", "Hello!", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip()
    session = first.stderr.split("--session ", 1)[1].split("]", 1)[0]
    second = run_cli("chat", "--session", session, "--max-tokens", "8", "Again!", env=env)
    assert second.returncode == 0, second.stderr

    assert run_cli("drain", "n1", env=env).stdout.strip() == "n1: draining"
    assert "draining" in run_cli("status", env=env).stdout
    refused = run_cli("chat", "--max-tokens", "8", "Anyone?", env=env)
    assert refused.returncode == 1 and "no ready node serves" in refused.stderr
    assert run_cli("drain", "n1", "--undo", env=env).returncode == 0
    unknown = run_cli("drain", "ghost", env=env)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_client_commands_explain_an_unreachable_coordinator():
    result = run_cli("status", "--coordinator", f"127.0.0.1:{free_port()}", timeout=60)
    assert result.returncode == 1
    assert "no coordinator answered" in result.stderr


def test_status_says_which_variant_each_node_got_and_where_its_layers_run():
    from edgefleet.cli.fleet import model_text
    from edgefleet.v1 import common_pb2

    def text(gpu_layers: int) -> str:
        return model_text(
            common_pb2.LoadedModel(alias="qwen", quantization="Q8_0", gpu_layers=gpu_layers)
        )

    assert text(0) == "qwen:Q8_0"
    assert text(-1) == "qwen:Q8_0/gpu"
    assert text(12) == "qwen:Q8_0/gpu12"


def test_a_simulated_node_says_so_in_capacity_and_status(fleet_factory):
    coordinator = fleet_factory.coordinator()
    fleet_factory.node("real-1")
    fleet_factory.node("sim-1", extra_args=("--runtime", "simulated", "--sim-tokens-per-s", "200"))
    fleet_factory.wait_ready_nodes(2)
    env = {"EDGEFLEET_COORDINATOR": coordinator.address}

    rows = {
        line.split()[0]: line
        for line in run_cli("status", env=env).stdout.splitlines()[1:]
        if line.strip()
    }
    assert "SIMULATED" in rows["sim-1"]
    assert "SIMULATED" not in rows["real-1"]
    nodes = {
        n["nodeId"]: n for n in json.loads(run_cli("status", "--json", env=env).stdout)["nodes"]
    }
    assert nodes["sim-1"]["capacity"]["simulated"] is True
    assert nodes["real-1"]["capacity"]["simulated"] is False
    assert nodes["sim-1"]["capacity"]["models"][0]["runtime"] == "simulated"
    # Straight from the node too.
    from edgefleet.v1 import node_pb2
    from tests.helpers import node_stub

    channel, stub = node_stub(fleet_factory.nodes.started[1].address)
    with channel:
        assert stub.GetCapacity(node_pb2.GetCapacityRequest()).simulated
