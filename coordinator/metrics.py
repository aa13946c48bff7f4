"""The coordinator's Prometheus metrics, served at /metrics on its HTTP listener."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily

from edgefleet.v1 import common_pb2

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)
FAST_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1)
ETCD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)


class CoordinatorMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they only add noise here
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edgefleet_requests",
            "Client requests by method and status",
            ["method", "status"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "edgefleet_time_to_first_token_seconds",
            "From request arrival to the first token sent to the client",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "edgefleet_time_per_output_token_seconds",
            "Mean time per token after the first, per reply, as the client sees it",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "edgefleet_prompt_tokens", "Prompt tokens", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "edgefleet_generation_tokens", "Tokens generated", ["model"], registry=r
        )
        self.failovers = Counter(
            "edgefleet_failovers", "Replies moved to another node", ["cause"], registry=r
        )
        self.placements = Counter(
            "edgefleet_placement_decisions",
            "Placement decisions by policy and outcome",
            ["policy", "outcome"],
            registry=r,
        )
        self.placement_duration = Histogram(
            "edgefleet_placement_duration_seconds",
            "Time to rank the candidate nodes",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.etcd_duration = Histogram(
            "edgefleet_etcd_operation_duration_seconds",
            "etcd operations by kind",
            ["operation"],
            buckets=ETCD_BUCKETS,
            registry=r,
        )
        self.etcd_errors = Counter(
            "edgefleet_etcd_errors", "etcd operations that failed", ["operation"], registry=r
        )
        self.model_loads = Counter(
            "edgefleet_model_loads",
            "On-demand model loads this replica asked a node for, by outcome "
            "(loaded, already_loaded, refused, no_room, none)",
            ["model", "outcome"],
            registry=r,
        )
        self.model_load_waits = Counter(
            "edgefleet_model_load_waits",
            "Requests that waited for an on-demand load: one started it, the rest shared it",
            ["model", "kind"],
            registry=r,
        )
        self.model_load_duration = Histogram(
            "edgefleet_model_load_duration_seconds",
            "Time a node took to load a model on demand (LoadModel)",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.loop_lag = Gauge(
            "edgefleet_event_loop_lag_seconds",
            "How late the coordinator's event loop ran its last 100 ms tick",
            registry=r,
        )

    def observe_etcd(self, operation: str, seconds: float, ok: bool) -> None:
        self.etcd_duration.labels(operation).observe(seconds)
        if not ok:
            self.etcd_errors.labels(operation).inc()

    def watch(self, fleet) -> None:
        """Live fleet gauges read from the replica's fleet view at scrape time."""
        self.registry.register(_FleetCollector(fleet))


class _FleetCollector:
    def __init__(self, fleet) -> None:
        self._fleet = fleet

    def collect(self):
        nodes = GaugeMetricFamily("edgefleet_nodes", "Nodes by state", labels=["state"])
        counts = {name: 0 for name in ("ready", "draining", "suspect", "starting", "fenced")}
        slots = {"busy": 0, "free": 0}
        queue = 0
        models: dict[str, int] = {}
        for entry in list(self._fleet.nodes.values()):
            state = self._fleet.state_of(entry)
            if self._fleet.is_suspect(entry.node_id):
                counts["suspect"] += 1
            else:
                name = common_pb2.NodeState.Name(state).removeprefix("NODE_STATE_").lower()
                counts[name] = counts.get(name, 0) + 1
            for model in entry.record.capacity.models:
                slots["busy"] += model.slots_total - model.slots_free
                slots["free"] += model.slots_free
                queue += model.queue_depth
                models[model.alias] = models.get(model.alias, 0) + 1
        for state, count in counts.items():
            nodes.add_metric([state], count)
        yield nodes
        fleet_slots = GaugeMetricFamily(
            "edgefleet_fleet_slots", "Slots across the fleet", labels=["state"]
        )
        for state, count in slots.items():
            fleet_slots.add_metric([state], count)
        yield fleet_slots
        yield GaugeMetricFamily(
            "edgefleet_fleet_queue_depth",
            "Requests waiting for a slot across the fleet",
            value=queue,
        )
        loaded = GaugeMetricFamily(
            "edgefleet_fleet_models_loaded", "Nodes with each model loaded", labels=["model"]
        )
        for alias, count in models.items():
            loaded.add_metric([alias], count)
        yield loaded
