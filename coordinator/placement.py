"""Which node? The whole choice, as pure functions over a read-only fleet snapshot.

``choose`` takes a request (model, the node that served the conversation,
nodes to leave out) and a snapshot of the fleet, and returns the nodes that
can take it, best first; the router tries them in that order (a node that
turns out to be full or gone is skipped). The steps are separate functions so
each can be tested alone, table-driven and without a process:

- ``sample``: in a fleet larger than the sample size, a random sample plus
  the conversation's node ("power of d choices"), so a decision costs the same
  at 1,000 nodes as at 64;
- ``candidates``: the feasibility filter (ready, not excluded, has the model);
- ``score`` and ``rank``: the policy's order, saturated nodes left out.

Three named policies exist so they can be compared in the benchmark:

- ``round_robin``: rotate through the candidates, ignoring load.
- ``least_loaded``: fewest running + queued generations per slot.
- ``scored`` (default): prefers free slots, short queues, recent throughput,
  and the node that served the session or conversation before (its KV/prefix
  cache is warm), as long as that node is not overloaded.

Nothing here does I/O, reads a clock or changes the snapshot; randomness and
the round-robin turn come in as arguments.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edgefleet.errors import EdgefleetError, Reason, error_of

POLICIES = ("scored", "least_loaded", "round_robin")


# --- what placement reads ---------------------------------------------------------------
class LoadedModelView(Protocol):
    slots_total: int
    slots_free: int
    queue_depth: int
    queue_limit: int
    continuation_slots_free: int


class NodeView(Protocol):
    @property
    def node_id(self) -> str: ...

    @property
    def tokens_per_second(self) -> float: ...

    @property
    def low_power(self) -> bool: ...  # on low battery or throttled

    def model(self, alias: str) -> LoadedModelView | None: ...


class FleetSnapshot(Protocol):
    """The read-only view placement decides on (``FleetView`` is one)."""

    nodes: Mapping[str, NodeView]

    def is_ready(self, entry: NodeView) -> bool: ...

    def pending(self, node_id: str) -> int: ...

    def models(self) -> Mapping[str, int]: ...


@dataclass(frozen=True)
class PlacementRequest:
    model: str
    affinity_node: str = ""  # served this session/conversation before
    exclude: frozenset[str] = frozenset()  # failed during this request
    # A reply continued after its node failed: it may use reserved slots and
    # jumps queues, so a full node can still take it.
    continuation: bool = False


@dataclass(frozen=True)
class Candidate:
    node_id: str
    slots_total: int
    slots_free: int  # as last reported by the node
    queue_depth: int
    queue_limit: int
    tokens_per_second: float
    # Generations this replica started (+) or finished (-) since the node reported.
    pending: int = 0
    affinity: bool = False  # served this session/conversation before
    continuation_slots_free: int = 0  # reserved for continued replies
    low_power: bool = False  # on low battery or throttled: avoided, not excluded

    @property
    def busy_now(self) -> int:
        """Running plus queued generations, corrected by this replica's recent changes."""
        reported = (self.slots_total - self.slots_free) + self.queue_depth
        return max(0, reported + self.pending)

    @property
    def free_now(self) -> int:
        return max(0, self.slots_total - self.busy_now)

    @property
    def reserve_now(self) -> int:
        """Free continuation slots, less those this replica's recent dispatches
        may have taken since the report (once the free ordinary slots ran out)."""
        overflow = max(0, self.pending - self.slots_free)
        return max(0, self.continuation_slots_free - overflow)

    @property
    def saturated(self) -> bool:
        """No free slot and no room left in its queue."""
        return self.busy_now >= self.slots_total + self.queue_limit


@dataclass(frozen=True)
class Ranking:
    policy: str
    order: tuple[str, ...]  # node ids, best first; saturated nodes left out
    scores: dict[str, float]
    saturated: tuple[str, ...]
    decision_us: float = 0.0  # how long ranking took, set by the caller that timed it


@dataclass
class Placement:
    """A policy's settings, and the one piece of state a policy has (the
    round-robin turn). The decisions themselves are the functions below."""

    policy: str = "scored"
    sample: int = 64  # above this many nodes, rank a random sample of this size
    retry_after_s: float = 1.0  # the hint given when nothing can take a request
    _turn: itertools.count = field(default_factory=itertools.count, repr=False)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown placement policy {self.policy!r}; choose from {POLICIES}")
        if self.sample < 1:
            raise ValueError("the placement sample must be >= 1")

    def next_turn(self) -> int:
        return next(self._turn)


# --- the steps ----------------------------------------------------------------------------
def sample(
    nodes: Sequence[NodeView], size: int, rng: random.Random, *, keep: NodeView | None = None
) -> list[NodeView]:
    """``size`` random nodes, plus ``keep`` (the conversation's node) if it was not drawn."""
    if len(nodes) <= size:
        return list(nodes)
    drawn = rng.sample(list(nodes), size)
    if keep is not None and keep not in drawn:
        drawn.append(keep)
    return drawn


