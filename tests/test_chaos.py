"""Fault injection with real processes: nodes, coordinators and etcd members die.

Every scenario streams a real reply and kills or freezes a real process in the
middle of it; the client must see one uninterrupted reply, no error, and the
turn stored exactly once. ``make chaos`` runs this file alone.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import threading
import time
import uuid

import pytest

from edgefleet.client import FleetClient
from edgefleet.v1 import common_pb2
from tests.conftest import FleetFactory
from tests.helpers import wait_until

pytestmark = pytest.mark.chaos

LONG = "Write a very long story."  # at temperature 0 it runs to max_tokens


class Reader:
    """Reads a stream in a thread, recording each chunk and when it came."""

    def __init__(self, stream) -> None:
        self.chunks = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream) -> None:
        try:
            for chunk in stream:
                self.chunks.append((time.monotonic(), chunk))
        except BaseException as error:  # the test asserts there is none
            self.error = error
        finally:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(c.text for _, c in self.chunks)

    def nodes(self) -> list[str]:
        seen = []
        for _, chunk in self.chunks:
            if chunk.node_id and (not seen or seen[-1] != chunk.node_id):
                seen.append(chunk.node_id)
        return seen

    def wait_text(self, characters: int = 40) -> None:
        wait_until(
            lambda: len(self.text) >= characters or self.done.is_set(),
            timeout_s=60,
            what="the reply to start",
        )
        assert not self.done.is_set(), "the reply ended before the fault could be injected"

    def finish(self, timeout_s: float = 120.0):
        assert self.done.wait(timeout_s), "the reply never finished"
        assert self.error is None, f"the client saw an error: {self.error!r}"
        return self.chunks[-1][1]


def two_node_fleet(fleet_factory: FleetFactory, *coordinator_args: str):
    fleet_factory.coordinator(*coordinator_args)
    nodes = {n: fleet_factory.node(n) for n in ("n1", "n2")}
    fleet_factory.wait_ready_nodes(2)
    return nodes


def reference_reply(client: FleetClient, max_tokens: int) -> str:
    return "".join(
        c.text
        for c in client.complete(
            "smollm2-135m", [("user", LONG)], max_tokens=max_tokens, temperature=0
        )
    )


def assert_one_reply(reader: Reader, reference: str, max_tokens: int) -> None:
    """Nothing lost, nothing repeated across the failover.

    - The text before the failure is the model's own reply so far (a prefix of
      the no-failure reference): nothing the first node sent went missing.
    - The text after it continues rather than restarts: the second node was
      given what the client already had, and did not say it again.
    - Token counts add up: every token of the reply was counted once.
    (The whole reply need not equal the reference: llama.cpp's numerics differ
    slightly between reading a text as prompt and generating it, so greedy
    decoding may take another branch after the seam.)
    """
    # A new part starts where the node changed, or where the client resumed the
    # turn on another replica (the resumed stream opens with the turn id again).
    parts: list[tuple[str, list]] = []
    for index, (_, chunk) in enumerate(reader.chunks):
        resumed = index > 0 and chunk.turn_id
        if resumed or (chunk.node_id and (not parts or parts[-1][0] != chunk.node_id)):
            parts.append((chunk.node_id, []))
        if chunk.text:
            parts[-1][1].append(chunk)
    parts = [part for part in parts if part[1]]
    assert len(parts) >= 2, "no failover happened"
    before = "".join(c.text for c in parts[0][1])
    after = "".join(c.text for _, chunks in parts[1:] for c in chunks)
    assert before and reference.startswith(before), (before, reference)
    assert after, "nothing was generated after the failover"
    assert not after.lstrip().startswith(reference.lstrip()[:24]), "the reply restarted"
    last = reader.chunks[-1][1]
    counted = sum(c.token_count for _, chunks in parts for c in chunks)
    assert last.usage.completion_tokens == counted
    assert last.usage.completion_tokens == max_tokens or last.finish_reason == 1


# --- nodes ---------------------------------------------------------------------------------


def test_kill_9_of_a_node_mid_stream_is_invisible_to_the_client(fleet_factory):
    nodes = two_node_fleet(fleet_factory)
    with fleet_factory.client() as client:
        reference = reference_reply(client, 160)
        session = client.create_session("smollm2-135m")
        reader = Reader(client.chat(session.session_id, LONG, max_tokens=160, temperature=0))
        reader.wait_text()
        victim = reader.nodes()[0]
        nodes[victim].kill()
        last = reader.finish()
        assert reader.nodes() == [victim, ({"n1", "n2"} - {victim}).pop()]
        assert last.failovers == 1 and last.usage.completion_tokens == 160
        assert_one_reply(reader, reference, 160)
        stored = client.get_session(session.session_id)
    assert [(m.role, m.content) for m in stored.messages] == [
        ("user", LONG),
        ("assistant", reader.text),
    ]
    # The dead node left everyone's placement; the session continues on the survivor.
    assert fleet_factory.wait_ready_nodes(1, timeout_s=10) == [reader.nodes()[-1]]
    with fleet_factory.client() as client:
        assert "".join(c.text for c in client.chat(session.session_id, "Go on.", max_tokens=8))
        assert len(client.get_session(session.session_id).messages) == 4


def test_a_full_fleet_loses_no_stream_when_a_node_dies(fleet_factory):
    """Every slot of three nodes busy with long replies, one node killed: its
    replies restart on the survivors' reserved continuation slots, so every
    stream completes with its full length and no error (the issue's case)."""
    fleet_factory.coordinator()
    nodes = {n: fleet_factory.node(n) for n in ("n1", "n2", "n3")}
    fleet_factory.wait_ready_nodes(3)
    max_tokens = 240
    with fleet_factory.client() as client:
        readers = [
            Reader(
                client.complete(
                    "smollm2-135m",
                    [("user", f"{LONG} ({index})")],
                    max_tokens=max_tokens,
                    temperature=0,
                )
            )
            for index in range(6)
        ]
        for reader in readers:
            reader.wait_text(8)
        by_node = {}
        for reader in readers:
            by_node.setdefault(reader.nodes()[0], []).append(reader)
        assert sorted(len(r) for r in by_node.values()) == [2, 2, 2], "not every slot was busy"
        victim = readers[0].nodes()[0]
        nodes[victim].kill()
        for reader in readers:
            last = reader.finish(timeout_s=240)
            assert last.usage.completion_tokens == max_tokens
        moved = by_node[victim]
        assert all(len(r.nodes()) == 2 and victim not in r.nodes()[1:] for r in moved)
        # Each continued reply restarted promptly although no ordinary slot was free.
        for reader in moved:
            gap = max(b[0] - a[0] for a, b in itertools.pairwise(reader.chunks))
            print(f"longest gap in a moved stream: {gap:.2f}s")  # the bench measures it


def test_a_json_schema_reply_still_validates_after_a_failover(fleet_factory):
    """The grammar resumes after the text already sent: the whole reply is one
    valid document, not a second one started mid-way."""
    nodes = two_node_fleet(fleet_factory)
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "facts": {
                "type": "array",
                "items": {"type": "string", "maxLength": 60},
                "minItems": 3,
                "maxItems": 4,
            },
        },
        "required": ["city", "facts"],
    }
    constraint = common_pb2.OutputConstraint(json_schema=json.dumps(schema))
    with fleet_factory.client() as client:
        reader = Reader(
            client.complete(
                "smollm2-135m",
                [("user", "Describe Lisbon as JSON with many facts.")],
                max_tokens=400,
                temperature=0,
                constraint=constraint,
            )
        )
        reader.wait_text(12)
        nodes[reader.nodes()[0]].kill()
        last = reader.finish()
    assert len(reader.nodes()) == 2 and last.failovers == 1
    document = json.loads(reader.text)
    assert set(document) == {"city", "facts"} and isinstance(document["city"], str)
    assert 3 <= len(document["facts"]) <= 4


