"""The coordinator with a real etcd process, real node processes, the real model."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from edgefleet.client import FleetClient
from edgefleet.errors import Aborted, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from edgefleet.local.processes import free_port, start_coordinator
from edgefleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from tests.conftest import FleetFactory
from tests.helpers import wait_until

READY = common_pb2.NODE_STATE_READY
DRAINING = common_pb2.NODE_STATE_DRAINING


def chat(client: FleetClient, session_id: str, content: str, **sampling):
    chunks = list(client.chat(session_id, content, **sampling))
    return "".join(c.text for c in chunks), chunks[-1]


# --- membership ---------------------------------------------------------------------------


def test_nodes_register_in_etcd_and_every_replica_sees_them(
    tmp_path, etcd_endpoints, default_model_path
):
    fleet = FleetFactory(tmp_path, etcd_endpoints)
    try:
        # A long lease: a node that disappears quickly left by deregistering.
        a = fleet.coordinator("--node-lease-ttl", "30")
        b = fleet.coordinator("--node-lease-ttl", "30")
        nodes = [fleet.node(f"n{i}", coordinators=[(a, b)[i % 2]]) for i in range(3)]
        assert fleet.wait_ready_nodes(3, a, b) == ["n0", "n1", "n2"]
        with fleet.client(b) as client:
            status = client.status()
        assert status.coordinator_id == "coord-1"
        assert {c.coordinator_id for c in status.coordinators} == {"coord-0", "coord-1"}
        by_id = {n.node_id: n for n in status.nodes}
        assert by_id["n0"].address == nodes[0].address and by_id["n0"].pid == nodes[0].pid
        assert by_id["n0"].models == ["smollm2-135m"]
        assert by_id["n0"].capacity.slots_total == 2 and by_id["n0"].epoch > 0

        # Graceful stop: gone from every replica at once, long before the lease would expire.
        assert nodes[1].terminate() == 0
        assert fleet.wait_ready_nodes(2, a, b, timeout_s=10) == ["n0", "n2"]
    finally:
        fleet.stop_all()


def test_killed_node_leaves_the_fleet_within_its_lease_ttl(fleet_factory):
    coordinator = fleet_factory.coordinator("--node-lease-ttl", "2")
    fleet_factory.node("alive")
    doomed = fleet_factory.node("doomed")
    fleet_factory.wait_ready_nodes(2)
    doomed.kill()  # kill -9: no goodbye
    assert fleet_factory.wait_ready_nodes(1, timeout_s=15) == ["alive"]
    with fleet_factory.client(coordinator) as client:
        assert [n.node_id for n in client.status().nodes] == ["alive"]


# --- sessions -----------------------------------------------------------------------------


def test_multi_turn_session_keeps_history_across_replicas(fleet_factory):
    a = fleet_factory.coordinator()
    b = fleet_factory.coordinator()
    fleet_factory.node("n1", coordinators=[a])
    fleet_factory.wait_ready_nodes(1, a, b)
    with fleet_factory.client(a) as on_a, fleet_factory.client(b) as on_b:
        session = on_a.create_session("smollm2-135m", system_prompt="You are terse.")
        first, end1 = chat(on_a, session.session_id, "My name is Ada.", max_tokens=16)
        second, end2 = chat(on_b, session.session_id, "What is my name?", max_tokens=16)
        stored = on_b.get_session(session.session_id)
    assert first and second
    assert [(m.role, m.content) for m in stored.messages] == [
        ("system", "You are terse."),
        ("user", "My name is Ada."),
        ("assistant", first),
        ("user", "What is my name?"),
        ("assistant", second),
    ]
    assert stored.turns == 2 and stored.node_id == "n1"
    # Turn 2 was generated from the whole history (the model saw turn 1).
    assert end2.usage.prompt_tokens > end1.usage.prompt_tokens + end1.usage.completion_tokens
    assert end2.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


def test_sessions_spread_over_nodes_stick_to_their_node_and_avoid_drained_ones(fleet_factory):
    fleet_factory.coordinator()
    fleet_factory.node("n1")
    fleet_factory.node("n2")
    fleet_factory.wait_ready_nodes(2)
    with fleet_factory.client() as client:
        sessions = [client.create_session("smollm2-135m").session_id for _ in range(6)]
        first_nodes: dict[str, str] = {}

        def first_turn(session_id):
            first_nodes[session_id] = chat(client, session_id, "Say hello.", max_tokens=48)[
                1
            ].node_id

        threads = [threading.Thread(target=first_turn, args=(s,)) for s in sessions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert set(first_nodes.values()) == {"n1", "n2"}, "both nodes should get work"
        # Later turns go back to the node that holds the session's cache.
        for session_id in sessions[:4]:
            assert (
                chat(client, session_id, "Again.", max_tokens=4)[1].node_id
                == first_nodes[session_id]
            )
        # A drained node gets no new sessions; undoing the drain brings it back.
        client.drain("n1")
        assert {n.node_id: n.state for n in client.status().nodes}["n1"] == DRAINING
        fresh = [client.create_session("smollm2-135m").session_id for _ in range(4)]
        assert {chat(client, s, "Hi.", max_tokens=4)[1].node_id for s in fresh} == {"n2"}
        client.drain("n1", drain=False)
        assert {n.node_id: n.state for n in client.status().nodes}["n1"] == READY


# --- bad input ----------------------------------------------------------------------------


def test_session_errors(fleet_factory):
    fleet_factory.coordinator("--session-max-messages", "4")
    fleet_factory.node("n1")
    fleet_factory.wait_ready_nodes(1)
    with fleet_factory.client() as client:
        with pytest.raises(NotFound, match="no node in the fleet serves model 'gpt-9'"):
            client.create_session("gpt-9")
        with pytest.raises(NotFound, match="not found"):
            list(client.chat("no-such-session", "hi"))
        session = client.create_session("smollm2-135m")
        with pytest.raises(InvalidArgument, match="content must not be empty"):
            list(client.chat(session.session_id, "   "))
        with pytest.raises(InvalidArgument, match="max_tokens"):
            list(client.chat(session.session_id, "hi", max_tokens=0))
        chat(client, session.session_id, "One.", max_tokens=4)
        chat(client, session.session_id, "Two.", max_tokens=4)
        with pytest.raises(ResourceExhausted, match="reached 4 messages"):
            list(client.chat(session.session_id, "Three."))
        # The full session is intact and still readable.
        assert len(client.get_session(session.session_id).messages) == 4

        # Idle expiry: the session's lease runs out.
        short = client.create_session("smollm2-135m", idle_ttl_s=1)
        wait_until(
            lambda: _gone(client, short.session_id), timeout_s=15, what="the session to expire"
        )
        with pytest.raises(NotFound, match="expired"):
            list(client.chat(short.session_id, "hi"))
        # Closing removes it at once.
        client.close_session(session.session_id)
        with pytest.raises(NotFound):
            client.get_session(session.session_id)


def _gone(client, session_id) -> bool:
    try:
        client.get_session(session_id)
        return False
    except NotFound:
        return True


def test_concurrent_turns_of_one_session_abort_the_second(fleet_factory):
    a = fleet_factory.coordinator()
    b = fleet_factory.coordinator()
    fleet_factory.node("n1", coordinators=[a])
    fleet_factory.wait_ready_nodes(1, a, b)
    with fleet_factory.client(a) as on_a, fleet_factory.client(b) as on_b:
        session = on_a.create_session("smollm2-135m")
        long_turn = on_a.chat(
            session.session_id, "Write a very long story.", max_tokens=400, temperature=0
        )
        next(long_turn)  # the first turn is generating
        with pytest.raises(Aborted, match="another turn"):
            list(on_b.chat(session.session_id, "Interrupting!"))
        rest = "".join(c.text for c in long_turn)
        assert rest
        stored = on_b.get_session(session.session_id)
    assert [m.role for m in stored.messages] == ["user", "assistant"]
    assert stored.messages[0].content == "Write a very long story."


def test_a_saturated_fleet_answers_resource_exhausted_with_a_retry_hint(fleet_factory):
    fleet_factory.coordinator()
    fleet_factory.node("n1", slots=1, queue=0)
    fleet_factory.wait_ready_nodes(1)
    with fleet_factory.client() as client:
        busy = client.complete(
            "smollm2-135m", [("user", "Write a very long story.")], max_tokens=1500, temperature=0
        )
        next(busy)
        wait_until(
            lambda: client.status().nodes[0].capacity.slots_free == 0,
            what="the node to report its slot busy",
        )
        with pytest.raises(ResourceExhausted, match="at capacity") as refused:
            list(client.complete("smollm2-135m", [("user", "Hi")], max_tokens=4))
        assert refused.value.retry_after_s and refused.value.retry_after_s > 0
        busy.close()


def test_registration_errors(fleet_factory):
    coordinator = fleet_factory.coordinator()
    fleet_factory.node("taken")
    fleet_factory.wait_ready_nodes(1)
    with grpc.insecure_channel(coordinator.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        cases = [
            (dict(node_id="x", address="no-port", models=["m"]), "INVALID_ARGUMENT", "host:port"),
            (dict(node_id="x", address="h:99999", models=["m"]), "INVALID_ARGUMENT", "port"),
            (dict(node_id="x", address="h:1", models=[]), "INVALID_ARGUMENT", "at least one"),
            (dict(node_id="bad id!", address="h:1", models=["m"]), "INVALID_ARGUMENT", "node_id"),
            (
                dict(node_id="taken", address="127.0.0.1:1", models=["m"]),
                "ALREADY_EXISTS",
                "held by a live node",
            ),
        ]
        for fields, code, needle in cases:
            with pytest.raises(grpc.RpcError) as error:
                stub.Register(coordinator_pb2.RegisterRequest(**fields), timeout=10)
            assert error.value.code() == getattr(grpc.StatusCode, code), fields
            assert needle in error.value.details(), fields
        # A heartbeat for a registration that does not exist is fenced.
        replies = list(
            stub.Heartbeat(iter([coordinator_pb2.HeartbeatRequest(node_id="ghost", epoch=7)]))
        )
        assert replies[0].command == coordinator_pb2.HeartbeatResponse.COMMAND_REREGISTER
    # The coordinator is still serving, and the real node is untouched.
    assert fleet_factory.wait_ready_nodes(1) == ["taken"]


def test_coordinator_exits_with_a_clear_message_when_etcd_is_unreachable(tmp_path):
    process = start_coordinator(
        grpc_address=f"127.0.0.1:{free_port()}",
        etcd=[f"127.0.0.1:{free_port()}"],
        extra_args=("--etcd-wait", "2"),
        log_path=tmp_path / "coordinator.log",
    )
    assert process.process.wait(60) == 1
    assert "cannot reach etcd" in (tmp_path / "coordinator.log").read_text()


def test_requests_fail_unavailable_while_etcd_is_down_and_recover_after(
    fleet_factory, etcd_cluster
):
    fleet_factory.coordinator()
    fleet_factory.node("n1")
    fleet_factory.wait_ready_nodes(1)
    member = etcd_cluster.members[0]
    with fleet_factory.client() as client:
        etcd_cluster.kill_member(member, signal.SIGKILL)
        with pytest.raises(Unavailable, match="etcd"):
            client.create_session("smollm2-135m")
        assert client.status().nodes, "the last known fleet is still shown"
        etcd_cluster.start_member(member)
        etcd_cluster.wait_healthy()
        session = wait_until(
            lambda: _try_create(client), timeout_s=30, what="service to resume after etcd returned"
        )
        text, _ = chat(client, session.session_id, "Hello?", max_tokens=8)
        assert text
    assert fleet_factory.wait_ready_nodes(1) == ["n1"]


def _try_create(client):
    try:
        return client.create_session("smollm2-135m")
    except Unavailable:
        return None


def test_sampled_placement_still_finds_the_one_free_node(fleet_factory):
    """With a placement sample smaller than the fleet, a node outside the
    sample is still used when every sampled node is full: no false 429."""
    coordinator = fleet_factory.coordinator("--placement-sample", "1")
    for index in range(4):
        fleet_factory.node(
            f"sim-{index}",
            slots=1,
            queue=0,
            extra_args=("--runtime", "simulated", "--sim-tokens-per-s", "20"),
        )
    fleet_factory.wait_ready_nodes(4)
    client = fleet_factory.client(coordinator)

    def served_by(_) -> str:
        chunks = list(client.complete("smollm2-135m", [("user", "hi")], max_tokens=40))
        return next(c.node_id for c in chunks if c.node_id)

    with ThreadPoolExecutor(4) as pool:
        nodes = sorted(pool.map(served_by, range(4)))
    assert nodes == [f"sim-{i}" for i in range(4)]
