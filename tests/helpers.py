"""Small helpers shared by the tests: gRPC calls against real daemons."""

from __future__ import annotations

import time

import grpc

from edgefleet.v1 import common_pb2, node_pb2, node_pb2_grpc


def node_stub(address: str) -> tuple[grpc.Channel, node_pb2_grpc.NodeServiceStub]:
    channel = grpc.insecure_channel(address)
    return channel, node_pb2_grpc.NodeServiceStub(channel)


def chat_request(
    prompt: str = "Name three colours.",
    *,
    model: str = "smollm2-135m",
    system: str | None = None,
    **sampling,
) -> node_pb2.GenerateRequest:
    messages = []
    if system is not None:
        messages.append(common_pb2.ChatMessage(role="system", content=system))
    messages.append(common_pb2.ChatMessage(role="user", content=prompt))
    return node_pb2.GenerateRequest(
        model=model, messages=messages, sampling=common_pb2.SamplingParams(**sampling)
    )


def collect(stream) -> tuple[str, list[node_pb2.GenerateChunk]]:
    chunks = list(stream)
    return "".join(chunk.text for chunk in chunks), chunks


def rpc_error(call) -> grpc.RpcError:
    """Run ``call`` (which must fail) and return its gRPC error."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)
    except grpc.RpcError as error:
        return error
    raise AssertionError("expected the call to fail with a gRPC error")


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = ""):
    """Poll until ``predicate()`` is truthy (bounded: a test never hangs)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