def test_sigstop_of_a_node_mid_stream_fails_over_after_the_stall_deadline(fleet_factory):
    nodes = two_node_fleet(fleet_factory, "--stall-timeout", "1")
    with fleet_factory.client() as client:
        reference = reference_reply(client, 160)
        reader = Reader(
            client.complete("smollm2-135m", [("user", LONG)], max_tokens=160, temperature=0)
        )
        reader.wait_text()
        victim = reader.nodes()[0]
        os.kill(nodes[victim].pid, signal.SIGSTOP)
        try:
            last = reader.finish()
        finally:
            os.kill(nodes[victim].pid, signal.SIGCONT)
        assert len(reader.nodes()) == 2 and last.failovers == 1
        assert_one_reply(reader, reference, 160)


def test_node_that_comes_back_after_its_lease_expired_must_register_again(fleet_factory):
    fleet_factory.coordinator("--node-lease-ttl", "2")
    frozen = fleet_factory.node("frozen")
    fleet_factory.wait_ready_nodes(1)
    with fleet_factory.client() as client:
        epoch_before = client.status().nodes[0].epoch
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            # Its lease runs out: it leaves the fleet.
            wait_until(
                lambda: not client.status().nodes, timeout_s=20, what="the frozen node to leave"
            )
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        # Its late heartbeats are refused; it registers again under a new epoch.
        [node] = wait_until(
            lambda: client.status().nodes, timeout_s=30, what="the node to register again"
        )
        assert node.node_id == "frozen" and node.epoch > epoch_before
        assert "fenced this node" in frozen.log_path.read_text()
        session = client.create_session("smollm2-135m")
        assert "".join(c.text for c in client.chat(session.session_id, "Hi", max_tokens=4))


