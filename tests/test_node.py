"""A real node process serving the real default model over gRPC."""

from __future__ import annotations

import json
import shutil
import signal
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgefleet.errors import Reason, reason_of
from edgefleet.local.processes import health_status
from edgefleet.v1 import common_pb2, node_pb2
from tests.helpers import chat_request, collect, node_stub, rpc_error, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --- streaming a real completion --------------------------------------------------


def test_streams_a_real_completion_with_usage(shared_node):
    channel, stub = node_stub(shared_node.address)
    with channel:
        text, chunks = collect(stub.Generate(chat_request("Say hello.", max_tokens=40)))
    assert text.strip(), "the model produced no text"
    assert [c.seq for c in chunks] == list(range(len(chunks))), "sequence numbers have gaps"
    assert len(chunks) > 3, "the reply should arrive as a stream, not one message"
    last = chunks[-1]
    assert last.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert last.usage.prompt_tokens > 5
    assert 0 < last.usage.completion_tokens <= 40
    assert sum(c.token_count for c in chunks) == last.usage.completion_tokens
    assert last.timings.time_to_first_token_ms > 0
    assert all(c.node_id == chunks[0].node_id for c in chunks)


def test_max_tokens_and_length_finish(shared_node):
    channel, stub = node_stub(shared_node.address)
    with channel:
        _, chunks = collect(
            stub.Generate(chat_request("Write a very long story.", max_tokens=5, temperature=0))
        )
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_seed_makes_sampling_repeatable(shared_node):
    channel, stub = node_stub(shared_node.address)
    request = chat_request("Invent a name for a cat.", temperature=1.0, seed=1234, max_tokens=24)
    with channel:
        first, _ = collect(stub.Generate(request))
        second, _ = collect(stub.Generate(request))
        other, _ = collect(
            stub.Generate(
                chat_request("Invent a name for a cat.", temperature=1.0, seed=99, max_tokens=24)
            )
        )
    assert first == second
    assert first != other, "different seeds should give different samples"


def test_stop_string_ends_generation_and_is_not_sent(shared_node):
    channel, stub = node_stub(shared_node.address)
    with channel:
        full, _ = collect(
            stub.Generate(chat_request("Tell me about the sea.", temperature=0, max_tokens=40))
        )
        words = full.split()
        assert len(words) > 4
        stop = words[3]
        cut, chunks = collect(
            stub.Generate(
                chat_request("Tell me about the sea.", temperature=0, max_tokens=40, stop=[stop])
            )
        )
    assert cut == full[: full.index(stop)]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP_SEQUENCE


