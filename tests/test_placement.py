"""Placement as pure functions: table-driven, no processes, milliseconds."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from coordinator import placement
from coordinator.placement import Candidate, Placement, PlacementRequest, candidates
from edgefleet.errors import EdgefleetError, Reason
from edgefleet.v1 import common_pb2

MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Loaded:
    slots_total: int = 2
    slots_free: int = 2
    queue_depth: int = 0
    queue_limit: int = 4
    continuation_slots_free: int = 0


@dataclass(frozen=True)
class Node:
    node_id: str
    models: dict = field(default_factory=lambda: {MODEL: Loaded()})
    tokens_per_second: float = 100.0
    ready: bool = True
    low_power: bool = False

    def model(self, alias: str):
        return self.models.get(alias)


@dataclass
class Fleet:
    """A fleet snapshot made of plain data."""

    nodes: dict
    pending_by_node: dict = field(default_factory=dict)

    def is_ready(self, entry) -> bool:
        return entry.ready

    def pending(self, node_id: str) -> int:
        return self.pending_by_node.get(node_id, 0)

    def models(self) -> dict:
        counts: dict[str, int] = {}
        for node in self.nodes.values():
            for alias in node.models:
                counts[alias] = counts.get(alias, 0) + int(node.ready)
        return counts


def fleet_of(*nodes: Node, pending=None) -> Fleet:
    return Fleet({n.node_id: n for n in nodes}, pending or {})


def choose(fleet, policy="scored", *, sample=64, seed=0, turn=0, **request):
    request.setdefault("model", MODEL)
    return placement.choose(
        fleet,
        PlacementRequest(**request),
        Placement(policy, sample=sample, retry_after_s=2.0),
        random.Random(seed),
        turn=turn,
    )


# --- the filter ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("nodes", "request_", "expected"),
    [
        ([Node("a"), Node("b")], {}, ["a", "b"]),
        ([Node("a", ready=False), Node("b")], {}, ["b"]),  # not ready (drained, suspected)
        ([Node("a"), Node("b")], {"exclude": frozenset({"a"})}, ["b"]),  # failed this request
        ([Node("a", models={"gemma3-270m": Loaded()}), Node("b")], {}, ["b"]),  # no such model
        ([Node("a")], {"affinity_node": "a"}, ["a"]),
    ],
)
def test_candidates_are_ready_nodes_with_the_model_not_excluded(nodes, request_, expected):
    fleet = fleet_of(*nodes)
    found = placement.candidates(fleet, nodes, PlacementRequest(MODEL, **request_))
    assert [c.node_id for c in found] == expected
    assert all(c.affinity == (c.node_id == request_.get("affinity_node")) for c in found)


def test_a_candidate_counts_generations_this_replica_started_since_the_report():
    fleet = fleet_of(
        Node("a", models={MODEL: Loaded(slots_total=2, slots_free=2)}), pending={"a": 2}
    )
    (candidate,) = placement.candidates(fleet, fleet.nodes.values(), PlacementRequest(MODEL))
    assert candidate.busy_now == 2 and candidate.free_now == 0


# --- load arithmetic --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("total", "free", "queued", "limit", "pending", "busy", "free_now", "saturated"),
    [
        (2, 2, 0, 4, 0, 0, 2, False),
        (2, 0, 0, 4, 0, 2, 0, False),
        (2, 0, 4, 4, 0, 6, 0, True),  # every slot busy and the queue full
        (2, 1, 0, 0, 1, 2, 0, True),  # no queue: one more makes it full
        (2, 0, 1, 4, -3, 0, 2, False),  # finished here since the report: never negative
    ],
)
def test_busy_free_and_saturated(total, free, queued, limit, pending, busy, free_now, saturated):
    candidate = Candidate("n", total, free, queued, limit, 10.0, pending)
    assert (candidate.busy_now, candidate.free_now, candidate.saturated) == (
        busy,
        free_now,
        saturated,
    )


# --- the policies -----------------------------------------------------------------------------
def test_scored_prefers_a_free_slot_over_a_warm_cache_on_a_full_node():
    fleet = fleet_of(
        Node("warm", models={MODEL: Loaded(slots_free=0)}),
        Node("cold", models={MODEL: Loaded(slots_free=2)}),
    )
    assert choose(fleet, affinity_node="warm").order == ("cold", "warm")


def test_scored_prefers_the_warm_node_when_both_have_room():
    fleet = fleet_of(Node("a", tokens_per_second=110.0), Node("warm", tokens_per_second=100.0))
    assert choose(fleet, affinity_node="warm").order[0] == "warm"


def test_scored_prefers_the_faster_of_two_idle_nodes():
    fleet = fleet_of(Node("slow", tokens_per_second=30.0), Node("fast", tokens_per_second=90.0))
    assert choose(fleet).order == ("fast", "slow")


def test_scored_prefers_the_shorter_queue_when_all_are_busy():
    fleet = fleet_of(
        Node("long", models={MODEL: Loaded(slots_free=0, queue_depth=3)}),
        Node("short", models={MODEL: Loaded(slots_free=0, queue_depth=1)}),
    )
    assert choose(fleet).order == ("short", "long")


def test_least_loaded_orders_by_load_per_slot():
    fleet = fleet_of(
        Node("half", models={MODEL: Loaded(slots_total=4, slots_free=2)}),
        Node("idle", models={MODEL: Loaded(slots_total=2, slots_free=2)}),
        Node("full", models={MODEL: Loaded(slots_total=2, slots_free=0)}),
    )
    assert choose(fleet, "least_loaded").order == ("idle", "half", "full")


@pytest.mark.parametrize(("turn", "first"), [(0, "a"), (1, "b"), (2, "c"), (3, "a")])
def test_round_robin_rotates_with_the_turn(turn, first):
    fleet = fleet_of(Node("c"), Node("a"), Node("b"))
    ranking = choose(fleet, "round_robin", turn=turn)
    assert ranking.order[0] == first and sorted(ranking.order) == ["a", "b", "c"]


def test_saturated_nodes_are_left_out_and_named():
    fleet = fleet_of(
        Node("full", models={MODEL: Loaded(slots_free=0, queue_depth=4)}), Node("open")
    )
    ranking = choose(fleet)
    assert ranking.order == ("open",) and ranking.saturated == ("full",)


def test_a_continued_reply_goes_where_it_restarts_soonest_even_on_a_full_fleet():
    fleet = fleet_of(
        Node("full", models={MODEL: Loaded(slots_free=0, queue_depth=4)}),
        Node("queued", models={MODEL: Loaded(slots_free=0, queue_depth=1)}),
        Node("reserve", models={MODEL: Loaded(slots_free=0, continuation_slots_free=1)}),
    )
    request = PlacementRequest(MODEL, continuation=True)
    ranking = placement.choose(fleet, request, Placement(), random.Random(0))
    # The reserved slot first; then the shorter queue; no node is "saturated" for it.
    assert ranking.order == ("reserve", "queued", "full") and ranking.saturated == ()
    with_free = fleet_of(*fleet.nodes.values(), Node("free"))
    ranking = placement.choose(with_free, request, Placement(), random.Random(0))
    assert ranking.order[0] == "free"
    # Two continuations in a row from this replica (the view not yet updated)
    # do not both go to the one reserved slot.
    taken = fleet_of(*fleet.nodes.values(), pending={"reserve": 1})
    ranking = placement.choose(taken, request, Placement(), random.Random(0))
    assert ranking.order[0] == "queued"
    # An ordinary request on the same fleet leaves the full node out, and never
    # counts reserved slots as room.
    ordinary = placement.choose(fleet, PlacementRequest(MODEL), Placement(), random.Random(0))
    assert "full" not in ordinary.order and ordinary.saturated == ("full",)


# --- why nothing can take it, by named reason ------------------------------------------------
@pytest.mark.parametrize(
    ("nodes", "model", "reason", "retry_after"),
    [
        ([Node("a")], "nope", Reason.UNKNOWN_MODEL, None),
        ([Node("a", ready=False)], MODEL, Reason.NO_READY_NODE, 2.0),
        ([Node("a", models={MODEL: Loaded(slots_free=0, queue_depth=4)})], MODEL,
         Reason.FLEET_SATURATED, 2.0),
        ([], MODEL, Reason.UNKNOWN_MODEL, None),
    ],
)  # fmt: skip
def test_no_node_is_an_error_with_a_named_reason(nodes, model, reason, retry_after):
    with pytest.raises(EdgefleetError) as error:
        choose(fleet_of(*nodes), model=model)
    assert error.value.reason is reason
    assert error.value.code == reason.code
    assert error.value.retry_after_s == retry_after


# --- sampling in large fleets -------------------------------------------------------------
def test_a_large_fleet_ranks_a_sample_plus_the_conversations_node():
    nodes = [Node(f"n{i:03d}") for i in range(200)]
    fleet = fleet_of(*nodes)
    ranking = choose(fleet, sample=8, affinity_node="n150", seed=1)
    assert len(ranking.order) in (8, 9) and "n150" in ranking.order
    # The same seed draws the same sample: the choice is a pure function.
    assert choose(fleet, sample=8, affinity_node="n150", seed=1).order == ranking.order


def test_when_no_sampled_node_is_free_the_whole_fleet_is_ranked():
    busy = Loaded(slots_free=0)
    nodes = [Node(f"n{i:03d}", models={MODEL: busy}) for i in range(100)]
    nodes.append(Node("the-free-one"))
    ranking = choose(fleet_of(*nodes), sample=4, seed=3)
    assert ranking.order[0] == "the-free-one" and len(ranking.order) == 101


def test_round_robin_never_samples():
    nodes = [Node(f"n{i:03d}") for i in range(100)]
    assert len(choose(fleet_of(*nodes), "round_robin", sample=4).order) == 100


def test_sample_keeps_the_conversations_node_and_draws_without_replacement():
    nodes = [Node(f"n{i}") for i in range(50)]
    drawn = placement.sample(nodes, 10, random.Random(7), keep=nodes[49])
    assert nodes[49] in drawn and len(set(n.node_id for n in drawn)) == len(drawn)
    assert placement.sample(nodes[:3], 10, random.Random(7)) == nodes[:3]


def test_an_unknown_policy_or_an_empty_sample_is_refused():
    with pytest.raises(ValueError):
        Placement("fastest")
    with pytest.raises(ValueError):
        Placement("scored", sample=0)


def test_a_report_does_not_hide_dispatches_still_on_their_way():
    """A node's report counts this replica's generations by origin: one made
    before a dispatched request reached the node still leaves it pending, so
    requests placed in one burst spread over the slots (the race that put
    three replies on one node of a full fleet)."""
    from coordinator.etcd import KeyValue
    from coordinator.fleet import FleetView
    from coordinator.keys import Keys
    from edgefleet.v1 import coordinator_pb2

    keys = Keys("/t/")
    fleet = FleetView(None, keys, origin="me")
    revision = iter(range(1, 100))

    def report(free: int, counts_origins: bool = True, **by_origin: int) -> None:
        record = coordinator_pb2.NodeStatus(node_id="n1", state=common_pb2.NODE_STATE_READY)
        record.capacity.models.add(alias=MODEL, slots_total=2, slots_free=free, queue_limit=4)
        record.capacity.active_by_origin.update(by_origin)
        record.capacity.counts_origins = counts_origins
        kv = KeyValue(keys.node("n1"), record.SerializeToString(), 1, next(revision), 7)
        fleet._apply_node(kv, deleted=False)

    def free_now() -> int:
        [found] = candidates(fleet, fleet.nodes.values(), PlacementRequest(MODEL))
        return found.free_now

    report(free=2)
    fleet.dispatch("n1")
    fleet.dispatch("n1")
    assert free_now() == 0
    # Another replica's request was admitted; the report went out before ours arrived.
    report(free=1, other=1)
    assert fleet.pending("n1") == 2 and free_now() == 0
    report(free=0, me=1, other=1)  # one of ours is there, one still on its way
    assert fleet.pending("n1") == 1 and free_now() == 0
    fleet.release("n1")  # one of ours ended; the next report counts the other
    report(free=0, me=1, other=1)
    assert fleet.pending("n1") == 0 and free_now() == 0
    fleet.release("n1")
    report(free=1, other=1)
    assert fleet.pending("n1") == 0 and free_now() == 1
    # An older node (no counts by origin, a rolling upgrade): its report counts
    # what ran here when it arrived, as before; ours are not counted twice.
    fleet.dispatch("n1")
    report(free=0, counts_origins=False)
    assert fleet.pending("n1") == 0 and free_now() == 0
    fleet.release("n1")
    assert fleet.pending("n1") == -1


def test_a_node_on_low_battery_or_too_hot_serves_only_when_no_other_can():
    on_battery = Node("battery", low_power=True)
    mains = Node("mains", models={MODEL: Loaded(slots_total=4, slots_free=1)})
    ranking = placement.choose(
        fleet_of(on_battery, mains),
        PlacementRequest(MODEL, affinity_node="battery"),
        Placement(),
        random.Random(0),
    )
    assert ranking.order == ("mains", "battery")  # even against its cached conversation
    alone = placement.choose(
        fleet_of(on_battery), PlacementRequest(MODEL), Placement(), random.Random(0)
    )
    assert alone.order == ("battery",)  # avoided, not excluded


def test_power_is_read_from_the_platform_sensors():
    from collections import namedtuple

    from node_agent.capacity import power_from

    # The shapes psutil documents for sensors_battery() and sensors_temperatures().
    sbattery = namedtuple("sbattery", "percent secsleft power_plugged")
    shwtemp = namedtuple("shwtemp", "label current high critical")

    assert power_from(None, {}).low_power is False
    low = power_from(sbattery(percent=12, secsleft=600, power_plugged=False), {})
    assert (low.on_battery, low.battery_percent, low.low_power) == (True, 12.0, True)
    charging = power_from(sbattery(percent=12, secsleft=-2, power_plugged=True), {})
    assert charging.low_power is False
    hot = power_from(None, {"coretemp": [shwtemp("Core 0", 101.0, 100.0, 105.0)]})
    assert (hot.temperature_c, hot.throttled, hot.low_power) == (101.0, True, True)
    warm = power_from(None, {"coretemp": [shwtemp("Core 0", 70.0, 100.0, 105.0)]})
    assert (warm.throttled, warm.low_power) == (False, False)