# --- coordinators ----------------------------------------------------------------------------


def test_kill_9_of_the_coordinator_a_client_streams_through(fleet_factory):
    a = fleet_factory.coordinator()
    b = fleet_factory.coordinator()
    fleet_factory.node("n1", coordinators=[a, b])
    fleet_factory.node("n2", coordinators=[b, a])
    fleet_factory.wait_ready_nodes(2, a, b)
    with FleetClient([a.address, b.address]) as client:
        reference = reference_reply(client, 160)
        session = client.create_session("smollm2-135m")
        reader = Reader(client.chat(session.session_id, LONG, max_tokens=160, temperature=0))
        reader.wait_text()
        a.kill()  # the replica streaming the reply
        last = reader.finish()
        assert last.finish_reason and last.usage.completion_tokens > 0
        assert_one_reply(reader, reference, 160)
        stored = client.get_session(session.session_id)
        assert [(m.role, m.content) for m in stored.messages] == [
            ("user", LONG),
            ("assistant", reader.text),
        ]
        # Both nodes stay in the fleet: n1 moved its heartbeats to the survivor.
        assert fleet_factory.wait_ready_nodes(2, b) == ["n1", "n2"]


def test_singleton_maintenance_moves_to_another_replica_when_the_leader_dies(fleet_factory):
    a = fleet_factory.coordinator()
    b = fleet_factory.coordinator()
    with FleetClient([b.address]) as client:
        leader = wait_until(lambda: client.status().leader_id, what="a leader")
        assert leader in ("coord-0", "coord-1")
        (a if leader == "coord-0" else b).kill()
        survivor = b if leader == "coord-0" else a
    with FleetClient([survivor.address]) as client:
        new_leader = wait_until(
            lambda: (lid := client.status().leader_id) and lid != leader and lid,
            timeout_s=20,
            what="leadership to move",
        )
        assert new_leader == ("coord-1" if leader == "coord-0" else "coord-0")


# --- etcd --------------------------------------------------------------------------------------


def test_kill_9_of_one_etcd_member_in_a_three_member_cluster(tmp_path, default_model_path):
    from edgefleet.local.etcd_server import EtcdCluster

    cluster = EtcdCluster(3, base_dir=tmp_path / "etcd").start()
    fleet = FleetFactory(tmp_path, cluster.endpoints)
    try:
        fleet.coordinator("--node-lease-ttl", "3")
        fleet.node("n1")
        fleet.wait_ready_nodes(1)
        with fleet.client() as client:
            session = client.create_session("smollm2-135m")
            cluster.kill_member(cluster.members[0])
            time.sleep(4)  # longer than the node lease: heartbeats must keep it alive
            assert [n.node_id for n in client.status().nodes] == ["n1"]
            reply = wait_until(
                lambda: _try_chat(client, session.session_id),
                timeout_s=30,
                what="a chat turn with one etcd member down",
            )
            assert reply
            assert len(client.get_session(session.session_id).messages) == 2
            assert client.create_session("smollm2-135m").session_id
    finally:
        fleet.stop_all()
        cluster.stop()


