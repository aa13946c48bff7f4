"""The OpenAI-compatible HTTP API, driven by the official openai SDK, on a real fleet."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.test_chaos import LONG

API_KEY = "sk-edgefleet-test"


@pytest.fixture
def api(fleet_factory):
    coordinator = fleet_factory.coordinator("--api-key", API_KEY)
    fleet_factory.node("n1")
    fleet_factory.wait_ready_nodes(1)
    base_url = f"http://{coordinator.extra['http']}/v1"
    client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120)
    yield client, base_url
    client.close()


def test_models_and_non_streaming_chat(api):
    client, _ = api
    models = client.models.list()
    # Served, then loadable on demand (no node has it loaded yet), then auto.
    assert [m.id for m in models.data] == ["smollm2-135m", "gemma3-270m", "auto"]
    loadable = models.data[1].model_dump()
    assert loadable["ready_nodes"] == 0 and loadable["loadable"] is True
    reply = client.chat.completions.create(
        model="smollm2-135m",
        messages=[
            {"role": "developer", "content": "You are terse."},
            {"role": "user", "content": "Say hello."},
        ],
        max_completion_tokens=16,
        temperature=0,
        seed=3,
        user="ada",
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == "smollm2-135m"


def test_streaming_chat_with_usage(api):
    client, _ = api
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chunks[0].choices[0].delta.role == "assistant"


def test_json_schema_reply_validates(api):
    client, _ = api
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Invent a person. Answer in JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema},
        },
        max_tokens=96,
        temperature=0,
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    as_object = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": 'Reply with {"color": "<a colour>"} only.'}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    assert as_object.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(as_object.choices[0].message.content), dict)


def test_errors_in_the_openai_shape(api):
    client, base_url = api
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    assert unauthorized.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["code"] == "model_not_found"
    bad_cases = [
        ({"messages": []}, "messages"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "tool", "content": "42", "tool_call_id": "call_1"}]},
            "messages.[0].tool_call_id",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ]
    for override, param in bad_cases:
        arguments = {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "x"}],
            **override,
        }
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**arguments)
        assert bad.value.status_code == 400
        assert bad.value.body["param"] == param, (override, bad.value.body)
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"frobnicate": True},
        )
    assert "frobnicate" in unknown.value.body["message"]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as raw:
        broken = raw.post("/chat/completions", content=b"{not json")
        assert broken.status_code == 400 and broken.json()["error"]["type"]
        huge = raw.post("/chat/completions", content=b"x" * (5 * 1024 * 1024))
        assert huge.status_code == 413 and "error" in huge.json()
    # Nothing broke: the API still answers.
    assert (
        client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        .choices[0]
        .message.content
        is not None
    )


def sdk(coordinator) -> openai.OpenAI:
    """The official openai client pointed at a coordinator's HTTP listener."""
    return openai.OpenAI(
        base_url=f"http://{coordinator.extra['http']}/v1",
        api_key="none",
        max_retries=0,
        timeout=120,
    )


def stream_through_a_fault(fleet_factory, coordinator, nodes, fault, max_tokens: int):
    """Stream a long reply over HTTP; once 40 characters arrived, apply ``fault``
    to the node generating it. Returns (text, last chunk, the node faulted)."""
    stream = sdk(coordinator).chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": LONG}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, victim, last = [], None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if victim is None and len("".join(text)) > 40:
            with fleet_factory.client() as grpc_client:
                busy = [
                    n.node_id
                    for n in grpc_client.status().nodes
                    if n.capacity.slots_free < n.capacity.slots_total
                ]
            victim = nodes[busy[0] if busy else "n1"]
            fault(victim)
        last = chunk
    return "".join(text), last, victim


