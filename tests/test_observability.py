"""Traces across coordinator and node processes, Prometheus metrics, log context."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.errors import InvalidArgument
from edgefleet.local.otlp_receiver import OtlpReceiver, span_tree
from edgefleet.local.processes import free_port
from edgefleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from tests.helpers import chat_request, collect, node_stub, rpc_error, wait_until

SERVER, CLIENT = 2, 3  # OTLP span kinds
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def receiver():
    otlp = OtlpReceiver().start()
    yield otlp
    otlp.stop()


def chat_with_traceparent(address: str, session_id: str, content: str, **sampling):
    """A raw gRPC chat turn that carries the caller's W3C trace context."""
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        request = coordinator_pb2.ChatRequest(
            session_id=session_id,
            content=content,
            sampling=common_pb2.SamplingParams(**sampling),
        )
        metadata = (("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),)
        return list(stub.Chat(request, metadata=metadata))


def test_a_chat_is_one_trace_from_the_coordinator_through_the_node(fleet_factory, receiver):
    env = receiver.exporter_env()
    coordinator = fleet_factory.coordinator(env=env)
    fleet_factory.node("n1", env=env)
    fleet_factory.wait_ready_nodes(1)
    with fleet_factory.client() as client:
        session = client.create_session("smollm2-135m")
    chunks = chat_with_traceparent(
        coordinator.address, session.session_id, "Say hi.", max_tokens=12, temperature=0
    )
    usage = chunks[-1].usage
    spans = receiver.wait_for(
        lambda all_spans: (
            (found := [s for s in all_spans if s.trace_id == TRACE_ID])
            and any(s.name == "generation" for s in found)
            and any(s.service == "edgefleet-coordinator" and s.kind == SERVER for s in found)
            and found
        ),
    )
    assert spans, "no spans of the caller's trace arrived"
    by_name = {}
    for span in spans:
        by_name.setdefault((span.service, span.name), span)
    root = by_name[("edgefleet-coordinator", "chat smollm2-135m")]
    assert root.parent_id == "00f067aa0ba902b7", "the caller's traceparent was not joined"
    assert root.kind == SERVER
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["gen_ai.request.model"] == "smollm2-135m"
    assert root.attributes["gen_ai.request.max_tokens"] == 12
    assert root.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert root.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert root.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert root.attributes["edgefleet.session.id"] == session.session_id
    assert root.attributes["edgefleet.placement.policy"] == "scored"
    assert root.attributes["edgefleet.time_to_first_token_ms"] > 0
    placement = by_name[("edgefleet-coordinator", "placement")]
    assert placement.parent_id == root.span_id
    assert placement.attributes["edgefleet.placement.candidates"][0].startswith("n1=")
    attempt = by_name[("edgefleet-coordinator", "attempt n1")]
    assert attempt.parent_id == root.span_id and attempt.kind == CLIENT
    assert attempt.attributes["edgefleet.failover.attempt"] == 0
    node_span = by_name[("edgefleet-node", "chat smollm2-135m")]
    assert node_span.parent_id == attempt.span_id, "the node's span must hang under the attempt"
    assert node_span.attributes["edgefleet.node.id"] == "n1"
    assert node_span.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    node_children = {s.name for s in spans if s.parent_id == node_span.span_id}
    assert {"queue", "prompt_processing", "generation"} <= node_children
    # Prompt and reply text stay out of traces unless asked for.
    assert not any("edgefleet.prompt" in s.attributes for s in spans)
    tree = span_tree(spans)
    assert [r.span_id for r in tree] == [root.span_id]


def test_a_failover_is_one_trace_with_two_attempts_and_a_failover_event(fleet_factory, receiver):
    from tests.test_chaos import LONG, Reader

    env = receiver.exporter_env()
    fleet_factory.coordinator(env=env)
    nodes = {n: fleet_factory.node(n, env=env) for n in ("n1", "n2")}
    fleet_factory.wait_ready_nodes(2)
    with fleet_factory.client() as client:
        reader = Reader(
            client.complete("smollm2-135m", [("user", LONG)], max_tokens=80, temperature=0)
        )
        reader.wait_text()
        victim = reader.nodes()[0]
        nodes[victim].kill()
        reader.finish()
    survivor = reader.nodes()[-1]

    def failover_trace(all_spans):
        roots = [
            s
            for s in all_spans
            if s.name == "chat smollm2-135m"
            and s.service == "edgefleet-coordinator"
            and any(name == "failover" for name, _ in s.events)
        ]
        if not roots:
            return None
        mine = [s for s in all_spans if s.trace_id == roots[0].trace_id]
        return mine if any(s.name == f"attempt {survivor}" for s in mine) else None

    spans = receiver.wait_for(failover_trace)
    assert spans, "no trace with a failover arrived"
    root = next(s for s in spans if s.name == "chat smollm2-135m" and not s.parent_id)
    attempts = sorted((s for s in spans if s.name.startswith("attempt ")), key=lambda s: s.start_ns)
    assert [a.name for a in attempts] == [f"attempt {victim}", f"attempt {survivor}"]
    assert [a.attributes["edgefleet.failover.attempt"] for a in attempts] == [0, 1]
    assert attempts[0].status_code == 2 and attempts[1].status_code != 2
    [(_, event)] = [e for e in root.events if e[0] == "failover"]
    assert event["edgefleet.node.id"] == victim
    assert event["edgefleet.failover.cause"] == "stream_error"
    assert root.attributes["edgefleet.failovers"] == 1


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_on_coordinator_and_node_count_known_traffic(fleet_factory):
    coordinator = fleet_factory.coordinator()
    metrics_address = f"127.0.0.1:{free_port()}"
    fleet_factory.node("n1", extra_args=("--metrics", metrics_address))
    fleet_factory.wait_ready_nodes(1)
    node_url = f"http://{metrics_address}/metrics"
    coordinator_url = f"http://{coordinator.extra['http']}/metrics"
    node_before, coordinator_before = scrape(node_url), scrape(coordinator_url)
    produced = 0
    with fleet_factory.client() as client:
        for _ in range(3):
            last = list(client.complete("smollm2-135m", [("user", "Hi")], max_tokens=6))[-1]
            produced += last.usage.completion_tokens
        with pytest.raises(InvalidArgument):
            list(client.complete("smollm2-135m", [("user", "Hi")], max_tokens=0))
    node_after = wait_until(
        lambda: (
            (s := scrape(node_url))
            and value(s, "edgefleet_node_requests_total", model="smollm2-135m", status="OK") >= 3
            and s
        ),
        what="the node's counters",
    )
    coordinator_after = scrape(coordinator_url)

    def moved(before, after, name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert (
        moved(
            node_before,
            node_after,
            "edgefleet_node_requests_total",
            model="smollm2-135m",
            status="OK",
        )
        == 3
    )
    assert (
        moved(
            node_before, node_after, "edgefleet_node_generation_tokens_total", model="smollm2-135m"
        )
        == produced
    )
    assert (
        moved(
            node_before,
            node_after,
            "edgefleet_node_time_to_first_token_seconds_count",
            model="smollm2-135m",
        )
        == 3
    )
    assert value(node_after, "edgefleet_node_slots", model="smollm2-135m", state="free") == 2
    # The decode loop's own account: every token but each reply's last was fed
    # back in a batch, one stream at a time here (a step per token), and the
    # time went somewhere, mostly into llama_decode.
    model = {"model": "smollm2-135m"}
    fed = moved(
        node_before, node_after, "edgefleet_node_decode_tokens_total", kind="generated", **model
    )
    assert produced - 3 <= fed <= produced
    assert (
        moved(node_before, node_after, "edgefleet_node_decode_tokens_total", kind="prompt", **model)
        > 0
    )
    steps = moved(node_before, node_after, "edgefleet_node_decode_steps_total", **model)
    assert steps >= fed
    phases = {
        phase: moved(
            node_before,
            node_after,
            "edgefleet_node_decode_loop_seconds_total",
            phase=phase,
            **model,
        )
        for phase in ("admit", "batch", "decode", "sample", "handoff")
    }
    assert all(seconds >= 0 for seconds in phases.values())
    assert phases["decode"] == max(phases.values()) > 0
    assert moved(node_before, node_after, "edgefleet_node_handoffs_total", **model) >= steps
    assert value(node_after, "edgefleet_node_models_loaded") == 1
    assert (
        moved(
            coordinator_before,
            coordinator_after,
            "edgefleet_requests_total",
            method="Complete",
            status="OK",
        )
        == 3
    )
    assert (
        moved(
            coordinator_before,
            coordinator_after,
            "edgefleet_requests_total",
            method="Complete",
            status="INVALID_ARGUMENT",
        )
        == 1
    )
    assert (
        moved(
            coordinator_before,
            coordinator_after,
            "edgefleet_generation_tokens_total",
            model="smollm2-135m",
        )
        == produced
    )
    assert (
        moved(
            coordinator_before,
            coordinator_after,
            "edgefleet_placement_decisions_total",
            policy="scored",
            outcome="placed",
        )
        == 3
    )
    assert value(coordinator_after, "edgefleet_nodes", state="ready") == 1
    assert value(coordinator_after, "edgefleet_fleet_slots", state="free") >= 0
    assert (
        value(coordinator_after, "edgefleet_etcd_operation_duration_seconds_count", operation="txn")
        > 0
    )
    assert value(coordinator_after, "edgefleet_failovers_total", cause="stream_error") == 0


def test_log_lines_inside_a_request_carry_its_trace_id(node_factory):
    node = node_factory.start(
        env={"EDGEFLEET_LOG_FORMAT": "json", "OTEL_TRACES_EXPORTER": "discard"}
    )
    channel, stub = node_stub(node.address)
    with channel:
        request = chat_request("Hi", max_tokens=0)
        metadata = (("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),)
        rpc_error(lambda: stub.Generate(request, metadata=metadata))
        collect(stub.Generate(chat_request("Hi", max_tokens=2)))
    lines = [
        json.loads(line) for line in node.log_path.read_text().splitlines() if line.startswith("{")
    ]
    refused = [line for line in lines if "refused" in line["message"]]
    assert refused and refused[0]["trace_id"] == TRACE_ID
    assert all("trace_id" not in line for line in lines if "listening on" in line["message"])


def test_tracing_off_by_default(node_factory):
    node = node_factory.start()
    assert "tracing on" not in node.log_path.read_text()
    os.kill(node.pid, signal.SIGTERM)


def test_an_http_request_with_traceparent_joins_the_callers_trace(fleet_factory, receiver):
    import httpx

    env = receiver.exporter_env()
    coordinator = fleet_factory.coordinator(env=env)
    fleet_factory.node("n1", env=env)
    fleet_factory.wait_ready_nodes(1)
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    reply = httpx.post(
        f"http://{coordinator.extra['http']}/v1/chat/completions",
        json={
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
        },
        headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
        timeout=60,
    )
    assert reply.status_code == 200
    spans = receiver.wait_for(
        lambda all_spans: (
            (found := [s for s in all_spans if s.trace_id == trace_id])
            and {s.service for s in found} == {"edgefleet-coordinator", "edgefleet-node"}
            and any(s.kind == SERVER and s.service == "edgefleet-coordinator" for s in found)
            and found
        ),
    )
    assert spans, "the HTTP request's spans did not join the caller's trace"
    root = next(s for s in spans if s.kind == SERVER and s.service == "edgefleet-coordinator")
    assert root.parent_id == "b7ad6b7169203331"
    assert (
        root.attributes["gen_ai.usage.output_tokens"] == reply.json()["usage"]["completion_tokens"]
    )