def _try_chat(client, session_id):
    from edgefleet.errors import Unavailable

    try:
        return "".join(c.text for c in client.chat(session_id, "Hello", max_tokens=8))
    except Unavailable:
        return None


def test_in_flight_streams_finish_while_etcd_is_entirely_down(fleet_factory, etcd_cluster):
    two_node_fleet(fleet_factory)
    with fleet_factory.client() as client:
        reference = reference_reply(client, 120)
        reader = Reader(
            client.complete("smollm2-135m", [("user", LONG)], max_tokens=120, temperature=0)
        )
        reader.wait_text()
        etcd_cluster.kill_member(etcd_cluster.members[0])
        last = reader.finish()
        assert reference.startswith(reader.text[:40]) and last.usage.completion_tokens == 120
        from edgefleet.errors import Unavailable

        with pytest.raises(Unavailable):
            client.create_session("smollm2-135m")
        etcd_cluster.start_member(etcd_cluster.members[0])
        etcd_cluster.wait_healthy()
        wait_until(lambda: _try_create(client), timeout_s=30, what="service to resume")
    assert fleet_factory.wait_ready_nodes(2) == ["n1", "n2"]


def _try_create(client):
    from edgefleet.errors import Unavailable

    try:
        return client.create_session("smollm2-135m")
    except Unavailable:
        return None


# --- network partition -------------------------------------------------------------------------


