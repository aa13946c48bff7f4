"""Fuzzing the HTTP API: no input yields a 5xx or takes the coordinator down."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-10, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard", ""])
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES | JSON_SCALARS},
    optional={
        "content": st.text(max_size=40) | JSON,
        "tool_call_id": JSON_SCALARS,
        "tool_calls": JSON,
        "name": JSON_SCALARS,
    },
)
CHAT_BODY = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["smollm2-135m", "auto", "nope", ""]) | JSON_SCALARS,
        "messages": st.lists(MESSAGE, max_size=3) | JSON,
        "max_tokens": st.integers(-3, 3) | JSON_SCALARS,
        "temperature": st.floats(-3, 3, allow_nan=False, allow_infinity=False) | JSON_SCALARS,
        "top_p": st.floats(-1, 2, allow_nan=False, allow_infinity=False) | JSON_SCALARS,
        "stop": st.lists(st.text(max_size=5), max_size=20) | JSON_SCALARS,
        "n": st.integers(-1, 3),
        "stream": st.booleans() | JSON_SCALARS,
        "seed": JSON_SCALARS,
        "tools": st.lists(JSON, max_size=2) | JSON_SCALARS,
        "tool_choice": st.sampled_from(["none", "auto", "required"]) | JSON,
        "response_format": st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
            optional={"json_schema": JSON},
        )
        | JSON_SCALARS,
        "unknown_field": JSON,
    },
)
RESPONSES_BODY = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["smollm2-135m", "nope"]) | JSON_SCALARS,
        "input": st.text(max_size=30) | st.lists(JSON, max_size=3) | JSON_SCALARS,
        "instructions": JSON_SCALARS,
        "max_output_tokens": st.integers(-2, 3) | JSON_SCALARS,
        "previous_response_id": JSON_SCALARS,
        "tools": st.lists(JSON, max_size=2) | JSON_SCALARS,
        "stream": st.booleans(),
    },
)


@pytest.fixture(scope="module")
def http_base(tmp_path_factory, default_model_path):
    from edgefleet.local.etcd_server import EtcdCluster
    from tests.conftest import FleetFactory

    workdir = tmp_path_factory.mktemp("fuzz")
    etcd = EtcdCluster(1, base_dir=workdir / "etcd").start()
    fleet = FleetFactory(workdir, etcd.endpoints)
    coordinator = fleet.coordinator()
    fleet.node("n1", slots=2, queue=16, extra_args=("--context", "512"))
    fleet.wait_ready_nodes(1)
    yield f"http://{coordinator.extra['http']}", coordinator
    fleet.stop_all()
    etcd.stop()


def _post(base: str, path: str, body) -> httpx.Response:
    if isinstance(body, dict) and "max_tokens" not in body and "max_output_tokens" not in body:
        body = {**body, "max_tokens" if path.endswith("completions") else "max_output_tokens": 2}
    with httpx.Client(base_url=base, timeout=120) as client:
        reply = client.post(path, json=body)
        reply.read()
        return reply


FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(body=CHAT_BODY | JSON)
def test_chat_completions_never_answers_5xx(http_base, body):
    base, _ = http_base
    reply = _post(base, "/v1/chat/completions", body)
    assert reply.status_code < 500, (body, reply.text)
    if reply.status_code >= 400:
        error = reply.json()["error"]
        assert error["message"] and error["type"]


@FUZZ
@given(body=RESPONSES_BODY | JSON)
def test_responses_never_answers_5xx(http_base, body):
    base, _ = http_base
    reply = _post(base, "/v1/responses", body)
    assert reply.status_code < 500, (body, reply.text)


def test_the_coordinator_survived_the_fuzzing(http_base):
    base, coordinator = http_base
    assert coordinator.alive()
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{base}/readyz", timeout=10).json()["ready"]
