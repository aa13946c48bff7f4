"""Hostile inputs against real processes: each gets a clear 4xx for that request
alone, never a 5xx or a reset, and the fleet goes on serving (no node evicted).

The first cases of the bad-input issue; more follow as they are fixed.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.test_http_fuzz import http_base  # noqa: F401  (the module's fleet)

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


def _chat(base: str, **fields) -> httpx.Response:
    body = {"model": "smollm2-135m", "messages": MESSAGES, "max_tokens": 2, **fields}
    # json.dumps writes NaN and Infinity, as careless clients do.
    return httpx.post(
        f"{base}{CHAT}",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"seed": 2**63}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"max_tokens": 2**31}, "max_tokens"),
        ({"max_completion_tokens": 2**40}, "max_completion_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 1e-310}, "temperature"),  # a denormal: silently 0 in float32
        ({"top_p": float("nan")}, "top_p"),
        ({"presence_penalty": -1e-320}, "presence_penalty"),
        ({"stop": "x" * 1_000_000}, "stop"),
        ({"stop": ["ok", "y" * 300]}, "stop"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"top_logprobs": 3}, "top_logprobs"),
    ],
)
def test_out_of_range_and_unsupported_fields_are_400s(http_base, fields, param):  # noqa: F811
    base, _ = http_base
    reply = _chat(base, **fields)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_max_output_tokens_overflow_is_a_400(http_base):  # noqa: F811
    base, _ = http_base
    reply = httpx.post(
        f"{base}/v1/responses",
        json={"model": "smollm2-135m", "input": "Hi", "max_output_tokens": 2**31},
        timeout=60,
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_output_tokens"


def test_a_lone_surrogate_is_a_400_not_a_reset(http_base):  # noqa: F811
    base, _ = http_base
    raw = (
        '{"model": "smollm2-135m", "max_tokens": 2, '
        '"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    )
    reply = httpx.post(
        f"{base}{CHAT}", content=raw, headers={"content-type": "application/json"}, timeout=60
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "invalid_unicode"


def test_a_chunked_body_over_the_limit_is_cut_off(http_base):  # noqa: F811
    base, coordinator = http_base
    chunk = b"x" * (1 << 20)

    def body():
        yield b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "'
        for _ in range(16):  # 16 MiB, no Content-Length
            yield chunk
        yield b'"}]}'

    started = time.monotonic()
    reply = httpx.post(
        f"{base}{CHAT}", content=body(), headers={"content-type": "application/json"}, timeout=60
    )
    assert reply.status_code == 413, reply.text
    assert reply.json()["error"]["code"] == "request_too_large"
    print(f"16 MiB chunked body refused in {time.monotonic() - started:.2f}s")
    # The fleet is whole: a normal request is served by its node.
    assert _chat(base).status_code == 200
    assert coordinator.alive()


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"temperature": float("nan")}, "BAD_SAMPLING"),
        ({"top_p": float("inf")}, "BAD_SAMPLING"),
        ({"repeat_penalty": float("nan")}, "BAD_SAMPLING"),
        ({"repeat_penalty": 1000.0}, "BAD_SAMPLING"),
        ({"max_tokens": 2**31 - 1}, "BAD_SAMPLING"),
        ({"stop": ["z" * 257]}, "BAD_STOP"),
    ],
)
def test_grpc_sampling_is_bounded_the_same_way(params, reason):
    from edgefleet.errors import EdgefleetError
    from edgefleet.generation import sampling_from_proto
    from edgefleet.v1 import common_pb2

    with pytest.raises(EdgefleetError) as caught:
        sampling_from_proto(common_pb2.SamplingParams(**params))
    assert caught.value.reason.name == reason