class NetNamespace:
    """A test host in its own network namespace, joined to this one by a veth pair."""

    def __init__(self, index: int) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"ef{tag}"
        self.host_if, self.ns_if = f"efh{tag}", f"efn{tag}"
        self.host_ip, self.ns_ip = f"10.231.{index}.1", f"10.231.{index}.2"

    def ip(self, *args: str, ns: bool = False) -> None:
        prefix = ["ip", "netns", "exec", self.name] if ns else []
        subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)

    def create(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self.ip("link", "set", self.ns_if, "netns", self.name)
        self.ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self.ip("link", "set", self.host_if, "up")
        self.ip("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if, ns=True)
        self.ip("link", "set", self.ns_if, "up", ns=True)
        self.ip("link", "set", "lo", "up", ns=True)

    def cut(self) -> None:
        self.ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        self.ip("link", "set", self.host_if, "up")

    def destroy(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def netns():
    namespace = NetNamespace(index=int(uuid.uuid4().int % 200) + 20)
    try:
        namespace.create()
    except (OSError, subprocess.CalledProcessError) as error:
        namespace.destroy()
        detail = getattr(error, "stderr", b"") or str(error).encode()
        pytest.skip(f"network namespaces are not available here: {detail.decode().strip()}")
    yield namespace
    namespace.destroy()


def test_node_cut_off_by_a_network_partition(tmp_path, etcd_cluster, default_model_path, netns):
    from edgefleet.local.processes import start_coordinator, start_daemon

    fleet = FleetFactory(tmp_path, etcd_cluster.endpoints)
    coordinator = start_coordinator(
        grpc_address=f"{netns.host_ip}:50151",
        etcd=etcd_cluster.endpoints,
        extra_args=("--id", "coord-p", "--node-lease-ttl", "2", "--stall-timeout", "1"),
        log_path=tmp_path / "coordinator.log",
    )
    fleet.coordinators.append(coordinator)
    try:
        coordinator.wait_serving(60)
        fleet.node("local")  # reachable on loopback
        # The partitioned node lives in the namespace, reached over the veth pair.
        cut_off = start_daemon(
            [
                "node",
                "--listen",
                f"{netns.ns_ip}:50161",
                "--coordinator",
                coordinator.address,
                "--node-id",
                "remote",
                "--threads",
                "1",
                "--insecure",
            ],
            address=f"{netns.ns_ip}:50161",
            name="remote",
            log_path=tmp_path / "remote.log",
            wrap=("ip", "netns", "exec", netns.name),
        )
        fleet.nodes.started.append(cut_off)
        fleet.wait_ready_nodes(2)
        with fleet.client() as client:
            epoch = next(n.epoch for n in client.status().nodes if n.node_id == "remote")
            fleet_drain_all_but(client, "remote")
            reader = Reader(
                client.complete("smollm2-135m", [("user", LONG)], max_tokens=120, temperature=0)
            )
            reader.wait_text()
            client.drain("local", drain=False)
            netns.cut()
            last = reader.finish()
            assert reader.nodes() == ["remote", "local"] and last.failovers == 1
            # The cut-off node leaves the fleet when its lease runs out ...
            wait_until(
                lambda: [n.node_id for n in client.status().nodes] == ["local"],
                timeout_s=20,
                what="the partitioned node to leave",
            )
            netns.heal()
            # ... and registers again once the network is back.
            node = wait_until(
                lambda: next((n for n in client.status().nodes if n.node_id == "remote"), None),
                timeout_s=60,
                what="the partitioned node to come back",
            )
            assert node.epoch > epoch
    finally:
        fleet.stop_all()


def fleet_drain_all_but(client, node_id: str) -> None:
    for node in client.status().nodes:
        if node.node_id != node_id:
            client.drain(node.node_id)


# --- misbehaving nodes and clients ----------------------------------------------------------


def test_a_node_sending_out_of_order_chunks_is_treated_as_failed(fleet_factory, tmp_path):
    import sys

    from edgefleet.local.processes import DaemonProcess, free_port

    coordinator = fleet_factory.coordinator()
    fleet_factory.node("honest")
    fleet_factory.wait_ready_nodes(1)
    address = f"127.0.0.1:{free_port()}"
    rogue = subprocess.Popen(
        [sys.executable, "-m", "tests.rogue_node", address, coordinator.address, "rogue"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fleet_factory.nodes.started.append(DaemonProcess("rogue", address, rogue))
    fleet_factory.wait_ready_nodes(2)
    with fleet_factory.client() as client:
        client.drain("honest")  # the first attempt must land on the rogue
        reader = Reader(
            client.complete(
                "smollm2-135m", [("user", "Tell me a story.")], max_tokens=24, temperature=0
            )
        )
        wait_until(lambda: reader.text, what="the rogue's first chunk")
        client.drain("honest", drain=False)  # a way out before the bad chunk comes
        last = reader.finish()
        assert reader.nodes() == ["rogue", "honest"] and last.failovers == 1
        assert reader.text.startswith("Once") and "garbage" not in reader.text
        # The rogue is out of placement here; its stream was not trusted.
        assert "out-of-order" in coordinator.log_path.read_text()


def test_a_client_leaving_during_a_migration_leaves_no_generation_running(fleet_factory):
    nodes = two_node_fleet(fleet_factory, "--stall-timeout", "1")
    with fleet_factory.client() as client:
        session = client.create_session("smollm2-135m")
        stream = client.chat(session.session_id, LONG, max_tokens=1500, temperature=0)
        reader = Reader(stream)
        reader.wait_text()
        victim = reader.nodes()[0]
        survivor = ({"n1", "n2"} - {victim}).pop()
        os.kill(nodes[victim].pid, signal.SIGSTOP)
        try:
            # The coordinator notices the stall, moves the reply to the survivor ...
            wait_until(
                lambda: survivor in reader.nodes(), timeout_s=30, what="the migration to start"
            )
            stream.cancel()  # ... and the client goes away in the middle of it.
            assert reader.done.wait(30)
            status = FleetClient([fleet_factory.coordinators[0].address]).status
            wait_until(
                lambda: (
                    next(
                        n for n in status().nodes if n.node_id == survivor
                    ).capacity.active_generations
                    == 0
                ),
                timeout_s=15,
                what="the survivor to stop generating",
            )
        finally:
            os.kill(nodes[victim].pid, signal.SIGCONT)
        # No half turn was stored, and the session takes its next turn.
        assert client.get_session(session.session_id).messages == []
        assert "".join(c.text for c in client.chat(session.session_id, "Hi", max_tokens=4))
