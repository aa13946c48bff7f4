"""The node's Prometheus metrics (``--metrics ADDR`` serves them at /metrics)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Token latencies on CPUs range from milliseconds to a few seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)


class NodeMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they only add noise here
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgefleet_node_requests",
            "Generate requests by model and gRPC status",
            ["model", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "edgefleet_node_time_to_first_token_seconds",
            "From request arrival (queue included) to the first generated token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "edgefleet_node_time_per_output_token_seconds",
            "Mean time per generated token after the first, per generation",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "edgefleet_node_prompt_tokens",
            "Prompt tokens read",
            ["model"],
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "edgefleet_node_generation_tokens",
            "Tokens generated",
            ["model"],
            registry=self.registry,
        )

    def watch(self, node) -> None:
        """Live gauges (slots, queue, models) read from the node at scrape time."""
        self.registry.register(_NodeStateCollector(node))

    def serve(self, address: str) -> int:
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host or "127.0.0.1", registry=self.registry
        )
        return server.server_port


class _NodeStateCollector:
    def __init__(self, node) -> None:
        self._node = node

    def collect(self):
        capacity = self._node.capacity()
        slots = GaugeMetricFamily(
            "edgefleet_node_slots", "Generation slots by state", labels=["model", "state"]
        )
        queue = GaugeMetricFamily(
            "edgefleet_node_queue_depth", "Requests waiting for a slot", labels=["model"]
        )
        memory = GaugeMetricFamily(
            "edgefleet_node_model_memory_bytes", "Memory the model's load added", labels=["model"]
        )
        for model in capacity.models:
            slots.add_metric([model.alias, "busy"], model.slots_total - model.slots_free)
            slots.add_metric([model.alias, "free"], model.slots_free)
            queue.add_metric([model.alias], model.queue_depth)
            memory.add_metric([model.alias], model.memory_bytes)
        yield slots
        yield queue
        yield memory
        yield from _decode_loop_metrics(self._node.models.hosted())
        yield GaugeMetricFamily(
            "edgefleet_node_models_loaded", "Models loaded", value=len(capacity.models)
        )
        yield GaugeMetricFamily(
            "edgefleet_node_draining", "1 while draining", value=int(capacity.draining)
        )
        yield GaugeMetricFamily(
            "edgefleet_node_tokens_per_second",
            "Generated tokens per second, recent window",
            value=capacity.tokens_per_second,
        )
        yield GaugeMetricFamily(
            "edgefleet_node_process_resident_bytes",
            "Resident memory of the node process",
            value=capacity.process_rss_bytes,
        )


# The decode loop's phases (StepTimings), as counters: rates give time per step.
DECODE_PHASES = ("admit", "batch", "decode", "sample", "handoff")


def _decode_loop_metrics(hosted):
    seconds = CounterMetricFamily(
        "edgefleet_node_decode_loop_seconds",
        "Decode-loop time by phase: admit, batch (building it), decode (llama_decode), "
        "sample (sampling, detokenizing), handoff (posting events to the event loop)",
        labels=["model", "phase"],
    )
    steps = CounterMetricFamily(
        "edgefleet_node_decode_steps", "Batched decode steps", labels=["model"]
    )
    tokens = CounterMetricFamily(
        "edgefleet_node_decode_tokens",
        "Tokens decoded in batches, by kind (generated, prompt)",
        labels=["model", "kind"],
    )
    delay = CounterMetricFamily(
        "edgefleet_node_handoff_delay_seconds",
        "From the decode loop posting a step's events to the event loop running them",
        labels=["model"],
    )
    handoffs = CounterMetricFamily(
        "edgefleet_node_handoffs", "Steps' events run by the event loop", labels=["model"]
    )
    for model in hosted:
        timings = getattr(model.instance, "step_timings", lambda: None)()
        if timings is None:  # a runtime without a decode loop of its own
            continue
        for phase in DECODE_PHASES:
            seconds.add_metric([model.name, phase], getattr(timings, f"{phase}_s"))
        steps.add_metric([model.name], timings.steps)
        tokens.add_metric([model.name, "generated"], timings.generated_tokens)
        tokens.add_metric([model.name, "prompt"], timings.prompt_tokens)
        delay.add_metric([model.name], timings.handoff_delay_s)
        handoffs.add_metric([model.name], timings.handoffs)
    yield from (seconds, steps, tokens, delay, handoffs)
