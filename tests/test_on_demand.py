"""Models on demand: a model no ready node serves is loaded on the best node
that can hold it, while the request waits; concurrent requests share one load.

The choice of node is pure (table-driven below); the rest runs against a real
fleet: nodes started with smollm2-135m only serve gemma3-270m requests over
gRPC and HTTP by loading it on one node.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from coordinator import model_loads
from coordinator.membership import placement_signature
from coordinator.model_loads import LoadCandidate, load_order, no_room_error
from coordinator.node_limits import MAX_MODELS, MAX_TEXT_CHARS, trim_capacity
from edgefleet.catalog import CATALOG
from edgefleet.errors import Reason
from edgefleet.local.otlp_receiver import OtlpReceiver
from edgefleet.model_store import ModelStore
from edgefleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc
from tests.helpers import wait_until
from tests.test_observability import TRACE_ID, scrape, value

GiB = 1 << 30
MiB = 1 << 20
GEMMA = "gemma3-270m"


# --- choosing the node (pure) -----------------------------------------------------------
def cand(node_id, *, cached=True, free=4 * GiB, needed=300 * MiB, busy=0) -> LoadCandidate:
    return LoadCandidate(node_id, cached, free, needed, busy)


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        # A cached file beats more memory: no transfer before the load.
        ([cand("a", cached=False, free=8 * GiB), cand("b", free=2 * GiB)], ["b", "a"]),
        # Among cached, the most memory available.
        ([cand("a", free=2 * GiB), cand("b", free=6 * GiB)], ["b", "a"]),
        # Memory within one step (nodes sharing a host) compares equal: the least busy wins.
        ([cand("a", free=4 * GiB + MiB, busy=3), cand("b", free=4 * GiB, busy=1)], ["b", "a"]),
        # All equal: by id, a stable order.
        ([cand("b"), cand("a")], ["a", "b"]),
        # A node without room for the model is asked last (it may unload idle models).
        ([cand("a", free=100 * MiB), cand("b", cached=False)], ["b", "a"]),
        (
            [cand("a", free=GiB, needed=2 * GiB), cand("b", free=GiB + 512 * MiB, needed=2 * GiB)],
            ["b", "a"],
        ),
    ],
)
def test_load_order(found, expected):
    assert [c.node_id for c in load_order(found)] == expected


def capacity(*, loaded=(), stored=(("smollm2-135m", True), (GEMMA, True)), free=4 * GiB):
    return common_pb2.Capacity(
        models=[
            common_pb2.LoadedModel(alias=a, slots_total=2, slots_free=1, queue_depth=1)
            for a in loaded
        ],
        stored_models=[
            common_pb2.StoredModel(alias=a, size_bytes=250 * MiB, cached=c) for a, c in stored
        ],
        model_memory_available_bytes=free,
    )


class Entry:
    def __init__(self, node_id, cap, ready=True, labels=None, address=""):
        self.node_id = node_id
        self.record = coordinator_pb2.NodeStatus(
            node_id=node_id, capacity=cap, labels=labels or {}, address=address
        )
        self.ready = ready


class Fleet:
    def __init__(self, *entries, pending=None):
        self.nodes = {e.node_id: e for e in entries}
        self._pending = pending or {}

    def is_ready(self, entry):
        return entry.ready

    def pending(self, node_id):
        return self._pending.get(node_id, 0)


def test_candidates_are_ready_nodes_that_can_load_the_model_and_do_not_serve_it():
    fleet = Fleet(
        Entry("has-it", capacity(loaded=["smollm2-135m", GEMMA])),
        Entry("can", capacity(loaded=["smollm2-135m"])),
        Entry("not-ready", capacity(loaded=["smollm2-135m"]), ready=False),
        Entry("cannot", capacity(loaded=["smollm2-135m"], stored=[("smollm2-135m", True)])),
        Entry("excluded", capacity()),
        pending={"can": 2},
    )
    found = model_loads.load_candidates(fleet, GEMMA, exclude={"excluded"})
    assert [c.node_id for c in found] == ["can"]
    # Its running and queued generations, plus what this replica sent since.
    assert found[0].busy == (2 - 1 + 1) + 2
    # No estimate from the node: the file plus the overhead.
    assert found[0].memory_needed == int(250 * MiB * model_loads.FILE_OVERHEAD) + (64 << 20)
    assert model_loads.loadable(fleet, GEMMA)
    assert not model_loads.loadable(fleet, "no-such-model")
    assert not model_loads.loadable(fleet, "")  # found by the gRPC fuzzer
    assert model_loads.loadable_models(fleet) == {"smollm2-135m", GEMMA}


def test_the_nodes_estimate_is_used_when_it_gives_one():
    stored = common_pb2.StoredModel(alias=GEMMA, size_bytes=250 * MiB, memory_estimate_bytes=GiB)
    assert model_loads.memory_needed(stored) == GiB


def test_no_room_names_what_is_needed_and_the_largest_free():
    error = no_room_error(GEMMA, [cand("a", free=100 * MiB), cand("b", free=200 * MiB)])
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs about 300 MiB" in error.message
    assert "largest free" in error.message and "200 MiB" in error.message
    assert no_room_error(GEMMA, []).reason is Reason.UNKNOWN_MODEL


def test_stored_models_are_trimmed_and_rewrite_the_record_when_they_change():
    cap = capacity(stored=[("", True), (" ", True)] + [("x" * 500, True)] * (MAX_MODELS + 5))
    trim_capacity(cap)
    assert len(cap.stored_models) == MAX_MODELS  # blank names dropped first
    assert all(len(s.alias) == MAX_TEXT_CHARS for s in cap.stored_models)
    ready = common_pb2.NODE_STATE_READY
    before = placement_signature(capacity(), ready)
    assert placement_signature(capacity(free=GiB), ready) == before  # memory: no rewrite
    assert placement_signature(capacity(stored=[(GEMMA, False)]), ready) != before


# --- one load per model (the use case, with a stand-in node) ------------------------------
class LoadingNode:
    """Answers LoadModel after a moment, or refuses with a reason."""

    def __init__(self, refuse: Reason | None = None) -> None:
        self.calls = 0
        self.refuse = refuse

    async def LoadModel(self, request, **call_options):  # timeout, metadata
        self.calls += 1
        await asyncio.sleep(0.05)
        if self.refuse is not None:
            raise Refused(self.refuse)
        return common_pb2.LoadedModel(alias=request.model)


class Refused(grpc.RpcError):
    def __init__(self, reason: Reason) -> None:
        self.reason = reason

    def code(self):
        return self.reason.code

    def details(self):
        return "refused"

    def trailing_metadata(self):
        return (("edgefleet-reason", self.reason.name),)


class Channels:
    def __init__(self, nodes) -> None:
        self.nodes = nodes

    def stub(self, address, node_id):
        return self.nodes[node_id]


def fleet_of(**nodes):
    entries = []
    for node_id in nodes:
        entry = Entry(node_id, capacity(loaded=["smollm2-135m"]))
        entry.record.address = f"{node_id}:1"
        entry.record.heartbeat_at = 0.0
        entries.append(entry)
    return Fleet(*entries)


def test_concurrent_requests_share_one_load_and_a_refusing_node_is_skipped():
    async def scenario():
        nodes = {"a": LoadingNode(refuse=Reason.MODEL_LOAD_FAILED), "b": LoadingNode()}
        loads = model_loads.ModelLoads(fleet_of(**nodes), Channels(nodes))
        waits = await asyncio.gather(*(loads.ensure(GEMMA) for _ in range(5)))
        assert {w.node_id for w in waits} == {"b"}
        assert [w.shared for w in waits] == [False, True, True, True, True]
        assert (nodes["a"].calls, nodes["b"].calls) == (1, 1)
        assert loads.fresh_node(GEMMA) == "b"  # until the fleet view shows it there
        # "a" refused: it is left alone for a while; with "b" refusing too, a clear error.
        nodes["b"].refuse = Reason.MODEL_LOAD_FAILED
        loads._fresh.clear()
        with pytest.raises(Exception) as raised:
            await loads.ensure(GEMMA)
        assert raised.value.reason is Reason.MODEL_LOAD_FAILED
        assert "b: MODEL_LOAD_FAILED" in raised.value.message
        assert nodes["a"].calls == 1
        # Within the minute, no node is asked again: the last reason, at once.
        with pytest.raises(Exception) as again:
            await loads.ensure(GEMMA)
        assert again.value.reason is Reason.MODEL_LOAD_FAILED
        assert "refused it in the last 60s" in again.value.message
        assert (nodes["a"].calls, nodes["b"].calls) == (1, 2)

    asyncio.run(scenario())


def test_when_every_node_is_too_small_the_answer_names_needed_and_largest_free():
    too_big = Reason.parse("MODEL_TOO_BIG")
    if too_big is None:
        pytest.skip("this build declares no MODEL_TOO_BIG reason")

    async def scenario():
        nodes = {"a": LoadingNode(refuse=too_big), "b": LoadingNode(refuse=too_big)}
        loads = model_loads.ModelLoads(fleet_of(**nodes), Channels(nodes))
        with pytest.raises(Exception) as raised:
            await loads.ensure(GEMMA)
        error = raised.value
        assert error.reason is too_big and error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "needs about" in error.message and "largest free" in error.message
        assert (nodes["a"].calls, nodes["b"].calls) == (1, 1)

    asyncio.run(scenario())


# --- a real fleet -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma_cached():
    ModelStore().pull(CATALOG[GEMMA], progress=False)


def loaded_on(client, model: str) -> list[str]:
    return sorted(
        n.node_id for n in client.status().nodes if any(m.alias == model for m in n.capacity.models)
    )


def unload(client, node_id: str, model: str) -> None:
    """Unload ``model`` on the node itself and wait until the fleet view shows it gone."""
    address = next(n.address for n in client.status().nodes if n.node_id == node_id)
    with grpc.insecure_channel(address) as channel:
        node_pb2_grpc.NodeServiceStub(channel).UnloadModel(
            node_pb2.UnloadModelRequest(model=model), timeout=30
        )
    wait_until(lambda: not loaded_on(client, model), what=f"{model} gone from the fleet view")


def test_a_model_no_node_serves_is_loaded_on_demand_once(fleet_factory, gemma_cached):
    coordinator = fleet_factory.coordinator()
    fleet_factory.node("n1")  # smollm2-135m only
    fleet_factory.node("n2")
    fleet_factory.wait_ready_nodes(2)
    metrics_url = f"http://{coordinator.extra['http']}/metrics"
    base_url = f"http://{coordinator.extra['http']}/v1"
    with fleet_factory.client() as client:
        assert loaded_on(client, GEMMA) == []
        # Every node reports what it could load, and the memory it has for it.
        for node in client.status().nodes:
            assert {s.alias for s in node.capacity.stored_models} >= set(CATALOG)
            assert all(s.cached for s in node.capacity.stored_models)
            assert 0 < node.capacity.model_memory_available_bytes
            assert node.capacity.model_memory_available_bytes <= node.capacity.memory_total_bytes
        # The node's estimate from the GGUF headers follows (read off its event loop).
        wait_until(
            lambda: all(
                s.memory_estimate_bytes > 0
                for n in client.status().nodes
                for s in n.capacity.stored_models
            ),
            what="memory estimates in the nodes' reports",
        )

        # gRPC: two concurrent requests, one load.
        def ask(_):
            started = time.perf_counter()
            chunks = list(client.complete(GEMMA, [("user", "Hi")], max_tokens=4))
            return chunks, time.perf_counter() - started

        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(ask, range(2)))
        for chunks, _ in replies:
            assert chunks[-1].finish_reason
            assert chunks[-1].usage.completion_tokens >= 1
        holders = loaded_on(client, GEMMA)
        assert len(holders) == 1
        assert {chunks[-1].node_id for chunks, _ in replies} == set(holders)
        samples = scrape(metrics_url)
        assert value(samples, "edgefleet_model_loads_total", model=GEMMA, outcome="loaded") == 1
        print(f"cold on-demand load, gRPC, file cached: {max(s for _, s in replies):.2f}s")

        # HTTP, streaming: no error, only a later first token; the wait in a header.
        unload(client, holders[0], GEMMA)
        started = time.perf_counter()
        first_token_s = None
        body = {
            "model": GEMMA,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "stream": True,
        }
        with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            assert float(r.headers["x-edgefleet-model-load-ms"]) > 0
            events = []
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    assert "error" not in event
                    events.append(event)
                    if first_token_s is None and event["choices"][0]["delta"].get("content"):
                        first_token_s = time.perf_counter() - started
        assert events[-1]["choices"][0]["finish_reason"]
        print(f"cold on-demand load, HTTP stream, file cached: first token {first_token_s}s")

        # HTTP, non-streaming.
        unload(client, loaded_on(client, GEMMA)[0], GEMMA)
        body["stream"] = False
        reply = httpx.post(f"{base_url}/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert float(reply.headers["x-edgefleet-model-load-ms"]) > 0
        assert reply.json()["choices"][0]["message"]["content"] is not None
        # Served where it is loaded now: no wait, no header.
        again = httpx.post(f"{base_url}/chat/completions", json=body, timeout=120)
        assert again.status_code == 200
        assert "x-edgefleet-model-load-ms" not in again.headers
        samples = scrape(metrics_url)
        assert value(samples, "edgefleet_model_loads_total", model=GEMMA, outcome="loaded") == 3
        assert len(loaded_on(client, GEMMA)) == 1

        # A name that is neither loaded anywhere nor loadable: 404, as before.
        missing = httpx.post(
            f"{base_url}/chat/completions", json={**body, "model": "no-such-model"}, timeout=30
        )
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"
        assert "no-such-model" in missing.json()["error"]["message"]


def test_a_node_that_cannot_load_it_is_skipped_and_the_load_is_in_the_trace(
    fleet_factory, gemma_cached, tmp_path
):
    """Node "a-bad" has a corrupt gemma3-270m file in its store: it is asked
    first (same memory and load, first by id), refuses, and "b-good" loads it."""
    store = tmp_path / "bad-store"
    for alias, entry in CATALOG.items():
        (store / alias).mkdir(parents=True)
        target = store / alias / entry.file_name
        if alias == GEMMA:
            target.write_bytes(b"GGUF" + b"\0" * 1024)
        else:
            target.symlink_to(ModelStore().path_of(entry))
    receiver = OtlpReceiver().start()
    try:
        env = receiver.exporter_env()
        coordinator = fleet_factory.coordinator(env=env)
        fleet_factory.node("a-bad", env={**env, "EDGEFLEET_MODEL_DIR": str(store)})
        fleet_factory.node("b-good", env=env)
        fleet_factory.wait_ready_nodes(2)
        with grpc.insecure_channel(coordinator.address) as channel:
            chunks = list(
                coordinator_pb2_grpc.CoordinatorServiceStub(channel).Complete(
                    coordinator_pb2.CompleteRequest(
                        model=GEMMA,
                        messages=[common_pb2.ChatMessage(role="user", content="Hi")],
                        sampling=common_pb2.SamplingParams(max_tokens=4),
                    ),
                    metadata=(("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),),
                )
            )
        assert chunks[-1].finish_reason and chunks[-1].node_id == "b-good"
        samples = scrape(f"http://{coordinator.extra['http']}/metrics")
        assert value(samples, "edgefleet_model_loads_total", model=GEMMA, outcome="refused") == 1
        assert value(samples, "edgefleet_model_loads_total", model=GEMMA, outcome="loaded") == 1
        spans = receiver.wait_for(
            lambda all_spans: (
                (found := [s for s in all_spans if s.trace_id == TRACE_ID])
                and any(s.name == "model_load" for s in found)
                and any(s.parent_id == "00f067aa0ba902b7" for s in found)
                and found
            ),
        )
        [root] = [s for s in spans if s.parent_id == "00f067aa0ba902b7"]
        [load] = [s for s in spans if s.name == "model_load"]
        assert load.parent_id == root.span_id
        assert load.attributes["edgefleet.node.id"] == "b-good"
        assert load.attributes["edgefleet.model_load.cached"] is True
        [(_, refused)] = [e for e in load.events if e[0] == "refused"]
        assert refused["edgefleet.node.id"] == "a-bad"
        assert "MODEL_FILE_BAD" in refused["edgefleet.error"]
        [(_, waited)] = [e for e in root.events if e[0] == "model_load"]
        assert waited["edgefleet.node.id"] == "b-good"
        assert waited["edgefleet.model_load.wait_ms"] > 0
    finally:
        receiver.stop()


def test_a_node_fetches_from_peers_that_hold_the_file_same_site_first():
    from coordinator.model_loads import peers_for

    holds = capacity(stored=((GEMMA, True),))
    fleet = Fleet(
        Entry("loader", capacity(stored=((GEMMA, False),)), labels={"site": "shop"}),
        Entry("far", holds, labels={"site": "clinic"}, address="10.0.0.2:1"),
        Entry("near", holds, labels={"site": "shop"}, address="10.0.0.3:1"),
        Entry("serving", capacity(loaded=[GEMMA], stored=()), address="10.0.0.4:1"),
        Entry("lacks", capacity(stored=((GEMMA, False),))),
        Entry("down", holds, ready=False),
    )
    peers = peers_for(fleet, GEMMA, "loader")
    assert [(p.node_id, p.address) for p in peers] == [
        ("near", "10.0.0.3:1"),
        ("far", "10.0.0.2:1"),
        ("serving", "10.0.0.4:1"),
    ]