def candidates(
    fleet: FleetSnapshot, nodes: Iterable[NodeView], request: PlacementRequest
) -> list[Candidate]:
    """The nodes that could take ``request``: ready, not excluded, with the model loaded."""
    found = []
    for node in nodes:
        if node.node_id in request.exclude or not fleet.is_ready(node):
            continue
        loaded = node.model(request.model)
        if loaded is None:
            continue
        found.append(
            Candidate(
                node_id=node.node_id,
                slots_total=loaded.slots_total,
                slots_free=loaded.slots_free,
                queue_depth=loaded.queue_depth,
                queue_limit=loaded.queue_limit,
                tokens_per_second=node.tokens_per_second,
                pending=fleet.pending(node.node_id),
                affinity=node.node_id == request.affinity_node,
                continuation_slots_free=loaded.continuation_slots_free,
                low_power=node.low_power,
            )
        )
    return found


def score(candidate: Candidate, fastest: float) -> float:
    """Higher is better. Weights are chosen so that a free slot beats a warm cache
    on a busy node, and a warm cache beats a slightly faster cold node.
    ``fastest``: the highest recent throughput among the candidates."""
    per_slot_load = candidate.busy_now / max(1, candidate.slots_total)
    value = 0.0
    if candidate.free_now > 0:
        value += 50.0 + 10.0 * candidate.free_now / max(1, candidate.slots_total)
    else:
        # Queued work waits; the longer the queue, the worse.
        queue_room = max(1, candidate.queue_limit)
        value -= 40.0 * (candidate.busy_now - candidate.slots_total + 1) / queue_room
    value -= 20.0 * per_slot_load
    if fastest > 0:
        value += 10.0 * candidate.tokens_per_second / fastest
    if candidate.affinity and candidate.free_now > 0:
        value += 30.0
    if candidate.low_power:
        # Below any node with a free slot on mains, and its cached prefix: a
        # device on low battery or too hot serves only when the others cannot.
        value -= 100.0
    return value


def continuation_score(candidate: Candidate) -> float:
    """Higher is better, for a continued reply: a free slot, else a reserved
    one, else the shortest queue (it would wait at the head of it)."""
    if candidate.free_now > 0:
        return 100.0 + candidate.free_now
    if candidate.reserve_now > 0:
        return 50.0 + candidate.reserve_now
    return -float(candidate.busy_now - candidate.slots_total)


def rank(
    found: Sequence[Candidate], policy: str, *, turn: int = 0, continuation: bool = False
) -> Ranking:
    """Order ``found`` by ``policy``, best first, leaving saturated nodes out.
    ``turn`` rotates round_robin (the caller counts the turns). A continued
    reply ranks every node by where it restarts soonest: no node is too full
    for it, whatever the policy."""
    if continuation:
        scores = {c.node_id: continuation_score(c) for c in found}
        order = tuple(sorted(scores, key=lambda node: (-scores[node], node)))
        return Ranking(policy=policy, order=order, scores=scores, saturated=())
    open_nodes = [c for c in found if not c.saturated]
    saturated = tuple(c.node_id for c in found if c.saturated)
    if policy == "round_robin":
        ordered = sorted(open_nodes, key=lambda c: c.node_id)
        start = turn % len(ordered) if ordered else 0
        rotated = ordered[start:] + ordered[:start]
        scores = {c.node_id: float(len(rotated) - i) for i, c in enumerate(rotated)}
    elif policy == "least_loaded":
        scores = {c.node_id: -c.busy_now / max(1, c.slots_total) for c in open_nodes}
    else:
        fastest = max((c.tokens_per_second for c in open_nodes), default=0.0)
        scores = {c.node_id: score(c, fastest) for c in open_nodes}
    order = tuple(sorted(scores, key=lambda node: (-scores[node], node)))
    return Ranking(policy=policy, order=order, scores=scores, saturated=saturated)


def saturated_error(model: str, retry_after_s: float) -> EdgefleetError:
    return error_of(
        Reason.FLEET_SATURATED,
        f"every node serving {model!r} is at capacity; retry in {retry_after_s:.0f}s",
        retry_after_s=retry_after_s,
    )


def choose(
    fleet: FleetSnapshot,
    request: PlacementRequest,
    placement: Placement,
    rng: random.Random,
    *,
    turn: int = 0,
) -> Ranking:
    """The nodes to try for ``request``, best first.

    Raises UNKNOWN_MODEL (no node in the fleet has the model), NO_READY_NODE
    (nodes have it but none is ready) or FLEET_SATURATED (every one is full).
    """
    nodes = list(fleet.nodes.values())
    found: list[Candidate] = []
    if len(nodes) > placement.sample and placement.policy != "round_robin":
        # Rank a sample; only when no sampled node has a free slot, rank them all.
        keep = fleet.nodes.get(request.affinity_node)
        found = candidates(fleet, sample(nodes, placement.sample, rng, keep=keep), request)
        if not any(c.free_now for c in found):
            found = []
    if not found:
        found = candidates(fleet, nodes, request)
    if not found:
        if request.model not in fleet.models():
            raise error_of(
                Reason.UNKNOWN_MODEL, f"no node in the fleet serves model {request.model!r}"
            )
        raise error_of(
            Reason.NO_READY_NODE,
            f"no ready node serves model {request.model!r} (nodes may be draining or failed)",
            retry_after_s=placement.retry_after_s,
        )
    ranking = rank(found, placement.policy, turn=turn, continuation=request.continuation)
    if not ranking.order:
        raise saturated_error(request.model, placement.retry_after_s)
    return ranking
