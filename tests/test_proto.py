"""The generated stubs in edgefleet/v1 match the .proto files (``make proto``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgefleet.v1 import coordinator_pb2, node_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_match_proto_files(tmp_path):
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto/edgefleet/v1").glob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        cwd=ROOT,
        check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "edgefleet/v1").iterdir())
    committed = sorted(
        p.relative_to(ROOT) for p in (ROOT / "edgefleet/v1").iterdir() if "_pb2" in p.name
    )
    assert generated == committed, "stub files differ from the .proto set: run `make proto`"
    for relative in generated:
        assert (tmp_path / relative).read_text() == (ROOT / relative).read_text(), (
            f"{relative} is stale: run `make proto`"
        )


def test_api_is_versioned_and_complete():
    node = node_pb2.DESCRIPTOR.services_by_name["NodeService"]
    assert node.full_name == "edgefleet.v1.NodeService"
    assert {m.name for m in node.methods} >= {
        "Generate",
        "LoadModel",
        "UnloadModel",
        "ListModels",
        "GetCapacity",
        "Drain",
    }
    coordinator = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"]
    assert {m.name for m in coordinator.methods} >= {
        "Register",
        "Heartbeat",
        "CreateSession",
        "Chat",
        "GetSession",
        "CloseSession",
        "FleetStatus",
    }
    assert coordinator.methods_by_name["Heartbeat"].client_streaming
    assert node.methods_by_name["Generate"].server_streaming
