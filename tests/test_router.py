"""The router's failover decisions against scripted nodes: no processes, milliseconds.

Each fake node answers Generate from a script; the real FleetView and Router
decide what the client sees.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from coordinator.etcd import KeyValue
from coordinator.fleet import FleetView
from coordinator.keys import Keys
from coordinator.placement import Placement, Ranking
from coordinator.router import Router
from edgefleet.errors import EdgefleetError, Reason, error_of, trailers_of
from edgefleet.v1 import common_pb2, coordinator_pb2, node_pb2

MODEL = "m"


class NodeError(grpc.aio.AioRpcError):
    def __init__(self, error: EdgefleetError) -> None:
        super().__init__(
            error.code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*trailers_of(error)),
            details=error.message,
        )


class Call:
    """One Generate call: admission chunk, then ``texts``, then ``end``
    (an error: the node died; None: the reply finished)."""

    def __init__(self, node_id: str, texts: list[str], end: Exception | None) -> None:
        chunks = [node_pb2.GenerateChunk(seq=0, node_id=node_id)]
        for i, text in enumerate(texts, 1):
            chunks.append(node_pb2.GenerateChunk(seq=i, text=text, token_count=1, node_id=node_id))
        if end is None:
            chunks.append(
                node_pb2.GenerateChunk(
                    seq=len(chunks), node_id=node_id, finish_reason=common_pb2.FINISH_REASON_STOP
                )
            )
        self._chunks, self._end = chunks, end

    async def initial_metadata(self):
        return grpc.aio.Metadata()

    async def read(self):
        await asyncio.sleep(0)
        if self._chunks:
            return self._chunks.pop(0)
        if self._end is not None:
            raise self._end
        return grpc.aio.EOF

    def cancel(self) -> bool:
        return True


class Refused(Call):
    def __init__(self, error: EdgefleetError) -> None:
        super().__init__("", [], NodeError(error))
        self._chunks = []


class ScriptedNodes:
    """NodeChannels' stand-in: each node answers its calls from a list, in order."""

    def __init__(self, scripts: dict[str, list[Call]]) -> None:
        self.scripts = scripts
        self.requests: list[tuple[str, node_pb2.GenerateRequest]] = []

    def stub(self, address: str, node_id: str):
        nodes = self

        class Stub:
            def Generate(self, request, metadata=None):
                nodes.requests.append((node_id, request))
                return nodes.scripts[node_id].pop(0)

        return Stub()


def fleet_of(*node_ids: str) -> FleetView:
    keys = Keys("/t/")
    fleet = FleetView(None, keys, origin="me")
    for revision, node_id in enumerate(node_ids, 1):
        report(fleet, node_id, revision)
    return fleet


def report(fleet: FleetView, node_id: str, revision: int, heartbeat_at: float = 0.0) -> None:
    record = coordinator_pb2.NodeStatus(
        node_id=node_id,
        address=f"{node_id}:1",
        state=common_pb2.NODE_STATE_READY,
        heartbeat_at=heartbeat_at,
    )
    record.models.append(MODEL)
    record.capacity.models.add(alias=MODEL, slots_total=1, slots_free=1, queue_limit=1)
    kv = KeyValue(Keys("/t/").node(node_id), record.SerializeToString(), 1, revision, 7)
    fleet._apply_node(kv, deleted=False)


async def read_all(router: Router, first_node: str) -> tuple[str, list[str]]:
    request = node_pb2.GenerateRequest(request_id="r", model=MODEL)
    request.sampling.max_tokens = 50
    request.messages.add(role="user", content="hi")
    ranking = Ranking(policy="scored", order=(first_node,), scores={first_node: 1}, saturated=())
    text, nodes = "", []
    async for chunk in router.generate(request, ranking):
        text += chunk.text
        if chunk.text:
            nodes.append(chunk.node_id)
    return text, nodes


def transport_failure() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="gone"
    )


def test_a_continued_reply_waits_while_the_survivor_refuses_it_for_now():
    """The survivor is full (QUEUE_FULL) for its first two tries: the client's
    stream waits for it instead of failing mid-reply."""
    full = error_of(Reason.QUEUE_FULL, "full")
    nodes = ScriptedNodes(
        {
            "a": [Call("a", ["Once", " upon"], transport_failure())],
            "b": [Refused(full), Refused(full), Call("b", [" a", " time"], None)],
        }
    )
    router = Router(fleet_of("a", "b"), Placement(), nodes, admission_timeout_s=10)
    text, served_by = asyncio.run(read_all(router, "a"))
    assert text == "Once upon a time"
    assert served_by == ["a", "a", "b", "b"]
    assert [node for node, _ in nodes.requests] == ["a", "b", "b", "b"]
    continued = nodes.requests[-1][1]
    assert continued.continuation and continued.assistant_prefix == "Once upon"


def test_a_survivor_that_faulted_is_tried_again_once_it_reports():
    """A fault at admission makes the survivor suspect until its next report;
    the continued reply waits for that report instead of failing."""
    fleet = fleet_of("a", "b")
    nodes = ScriptedNodes(
        {
            "a": [Call("a", ["Once"], transport_failure())],
            "b": [Refused(error_of(Reason.INTERNAL, "boom")), Call("b", [" more"], None)],
        }
    )
    router = Router(fleet, Placement(), nodes, admission_timeout_s=10)

    async def scenario():
        reading = asyncio.create_task(read_all(router, "a"))
        while not fleet.is_suspect("b"):  # noqa: ASYNC110 - the router's doing
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert not reading.done()  # waiting, not failed
        report(fleet, "b", 9, heartbeat_at=4e9)  # b reports again
        return await reading

    text, served_by = asyncio.run(scenario())
    assert text == "Once more" and served_by == ["a", "b"]


def test_with_no_node_left_a_continued_reply_fails_at_once():
    nodes = ScriptedNodes({"a": [Call("a", ["Once"], transport_failure())]})
    router = Router(fleet_of("a"), Placement(), nodes, admission_timeout_s=30)

    async def scenario():
        async with asyncio.timeout(5):  # not the admission timeout
            await read_all(router, "a")

    with pytest.raises(EdgefleetError) as raised:
        asyncio.run(scenario())
    assert raised.value.reason is Reason.FAILOVER_EXHAUSTED


def test_a_continued_reply_gives_up_at_the_admission_timeout():
    full = error_of(Reason.QUEUE_FULL, "full")
    nodes = ScriptedNodes(
        {"a": [Call("a", ["Once"], transport_failure())], "b": [Refused(full)] * 100}
    )
    router = Router(fleet_of("a", "b"), Placement(), nodes, admission_timeout_s=1)
    with pytest.raises(EdgefleetError) as raised:
        asyncio.run(read_all(router, "a"))
    assert raised.value.reason is Reason.FAILOVER_EXHAUSTED