def test_streaming_over_http_fails_over_when_the_node_dies(fleet_factory):
    coordinator = fleet_factory.coordinator()
    nodes = {n: fleet_factory.node(n) for n in ("n1", "n2")}
    fleet_factory.wait_ready_nodes(2)
    text, last, killed = stream_through_a_fault(
        fleet_factory, coordinator, nodes, lambda node: node.kill(), 120
    )
    assert killed is not None
    assert last.usage.completion_tokens == 120
    assert len(text) > 100


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def test_forced_tool_call_arguments_match_the_schema_and_the_tool_loop_works(api):
    client, _ = api
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model="smollm2-135m",
        messages=messages,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    # The agent loop: the call and its result go back; the model answers in text.
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    final = client.chat.completions.create(
        model="smollm2-135m",
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=40,
        temperature=0,
    )
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_required_tool_call_streams_as_tool_call_deltas(api):
    client, _ = api
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Weather in Oslo, in celsius?"}],
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=80,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas, "no tool_calls delta was streamed"
    call = deltas[0].tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_bad_tool_requests(api):
    client, _ = api
    cases = [
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
    ]
    for override, param in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": "x"}], **override
            )
        assert bad.value.body["param"] == param, (override, bad.value.body)


def test_auto_model_picks_by_task_and_reports_the_choice(fleet_factory):
    coordinator = fleet_factory.coordinator()
    fleet_factory.node("both", models="smollm2-135m,gemma3-270m")
    fleet_factory.wait_ready_nodes(1)
    client = sdk(coordinator)
    assert "auto" in [m.id for m in client.models.list().data]
    simple = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Hi there!"}], max_tokens=4
    )
    complex_ = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "Explain step by step why the sky is blue."}],
        max_tokens=4,
    )
    assert simple.model == "smollm2-135m"  # the smallest model served
    assert complex_.model == "gemma3-270m"  # the largest
    # /v1/responses takes "auto" too, by the same rule.
    response = client.responses.create(
        model="auto", input="Explain step by step why the sky is blue.", max_output_tokens=4
    )
    assert response.model == "gemma3-270m" and response.output_text


def test_task_complexity_heuristic():
    from coordinator.auto_model import choose, complexity

    assert complexity("Hi!", 1, False) == "simple"
    assert complexity("Why is the sky blue?", 1, False) == "complex"
    assert complexity("Fix this:\n```py\nx=1\n```", 1, False) == "complex"
    assert complexity("ok", 12, False) == "complex"
    assert complexity("ok", 1, True) == "complex"
    sizes = {"small": 1, "big": 3}
    assert choose("Hi", 1, False, table={}, model_sizes=sizes) == "small"
    assert choose("Explain it", 1, False, table={}, model_sizes=sizes) == "big"
    assert choose("Hi", 1, False, table={"simple": "big"}, model_sizes=sizes) == "big"
    # A registry model tagged with the class (models add --task complex), loadable on demand.
    tagged = {"complex": ["reasoner"]}
    assert choose("Explain it", 1, False, table={}, model_sizes=sizes, tagged=tagged) == "reasoner"
    assert choose("Hi", 1, False, table={}, model_sizes=sizes, tagged=tagged) == "small"
    # The operator's table still wins.
    assert (
        choose("Why?", 1, False, table={"complex": "big"}, model_sizes=sizes, tagged=tagged)
        == "big"
    )


def test_responses_api_text_streaming_and_previous_response_id(api):
    client, _ = api
    first = client.responses.create(
        model="smollm2-135m",
        instructions="You are terse.",
        input="My name is Ada. Say hello.",
        max_output_tokens=16,
        temperature=0,
    )
    assert first.status in ("completed", "incomplete") and first.output_text
    assert first.usage.input_tokens > 5 and first.usage.output_tokens > 0
    # The follow-up names only the new input; the stored conversation comes back.
    second = client.responses.create(
        model="smollm2-135m",
        previous_response_id=first.id,
        input="What is my name?",
        max_output_tokens=16,
        temperature=0,
    )
    assert second.output_text
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    events = list(
        client.responses.create(
            model="smollm2-135m",
            input="Count to three.",
            max_output_tokens=16,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds and kinds[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with pytest.raises(openai.BadRequestError) as unknown:
        client.responses.create(model="smollm2-135m", previous_response_id="resp_nope", input="hi")
    assert unknown.value.body["param"] == "previous_response_id"


def test_responses_api_function_call_loop(api):
    client, _ = api
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": WEATHER["function"]["parameters"],
    }
    first = client.responses.create(
        model="smollm2-135m",
        input="What is the weather in Rome?",
        tools=[tool],
        tool_choice="required",
        max_output_tokens=80,
        temperature=0,
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), tool["parameters"])
    final = client.responses.create(
        model="smollm2-135m",
        previous_response_id=first.id,
        tools=[tool],
        tool_choice="none",
        max_output_tokens=32,
        temperature=0,
        input=[
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": '{"temperature": 25}',
            }
        ],
    )
    assert final.output_text


