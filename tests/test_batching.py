"""Continuous batching on a real node: concurrent streams share one llama.cpp
context and are decoded together, yet each gets exactly the text it gets alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from edgefleet.v1 import common_pb2, node_pb2
from tests.helpers import chat_request, collect, node_stub, rpc_error, wait_until

SLOTS = 8

PROMPTS = [
    "Describe the sea in two sentences.",
    "List four fruits and their colours.",
    "Explain what a kiosk is.",
    "Write a short poem about rain.",
    "Describe the city of Paris.",
    "Give three tips for sleeping well.",
    "Tell me a fact about cats.",
    "How does a bicycle work?",
]


@pytest.fixture(scope="module")
def batching_node(tmp_path_factory, default_model_path):
    from tests.conftest import NodeFactory

    factory = NodeFactory(tmp_path_factory.mktemp("batching-node"))
    node = factory.start(slots=SLOTS, queue=SLOTS)
    yield node
    factory.stop_all()


def _timed_stream(stub, request):
    """Text, chunks and (first chunk, last chunk) arrival times of one stream."""
    chunks, times = [], []
    for chunk in stub.Generate(request):
        chunks.append(chunk)
        times.append(time.monotonic())
    return "".join(c.text for c in chunks), chunks, (times[0], times[-1])


def test_concurrent_streams_match_their_solo_output(batching_node):
    channel, stub = node_stub(batching_node.address)
    with channel:
        # Each stream gets its own stop string, cut from its own full reply,
        # and its own max_tokens, so per-slot settings are exercised too.
        full = [
            collect(stub.Generate(chat_request(p, temperature=0, max_tokens=48)))[0]
            for p in PROMPTS
        ]
        requests = []
        for i, (prompt, text) in enumerate(zip(PROMPTS, full, strict=True)):
            words = text.split()
            assert len(words) > 6, f"reply {i} too short to cut a stop string from: {text!r}"
            requests.append(
                chat_request(prompt, temperature=0, max_tokens=40 + i, stop=[words[4 + i % 3]])
            )
        solo = [collect(stub.Generate(r))[0] for r in requests]
        with ThreadPoolExecutor(SLOTS) as pool:
            together = list(pool.map(lambda r: _timed_stream(stub, r), requests))

    for i, (alone, (text, chunks, _)) in enumerate(zip(solo, together, strict=True)):
        assert text == alone, f"stream {i} changed when batched: {alone!r} vs {text!r}"
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP_SEQUENCE, i
        stop = requests[i].sampling.stop[0]
        assert stop not in text and full[i].startswith(text), i
    # They really ran together: every stream had started before any had ended.
    first_end = min(end for _, _, (_, end) in together)
    assert all(start < first_end for _, _, (start, _) in together)


def test_cancelling_one_stream_leaves_the_others_intact(batching_node):
    channel, stub = node_stub(batching_node.address)
    prompts = PROMPTS[:4]
    with channel:
        solo = [
            collect(stub.Generate(chat_request(p, temperature=0, max_tokens=60)))[0]
            for p in prompts
        ]
        victim = stub.Generate(
            chat_request("Count slowly from one to two hundred.", temperature=0, max_tokens=400)
        )
        got_some = threading.Event()

        def read_victim():
            received = 0
            try:
                for _ in victim:
                    received += 1
                    if received == 5:
                        got_some.set()
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.CANCELLED
            return received

        with ThreadPoolExecutor(len(prompts) + 1) as pool:
            victim_reader = pool.submit(read_victim)
            others = [
                pool.submit(collect, stub.Generate(chat_request(p, temperature=0, max_tokens=60)))
                for p in prompts
            ]
            assert got_some.wait(60), "the long stream never started"
            victim.cancel()
            texts = [future.result()[0] for future in others]
            assert victim_reader.result() < 400

        assert texts == solo
        # The cancelled sequence gave its slot back.
        wait_until(
            lambda: stub.GetCapacity(node_pb2.GetCapacityRequest()).slots_free == SLOTS,
            what="all slots free after the cancel",
        )
        after, _ = collect(stub.Generate(chat_request(prompts[0], temperature=0, max_tokens=60)))
    assert after == solo[0]


def test_next_turn_reuses_the_cached_conversation(batching_node):
    channel, stub = node_stub(batching_node.address)
    with channel:
        first_request = chat_request(
            "Name a large animal.",
            system="You are a zoo guide. " + "Animals: elephant, giraffe, hippo, rhino. " * 8,
            temperature=0,
            max_tokens=20,
        )
        reply, chunks = collect(stub.Generate(first_request))
        first_prompt = chunks[-1].usage.prompt_tokens
        # Another request in between: the node still picks the slot holding
        # this conversation for its next turn.
        collect(stub.Generate(chat_request("Say one word.", temperature=0, max_tokens=4)))
        second = node_pb2.GenerateRequest(
            model=first_request.model,
            messages=[
                *first_request.messages,
                common_pb2.ChatMessage(role="assistant", content=reply),
                common_pb2.ChatMessage(role="user", content="Where does it live?"),
            ],
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=20),
        )
        _, chunks = collect(stub.Generate(second))
    usage = chunks[-1].usage
    assert usage.prompt_tokens > first_prompt
    # The whole first prompt came from the cache; only the new turn was read.
    assert usage.cached_prompt_tokens >= first_prompt


def test_a_short_repeated_prompt_finds_the_slot_that_holds_it(batching_node):
    """An agent's short system prompt and question, sent again after other
    requests took other slots: its slot is chosen again and only the last
    token is read (prefix reuse at any length, not only above a threshold)."""
    channel, stub = node_stub(batching_node.address)
    with channel:
        repeated = chat_request("Is it open today?", system="You answer briefly.", max_tokens=2)
        collect(stub.Generate(repeated))
        for prompt in PROMPTS[:3]:
            collect(stub.Generate(chat_request(prompt, max_tokens=2)))
        _, chunks = collect(stub.Generate(repeated))
    usage = chunks[-1].usage
    assert usage.prompt_tokens < 64
    assert usage.cached_prompt_tokens == usage.prompt_tokens - 1


def test_grammars_apply_per_stream_and_a_bad_one_is_refused(batching_node):
    channel, stub = node_stub(batching_node.address)
    yes_no = chat_request("Is the sea wet?", temperature=0, max_tokens=8)
    yes_no.constraint.gbnf = 'root ::= "yes" | "no"'
    free = chat_request("Describe the sea.", temperature=0, max_tokens=24)
    bad = chat_request("Hi", max_tokens=4)
    bad.constraint.gbnf = "root ::= ("
    with channel:
        with ThreadPoolExecutor(2) as pool:
            constrained, unconstrained = pool.map(
                lambda r: collect(stub.Generate(r))[0], [yes_no, free]
            )
        error = rpc_error(lambda: stub.Generate(bad))
        after, _ = collect(stub.Generate(chat_request("Say hi.", temperature=0, max_tokens=4)))
    assert constrained in ("yes", "no")
    assert len(unconstrained.split()) > 3  # the other stream was not constrained
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grammar" in error.details()
    assert after.strip()


def test_a_turn_whose_slot_is_busy_copies_the_cached_prefix(batching_node):
    """The slot holding a long conversation is busy: the next turn lands on
    another slot, which takes the conversation's cache instead of re-reading it."""
    channel, stub = node_stub(batching_node.address)
    facts = " ".join(
        f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(40)
    )
    history = [
        common_pb2.ChatMessage(role="system", content=facts),
        common_pb2.ChatMessage(role="user", content="Is 7 odd?"),
    ]

    def turn(question: str, max_tokens: int) -> node_pb2.GenerateRequest:
        return node_pb2.GenerateRequest(
            model="smollm2-135m",
            messages=[
                *history,
                common_pb2.ChatMessage(role="assistant", content="Yes."),
                common_pb2.ChatMessage(role="user", content=question),
            ],
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens),
        )

    with channel:
        _, chunks = collect(
            stub.Generate(
                node_pb2.GenerateRequest(
                    model="smollm2-135m",
                    messages=history,
                    sampling=common_pb2.SamplingParams(temperature=0, max_tokens=8),
                )
            )
        )
        history_tokens = chunks[-1].usage.prompt_tokens
        assert history_tokens > 300
        # Occupy the conversation's slot with a long generation of its own.
        busy = stub.Generate(turn("List every fact again, one per line.", 400))
        next(busy)  # admitted: holds the slot
        _, chunks = collect(stub.Generate(turn("Is 8 even?", 8)))
        busy.cancel()
    assert chunks[-1].usage.cached_prompt_tokens >= history_tokens - 8