def test_continues_a_partial_assistant_reply_without_repeating_it(shared_node):
    channel, stub = node_stub(shared_node.address)
    with channel:
        full, _ = collect(
            stub.Generate(chat_request("Describe a forest.", temperature=0, max_tokens=48))
        )
        cut = full.index(" ", len(full) // 3)  # cut on a word boundary
        request = chat_request("Describe a forest.", temperature=0, max_tokens=16)
        request.assistant_prefix = full[:cut]
        continuation, _ = collect(stub.Generate(request))
    assert continuation, "no continuation was generated"
    assert full.startswith(full[:cut] + continuation), (
        f"continuation diverged:\nfull: {full!r}\nprefix+cont: {full[:cut] + continuation!r}"
    )


# --- slots, queue, cancellation -------------------------------------------------------


def _first_chunk(stream):
    """Wait until a stream has been admitted to a slot (its first message)."""
    return next(stream)


def test_parallel_slots_bounded_queue_and_cancel_frees_a_slot(node_factory):
    node = node_factory.start(slots=2, queue=1)
    channel, stub = node_stub(node.address)
    # At temperature 0 this prompt loops until max_tokens: the slots stay busy.
    long_request = chat_request("Write a very long story.", temperature=0, max_tokens=1500)
    long_request.origin = "coordinator-a"
    with channel:
        running = [stub.Generate(long_request) for _ in range(2)]
        for stream in running:
            _first_chunk(stream)  # both hold a slot
        other = chat_request("Write a very long story.", temperature=0, max_tokens=1500)
        other.origin = "coordinator-b"
        queued = stub.Generate(other)
        admitted = threading.Event()
        threading.Thread(target=lambda: (_first_chunk(queued), admitted.set()), daemon=True).start()
        wait_until(
            lambda: stub.GetCapacity(node_pb2.GetCapacityRequest()).queue_depth == 1,
            what="the third request to queue",
        )
        refused = rpc_error(lambda: stub.Generate(long_request))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in refused.details()
        assert any(k == "retry-after-ms" for k, _ in refused.trailing_metadata())
        # Each coordinator sees which of the node's generations are its own
        # (running or queued; the refused one is not counted).
        by_origin = stub.GetCapacity(node_pb2.GetCapacityRequest()).active_by_origin
        assert dict(by_origin) == {"coordinator-a": 2, "coordinator-b": 1}
        # The refusal came while both slots were still generating.
        assert all(stream.running() for stream in running)
        assert not admitted.is_set()
        # The queued request was told so at once (its headers), before any slot.
        assert ("edgefleet-queued", "1") in tuple(queued.initial_metadata())

        running[0].cancel()  # the client goes away: its slot goes to the queued request
        assert admitted.wait(30), "the queued request never got the freed slot"
        running[1].cancel()
        queued.cancel()
        capacity = wait_until(
            lambda: (c := stub.GetCapacity(node_pb2.GetCapacityRequest())).slots_free == 2 and c,
            what="all slots to be free again",
        )
    assert capacity.queue_depth == 0 and capacity.active_generations == 0
    assert not capacity.active_by_origin


def test_a_continued_reply_takes_the_reserved_slot_on_a_full_node(node_factory):
    node = node_factory.start(slots=1, queue=0)  # and one continuation slot by default
    channel, stub = node_stub(node.address)
    long_request = chat_request("Write a very long story.", temperature=0, max_tokens=1500)
    with channel:
        running = stub.Generate(long_request)
        _first_chunk(running)
        [model] = stub.GetCapacity(node_pb2.GetCapacityRequest()).models
        assert (model.slots_free, model.continuation_slots_total) == (0, 1)
        # A client's own assistant_prefix is no continuation: the node is full for it.
        prefixed = chat_request("Write a very long story.", temperature=0, max_tokens=8)
        prefixed.assistant_prefix = "Once upon a time"
        refused = rpc_error(lambda: next(stub.Generate(prefixed)))
        assert reason_of(refused) is Reason.QUEUE_FULL
        # A coordinator's continuation gets the reserved slot at once and finishes.
        prefixed.continuation = True
        text, _ = collect(stub.Generate(prefixed))
        assert text and running.running()
        running.cancel()
        wait_until(
            lambda: (
                (m := stub.GetCapacity(node_pb2.GetCapacityRequest()).models[0]).slots_free == 1
                and m.continuation_slots_free == 1
            ),
            what="both slots free again",
        )


def test_a_constrained_reply_resumes_its_grammar_after_the_text_already_sent(shared_node):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "facts": {
                "type": "array",
                "items": {"type": "string", "maxLength": 40},
                "maxItems": 3,
            },
        },
        "required": ["city", "facts"],
    }

    def constrained(max_tokens, prefix=""):
        request = chat_request("Describe Lisbon as JSON.", temperature=0, max_tokens=max_tokens)
        request.constraint.json_schema = json.dumps(schema)
        request.assistant_prefix = prefix
        return request

    channel, stub = node_stub(shared_node.address)
    with channel:
        full, _ = collect(stub.Generate(constrained(200)))
        prefix = full[: max(2, len(full) // 2)]
        rest, _ = collect(stub.Generate(constrained(200, prefix)))
        document = json.loads(prefix + rest)  # one document, not a second one started mid-way
        assert set(document) == {"city", "facts"}
        # A prefix the grammar cannot produce is the request's error; the node carries on.
        error = rpc_error(lambda: collect(stub.Generate(constrained(8, "no json here"))))
        assert (error.code(), reason_of(error)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.BAD_GRAMMAR,
        )
        assert collect(stub.Generate(chat_request("Hi", max_tokens=4)))[0]


def test_concurrent_streams_all_complete(node_factory):
    node = node_factory.start(slots=3, queue=0)
    channel, stub = node_stub(node.address)
    results = [None] * 3

    def run(i):
        results[i] = collect(stub.Generate(chat_request(f"Say a word about {i}.", max_tokens=30)))

    with channel:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for text, chunks in results:
        assert text.strip() and chunks[-1].usage.completion_tokens > 0


# --- bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "code", "needle", "reason"),
    [
        (
            lambda r: setattr(r, "model", "no-such-model"),
            "NOT_FOUND",
            "unknown model alias",
            "UNKNOWN_MODEL",
        ),
        (
            lambda r: setattr(r, "model", "gemma3-270m"),
            "FAILED_PRECONDITION",
            "not loaded",
            "MODEL_NOT_LOADED",
        ),
        (
            lambda r: r.ClearField("messages"),
            "INVALID_ARGUMENT",
            "messages must not be empty",
            "BAD_MESSAGES",
        ),
        (
            lambda r: setattr(r.messages[0], "role", "wizard"),
            "INVALID_ARGUMENT",
            "role",
            "BAD_MESSAGES",
        ),
        (
            lambda r: setattr(r.sampling, "max_tokens", 0),
            "INVALID_ARGUMENT",
            "max_tokens",
            "BAD_SAMPLING",
        ),
        (
            lambda r: setattr(r.sampling, "max_tokens", -5),
            "INVALID_ARGUMENT",
            "max_tokens",
            "BAD_SAMPLING",
        ),
        (
            lambda r: setattr(r.sampling, "temperature", -0.5),
            "INVALID_ARGUMENT",
            "temperature",
            "BAD_SAMPLING",
        ),
        (lambda r: setattr(r.sampling, "top_p", 0.0), "INVALID_ARGUMENT", "top_p", "BAD_SAMPLING"),
        (
            lambda r: setattr(r.constraint, "json_schema", "{not json"),
            "INVALID_ARGUMENT",
            "json_schema",
            "BAD_SCHEMA",
        ),
    ],
    ids=[
        "unknown-alias",
        "not-loaded",
        "empty-messages",
        "unknown-role",
        "max-tokens-zero",
        "max-tokens-negative",
        "negative-temperature",
        "top-p-zero",
        "bad-json-schema",
    ],
)
def test_bad_generate_requests_get_clear_errors(shared_node, mutate, code, needle, reason):
    channel, stub = node_stub(shared_node.address)
    request = chat_request("Hi", max_tokens=8)
    mutate(request)
    with channel:
        error = rpc_error(lambda: stub.Generate(request))
        assert error.code() == getattr(grpc.StatusCode, code)
        assert needle in error.details()
        assert reason_of(error) is Reason[reason]  # what decisions read
        # The daemon keeps serving.
        text, _ = collect(stub.Generate(chat_request("Hi", max_tokens=4)))
        assert text


def test_prompt_longer_than_context_is_rejected(node_factory):
    node = node_factory.start(slots=1, extra_args=("--context", "256"))
    channel, stub = node_stub(node.address)
    with channel:
        error = rpc_error(lambda: stub.Generate(chat_request("word " * 400, max_tokens=8)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "context window is 256 tokens" in error.details()
        assert reason_of(error) is Reason.PROMPT_TOO_LONG
        text, _ = collect(stub.Generate(chat_request("Hi", max_tokens=4)))
        assert text


def test_load_model_errors(shared_node, tmp_path, default_model_path):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("this is not a model")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(default_model_path.read_bytes()[: 1 << 20])  # truncated GGUF
    channel, stub = node_stub(shared_node.address)
    cases = [
        ("no-such-alias", grpc.StatusCode.NOT_FOUND, "unknown model alias", "UNKNOWN_MODEL"),
        (str(tmp_path / "missing.gguf"), grpc.StatusCode.NOT_FOUND, "not found", "UNKNOWN_MODEL"),
        (str(not_gguf), grpc.StatusCode.INVALID_ARGUMENT, "not a GGUF file", "NOT_GGUF"),
        (str(corrupt), grpc.StatusCode.FAILED_PRECONDITION, "could not load", "MODEL_LOAD_FAILED"),
        ("smollm2-135m", grpc.StatusCode.ALREADY_EXISTS, "already loaded", "MODEL_LOADED"),
    ]
    with channel:
        for model, code, needle, reason in cases:
            error = rpc_error(lambda m=model: stub.LoadModel(node_pb2.LoadModelRequest(model=m)))
            assert error.code() == code, model
            assert needle in error.details(), model
            assert reason_of(error) is Reason[reason], model
        text, _ = collect(stub.Generate(chat_request("Hi", max_tokens=4)))
        assert text


def test_checksum_mismatch_is_refused(node_factory, tmp_path, default_model_path):
    store = tmp_path / "store"
    target = store / "smollm2-135m" / default_model_path.name
    target.parent.mkdir(parents=True)
    shutil.copyfile(default_model_path, target)
    with target.open("r+b") as f:  # flip bytes in the middle of the weights
        f.seek(target.stat().st_size // 2)
        f.write(b"\x00" * 64)
    env = {"EDGEFLEET_MODEL_DIR": str(store)}
    # At start-up: the node refuses to serve a corrupt model and exits non-zero.
    node = node_factory.start(wait=False, env=env)
    assert node.process.wait(60) == 1
    assert "checksum mismatch" in node.log_path.read_text()
    # At run time: LoadModel answers FAILED_PRECONDITION and the node keeps serving.
    other = node_factory.start(env=env, models=str(default_model_path))
    channel, stub = node_stub(other.address)
    with channel:
        error = rpc_error(lambda: stub.LoadModel(node_pb2.LoadModelRequest(model="smollm2-135m")))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "checksum mismatch" in error.details()
        text, _ = collect(
            stub.Generate(chat_request("Hi", model=str(default_model_path), max_tokens=4))
        )
        assert text


# --- models, capacity, health, drain ---------------------------------------------------


def test_load_list_unload_a_local_gguf(node_factory, default_model_path):
    node = node_factory.start()
    channel, stub = node_stub(node.address)
    path = str(default_model_path)
    with channel:
        loaded = stub.LoadModel(node_pb2.LoadModelRequest(model=path, slots=1))
        assert loaded.alias == path and loaded.slots_total == 1
        assert loaded.quantization == "Q4_1" and len(loaded.sha256) == 64
        listing = stub.ListModels(node_pb2.ListModelsRequest())
        assert {m.alias for m in listing.loaded} == {"smollm2-135m", path}
        catalog = {m.alias: m for m in listing.catalog}
        assert catalog["smollm2-135m"].loaded and catalog["smollm2-135m"].cached
        text, _ = collect(stub.Generate(chat_request("Hi", model=path, max_tokens=4)))
        assert text
        stub.UnloadModel(node_pb2.UnloadModelRequest(model=path))
        listing = stub.ListModels(node_pb2.ListModelsRequest())
        assert [m.alias for m in listing.loaded] == ["smollm2-135m"]
        error = rpc_error(lambda: stub.Generate(chat_request("Hi", model=path)))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_capacity_reports_host_models_and_throughput(shared_node):
    channel, stub = node_stub(shared_node.address)
    with channel:
        collect(stub.Generate(chat_request("Say hi.", max_tokens=16)))
        capacity = stub.GetCapacity(node_pb2.GetCapacityRequest())
    assert capacity.cpu_count >= 1
    assert capacity.memory_total_bytes > capacity.memory_available_bytes > 0
    assert capacity.process_rss_bytes > 50 * 2**20
    assert capacity.slots_total == 2 and capacity.slots_free == 2
    assert capacity.queue_limit == 8
    assert capacity.tokens_per_second > 0
    [model] = capacity.models
    assert model.alias == "smollm2-135m" and model.runtime == "llama.cpp"
    assert model.memory_bytes > 0 and model.file_size_bytes == 98_362_432
    assert model.context_length == 2048
    assert not capacity.simulated and not capacity.draining


def test_health_and_reflection(shared_node):
    assert health_status(shared_node.address) == SERVING
    assert health_status(shared_node.address, "edgefleet.v1.NodeService") == SERVING
    with grpc.insecure_channel(shared_node.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [reply] = list(stub.ServerReflectionInfo(iter([request])))
    services = {s.name for s in reply.list_services_response.service}
    assert {"edgefleet.v1.NodeService", "grpc.health.v1.Health"} <= services


def test_drain_stops_new_work_and_health_says_not_serving(node_factory):
    node = node_factory.start()
    channel, stub = node_stub(node.address)
    with channel:
        reply = stub.Drain(node_pb2.DrainRequest(drain=True))
        assert reply.draining
        assert health_status(node.address) == NOT_SERVING
        error = rpc_error(lambda: stub.Generate(chat_request("Hi")))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in error.details()
        stub.Drain(node_pb2.DrainRequest(drain=False))
        assert health_status(node.address) == SERVING
        text, _ = collect(stub.Generate(chat_request("Hi", max_tokens=4)))
        assert text


# --- shutdown --------------------------------------------------------------------------


def test_sigterm_lets_in_flight_stream_finish_then_exits_zero(node_factory):
    node = node_factory.start(extra_args=("--shutdown-grace", "30"))
    channel, stub = node_stub(node.address)
    with channel:
        stream = stub.Generate(chat_request("Tell me a story.", max_tokens=60))
        _first_chunk(stream)
        node.process.send_signal(signal.SIGTERM)
        chunks = list(stream)
    assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    assert chunks[-1].usage.completion_tokens > 0
    assert node.process.wait(60) == 0
    assert "stopped" in node.log_path.read_text()


def test_sigterm_cancels_streams_past_the_grace_deadline(node_factory):
    node = node_factory.start(extra_args=("--shutdown-grace", "1", "--context", "2048"))
    channel, stub = node_stub(node.address)
    with channel:
        stream = stub.Generate(
            chat_request("Write a very long story.", temperature=0, max_tokens=2000)
        )
        _first_chunk(stream)
        node.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as cancelled:
            list(stream)
    assert cancelled.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert node.process.wait(60) == 0
