"""Placement policies: pure functions over a snapshot of candidate nodes.

``rank`` orders the nodes that can serve a request, best first; the router
tries them in that order (a node that turns out to be full or gone is skipped).
Three named policies exist so they can be compared in the benchmark:

- ``round_robin``: rotate through the candidates, ignoring load.
- ``least_loaded``: fewest running + queued generations per slot.
- ``scored`` (default): prefers free slots, short queues, recent throughput,
  and the node that served the session or conversation before (its KV/prefix
  cache is warm), as long as that node is not overloaded.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

POLICIES = ("scored", "least_loaded", "round_robin")


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

    @property
    def busy_now(self) -> int:
        """Running plus queued generations, corrected by this replica's recent changes."""
        reported = (self.slots_total - self.slots_free) + self.queue_depth
        return max(0, reported + self.pending)

    @property
    def free_now(self) -> int:
        return max(0, self.slots_total - self.busy_now)

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


class Placement:
    def __init__(self, policy: str = "scored", *, sample: int = 64) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown placement policy {policy!r}; choose from {POLICIES}")
        if sample < 1:
            raise ValueError("the placement sample must be >= 1")
        self.policy = policy
        # Above this many nodes the router ranks a random sample of this size.
        self.sample = sample
        self._turn = itertools.count()

    def rank(self, candidates: list[Candidate]) -> Ranking:
        open_nodes = [c for c in candidates if not c.saturated]
        saturated = tuple(c.node_id for c in candidates if c.saturated)
        if self.policy == "round_robin":
            scores = self._round_robin(sorted(open_nodes, key=lambda c: c.node_id))
        elif self.policy == "least_loaded":
            scores = {c.node_id: -c.busy_now / max(1, c.slots_total) for c in open_nodes}
        else:
            fastest = max((c.tokens_per_second for c in open_nodes), default=0.0)
            scores = {c.node_id: scored(c, fastest) for c in open_nodes}
        order = tuple(sorted(scores, key=lambda node: (-scores[node], node)))
        return Ranking(policy=self.policy, order=order, scores=scores, saturated=saturated)

    def _round_robin(self, candidates: list[Candidate]) -> dict[str, float]:
        if not candidates:
            return {}
        start = next(self._turn) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return {c.node_id: float(len(rotated) - i) for i, c in enumerate(rotated)}


def scored(candidate: Candidate, fastest: float) -> float:
    """Higher is better. Weights are chosen so that a free slot beats a warm cache
    on a busy node, and a warm cache beats a slightly faster cold node.
    ``fastest``: the highest recent throughput among the candidates."""
    per_slot_load = candidate.busy_now / max(1, candidate.slots_total)
    score = 0.0
    if candidate.free_now > 0:
        score += 50.0 + 10.0 * candidate.free_now / max(1, candidate.slots_total)
    else:
        # Queued work waits; the longer the queue, the worse.
        queue_room = max(1, candidate.queue_limit)
        score -= 40.0 * (candidate.busy_now - candidate.slots_total + 1) / queue_room
    score -= 20.0 * per_slot_load
    if fastest > 0:
        score += 10.0 * candidate.tokens_per_second / fastest
    if candidate.affinity and candidate.free_now > 0:
        score += 30.0
    return score
