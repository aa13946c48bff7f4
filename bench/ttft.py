"""Time to first token, for a fresh prompt and for the same prompt again.

Part of the node-concurrency scenario. For each configured slot count, side by
side, every side of every slot count in turns (so machine noise hits all alike):

- the edgefleet node (gRPC, ``--slots N``);
- llama-cpp-python in this process (``Llama``, flash attention, same threads):
  the engine with nothing around it;
- llama.cpp's ``llama-server -np N``, when installed.

A fresh prompt starts with a system line no earlier request had, so nothing
of it is cached; the repeated prompt is the same request sent again at once,
which every side may answer from its cache. One token is asked for; the time
is from sending the request to receiving that token. The hop cost (a gRPC or
HTTP round trip on loopback, nothing computed) is measured too, so the node
can be compared with the engine plus what a call costs.
"""

from __future__ import annotations

import itertools
import statistics
import time
import uuid

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.streams import sse_event
from edgefleet.v1 import common_pb2, node_pb2, node_pb2_grpc

# An agent's turn in miniature: a short system line and a question (about 60
# tokens with SmolLM2's chat template: below the old 64-token reuse threshold).
SYSTEM = "You are a careful assistant for a shop's staff. Answer briefly."
QUESTION = "A customer asks whether the blue kettle comes with a two year warranty. What do I say?"

_fresh = itertools.count()


def messages(fresh: bool) -> list[dict]:
    """The test conversation; ``fresh`` puts a never-seen line first."""
    first = f"Ticket {uuid.uuid4().hex[:12]}-{next(_fresh)}. " if fresh else ""
    return [
        {"role": "system", "content": first + SYSTEM},
        {"role": "user", "content": QUESTION},
    ]


class NodeSide:
    name = "edgefleet node"

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = node_pb2_grpc.NodeServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def first_token_s(self, conversation: list[dict]) -> float:
        request = node_pb2.GenerateRequest(
            model="smollm2-135m",
            messages=[common_pb2.ChatMessage(**m) for m in conversation],
            sampling=common_pb2.SamplingParams(max_tokens=1, temperature=0),
        )
        started = time.perf_counter()
        first = None
        for chunk in self._stub.Generate(request):
            if first is None and (chunk.text or chunk.finish_reason):
                first = time.perf_counter() - started
            if chunk.finish_reason:
                # The node's own account: arrival to slot (template, tokens,
                # queue), then slot to first token (the decode loop).
                self.parts = {
                    "arrival_to_slot_ms": chunk.timings.queue_ms,
                    "slot_to_token_ms": chunk.timings.prompt_ms,
                    "cached_prompt_tokens": chunk.usage.cached_prompt_tokens,
                    "prompt_tokens": chunk.usage.prompt_tokens,
                }
        if first is None:
            raise RuntimeError("the node sent no token")
        return first

    def hop_s(self) -> float:
        started = time.perf_counter()
        self._health.Check(health_pb2.HealthCheckRequest())
        return time.perf_counter() - started

    def close(self) -> None:
        self._channel.close()


class DirectSide:
    """llama-cpp-python in this process: what the engine takes, nothing around it."""

    name = "llama-cpp-python direct"

    def __init__(self, model_path, context: int, threads: int) -> None:
        from llama_cpp import Llama

        self._llm = Llama(
            str(model_path),
            n_ctx=context,
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=True,  # as the node and llama-server on CPU
            verbose=False,
        )

    def first_token_s(self, conversation: list[dict]) -> float:
        started = time.perf_counter()
        for _ in self._llm.create_chat_completion(
            conversation, max_tokens=1, temperature=0, stream=True
        ):
            pass  # the role chunk, the token, the finish: all within one token's time
        return time.perf_counter() - started

    def hop_s(self) -> float:
        return 0.0

    def close(self) -> None:
        self._llm.close()


class LlamaServerSide:
    name = "llama.cpp llama-server"

    def __init__(self, base: str) -> None:
        self._base = base
        self._client = httpx.Client(timeout=120)

    def first_token_s(self, conversation: list[dict]) -> float:
        body = {"messages": conversation, "max_tokens": 1, "temperature": 0, "stream": True}
        started = time.perf_counter()
        with self._client.stream("POST", self._base + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                event = sse_event(line)
                if event is None:
                    continue
                choices = event.get("choices") or [{}]
                delta = choices[0].get("delta") or {}
                if delta.get("content") or choices[0].get("finish_reason"):
                    return time.perf_counter() - started
        raise RuntimeError("llama-server sent no token")

    def hop_s(self) -> float:
        started = time.perf_counter()
        self._client.get(self._base + "/health").raise_for_status()
        return time.perf_counter() - started

    def close(self) -> None:
        self._client.close()


def measure(groups: dict[str, list], rounds: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per group (a configured slot count) and side: median fresh and
    repeated TTFT (ms) and hop (ms); for the node also its own account of
    each (``parts``). Every side of every group takes its turn in each round,
    so the machine's drift from one minute to the next hits all alike (a
    group measured after another would compare two speeds of the machine)."""
    keys = [(group, side) for group, sides in groups.items() for side in sides]
    samples = {(g, s.name): {"fresh": [], "repeated": [], "hop": []} for g, s in keys}
    parts = {(g, s.name): {"fresh": [], "repeated": []} for g, s in keys}
    for _, side in keys:  # warm each side once (first calls allocate)
        side.first_token_s(messages(fresh=True))
    for _ in range(rounds):
        for group, side in keys:
            conversation = messages(fresh=True)
            for kind in ("fresh", "repeated"):
                samples[group, side.name][kind].append(side.first_token_s(conversation) * 1000)
                if getattr(side, "parts", None):
                    parts[group, side.name][kind].append(side.parts)
            samples[group, side.name]["hop"].append(
                statistics.median(side.hop_s() for _ in range(5)) * 1000
            )
    results: dict[str, dict[str, dict]] = {group: {} for group in groups}
    for (group, name), s in samples.items():
        result = results[group][name] = {
            "fresh_ms": statistics.median(s["fresh"]),
            "repeated_ms": statistics.median(s["repeated"]),
            "hop_ms": statistics.median(s["hop"]),
            "fresh_samples_ms": s["fresh"],
            "repeated_samples_ms": s["repeated"],
        }
        for kind, accounts in parts[group, name].items():
            if accounts:
                result[f"{kind}_node_parts"] = {
                    key: statistics.median(a[key] for a in accounts) for key in accounts[0]
                }
    return results
