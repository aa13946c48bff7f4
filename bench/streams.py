"""Reading one streamed reply as a benchmark client: time to first token and
tokens, over gRPC (edgefleet chunks) or OpenAI-style server-sent events."""

from __future__ import annotations

import json
import time


async def read_grpc_stream(call, started: float) -> tuple[float, int]:
    """(seconds to the first text chunk, tokens) of an edgefleet chunk stream."""
    first, tokens = None, 0
    async for chunk in call:
        if chunk.text:
            tokens += chunk.token_count
            if first is None:
                first = time.perf_counter()
    return (first or time.perf_counter()) - started, tokens


def sse_event(line: str) -> dict | None:
    """The JSON event of one server-sent-events line; None for anything else
    (blank lines, comments, the closing ``[DONE]``)."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    return json.loads(line[6:])


async def read_sse_stream(
    reply, started: float, timings: dict | None = None
) -> tuple[float, int, int | None]:
    """(seconds to the first content delta, content deltas, usage's completion
    tokens or None) of a /v1/chat/completions event stream. ``timings`` gets
    the server's own timings when it sends them (llama-server does)."""
    reply.raise_for_status()
    first, deltas, usage_tokens = None, 0, None
    async for line in reply.aiter_lines():
        event = sse_event(line)
        if event is None:
            continue
        if event.get("usage"):
            usage_tokens = event["usage"]["completion_tokens"]
        if timings is not None and isinstance(event.get("timings"), dict):
            timings.update(event["timings"])
        choices = event.get("choices") or [{}]
        if (choices[0].get("delta") or {}).get("content"):
            deltas += 1
            if first is None:
                first = time.perf_counter()
    return (first or time.perf_counter()) - started, deltas, usage_tokens