def test_affinity_keeps_a_conversation_on_one_node(fleet_factory):
    coordinator = fleet_factory.coordinator()
    fleet_factory.node("n1")
    fleet_factory.node("n2")
    fleet_factory.wait_ready_nodes(2)
    client = sdk(coordinator)

    def node_of(**arguments) -> str:
        reply = client.chat.completions.create(model="smollm2-135m", max_tokens=2, **arguments)
        return reply.system_fingerprint.removeprefix("edgefleet-")

    hello = [{"role": "user", "content": "Hello"}]
    for key in ("ada", "bob", "cy"):
        by_user = {node_of(messages=hello, user=key) for _ in range(3)}
        by_header = {
            node_of(messages=hello, extra_headers={"X-Session-Id": key + "-h"}) for _ in range(3)
        }
        assert len(by_user) == 1 and len(by_header) == 1
    # Without a key, a continued conversation lands where its prefix is cached.
    opening = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a bird."},
    ]
    first = node_of(messages=opening)
    continued = node_of(
        messages=[
            *opening,
            {"role": "assistant", "content": "A robin."},
            {"role": "user", "content": "Another?"},
        ]
    )
    assert continued == first


def test_saturated_and_unavailable_fleet_over_http(fleet_factory):
    import httpx

    coordinator = fleet_factory.coordinator()
    base = f"http://{coordinator.extra['http']}"
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 503  # no node yet
    fleet_factory.node("n1", slots=1, queue=0)
    fleet_factory.wait_ready_nodes(1)
    assert httpx.get(f"{base}/readyz", timeout=10).json()["ready"]
    client = sdk(coordinator)
    busy = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": LONG}],
        max_tokens=1500,
        temperature=0,
        stream=True,
    )
    next(iter(busy))
    with fleet_factory.client() as grpc_client:
        from tests.helpers import wait_until

        wait_until(
            lambda: grpc_client.status().nodes[0].capacity.slots_free == 0,
            what="the slot to be busy",
        )
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": "hi"}]
            )
        assert int(limited.value.response.headers["Retry-After"]) >= 1
        busy.close()
        grpc_client.drain("n1")
        with pytest.raises(openai.InternalServerError) as unavailable:
            client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": "hi"}]
            )
        assert unavailable.value.status_code == 503


def test_sigstop_of_a_node_mid_stream_over_http(fleet_factory):
    import os
    import signal

    coordinator = fleet_factory.coordinator("--stall-timeout", "1")
    nodes = {n: fleet_factory.node(n) for n in ("n1", "n2")}
    fleet_factory.wait_ready_nodes(2)
    frozen = []

    def freeze(node):
        os.kill(node.pid, signal.SIGSTOP)
        frozen.append(node)

    try:
        _, last, victim = stream_through_a_fault(fleet_factory, coordinator, nodes, freeze, 100)
    finally:
        for node in frozen:
            os.kill(node.pid, signal.SIGCONT)
    assert victim is not None and last.usage.completion_tokens == 100


def test_node_side_errors_name_the_openai_parameter(api):
    client, _ = api
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "word " * 3000}]
        )
    assert too_long.value.body["param"] == "messages"
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as bad_schema:
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "banana"}},
            },
        )
    assert bad_schema.value.body["param"] == "response_format.json_schema"
    with pytest.raises(openai.BadRequestError) as stops:
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "x"}],
            stop=[f"s{i}" for i in range(20)],
        )
    assert stops.value.body["param"] == "stop"
