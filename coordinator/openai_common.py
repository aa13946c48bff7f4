"""What both OpenAI-compatible HTTP APIs share: errors, auth, the model, replies.

- ``ApiError`` is OpenAI's error shape; ``api_error`` maps an
  ``EdgefleetError`` to it from the error's code (HTTP status, error type)
  and its named reason (the OpenAI ``param`` and ``code``), never its text.
- ``authorize`` checks the API key, once, as a dependency of every route.
- ``resolve_model`` turns ``"auto"`` into a served alias and refuses a model
  no node serves, for every endpoint alike.
- ``HttpServices`` is what the handlers use (the use cases, on ``app.state``):
  handlers are plain module-level functions registered explicitly.
- ``collected`` and ``started`` run a reply only while its client is there:
  a client that goes away cancels the generation, so the node's slot is free
  at once (a streamed reply after its first chunk is Starlette's to cancel).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, TypeVar

from fastapi import Request
from pydantic import AfterValidator, Field

from coordinator import auto_model
from coordinator.fleet import FleetView
from coordinator.model_loads import ModelLoads
from coordinator.sessions import Sessions
from coordinator.turns import Relayed, Turns
from edgefleet import auth
from edgefleet.auth import Principal
from edgefleet.errors import EdgefleetError, Reason
from edgefleet.generation import FLOAT32_MIN_NORMAL, MAX_STOP_LENGTH, MAX_TOKENS_LIMIT
from edgefleet.v1 import coordinator_pb2

if TYPE_CHECKING:
    from coordinator.access import Access


# --- request fields: what the API takes, bounded before any work is spent --------------
def _plain(value: float) -> float:
    if value != 0.0 and abs(value) < FLOAT32_MIN_NORMAL:
        raise ValueError("must be 0 or a normal number (denormals mean nothing here)")
    return value


def _no_bias(value: dict | None) -> dict | None:
    if value:
        raise ValueError("is not supported (edgefleet would otherwise ignore it)")
    return value


def _no_logprobs(value: int | None) -> int | None:
    if value:
        raise ValueError("is not supported: logprobs are not returned")
    return value


def setting(low: float, high: float, *, low_open: bool = False):
    """A sampling number: finite, not denormal, in range."""
    bounds = {"gt": low} if low_open else {"ge": low}
    return Annotated[
        float | None,
        Field(default=None, le=high, allow_inf_nan=False, **bounds),
        AfterValidator(lambda v: v if v is None else _plain(v)),
    ]


TokenCount = Annotated[int | None, Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)]
Seed = Annotated[int | None, Field(default=None, ge=-(2**63), le=2**63 - 1)]
StopStrings = Annotated[
    str | list[Annotated[str, Field(max_length=MAX_STOP_LENGTH)]] | None,
    Field(default=None, max_length=MAX_STOP_LENGTH),
]
Unsupported = Annotated[dict[str, float] | None, AfterValidator(_no_bias)]
NoLogprobs = Annotated[int | None, AfterValidator(_no_logprobs)]

# gRPC status -> (HTTP status, OpenAI error type)
HTTP_OF = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "ABORTED": (409, "conflict_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
}
# Named reason -> (the OpenAI parameter it is about, OpenAI error code).
OPENAI_FIELDS: dict[Reason, tuple[str | None, str | None]] = {
    Reason.PROMPT_TOO_LONG: ("messages", "context_length_exceeded"),
    Reason.BAD_MESSAGES: ("messages", None),
    Reason.BAD_SCHEMA: ("response_format.json_schema", None),
    Reason.BAD_GRAMMAR: ("response_format", None),
    Reason.BAD_STOP: ("stop", None),
    Reason.BAD_TOOLS: ("tools", None),
    Reason.BAD_TOOL_CHOICE: ("tool_choice", None),
    Reason.UNKNOWN_MODEL: (None, "model_not_found"),
    Reason.RATE_LIMITED: (None, "rate_limit_exceeded"),
    Reason.TOO_MANY_STREAMS: (None, "too_many_concurrent_requests"),
    Reason.STORAGE_QUOTA: (None, "storage_quota_exceeded"),
    Reason.SESSION_FULL: (None, "conversation_too_large"),
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def api_error(error: EdgefleetError) -> ApiError:
    """The OpenAI error for an edgefleet error, decided by its code and reason."""
    status, type_ = HTTP_OF.get(error.code.name, (500, "server_error"))
    param, code = OPENAI_FIELDS.get(error.reason, (None, None))
    headers = {}
    if error.retry_after_s is not None and status in (429, 503):
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return ApiError(status, error.message, type_=type_, param=param, code=code, headers=headers)


@dataclass(frozen=True)
class HttpServices:
    """The use cases the HTTP handlers call, kept on ``app.state.services``."""

    turns: Turns
    fleet: FleetView
    sessions: Sessions
    api_keys: frozenset[str] = frozenset()
    auto_models: Mapping[str, str] = field(default_factory=dict)
    # The fleet's API keys (None: a fleet run --insecure, only ``api_keys``).
    access: Access | None = None
    # No key needed (the HTTP listener is on loopback, like Ollama's).
    keyless: bool = False


def services(request: Request) -> HttpServices:
    return request.app.state.services


async def caller_of(request: Request) -> Principal | None:
    """Who sends an HTTP request: the ``Authorization: Bearer KEY``'s key,
    anonymous where keyless, None when unauthenticated."""
    services_ = services(request)
    token = (request.headers.get("authorization") or "").removeprefix("Bearer ").strip()
    static = auth.static_key_principal(token, services_.api_keys)
    if static is not None:
        return static
    if services_.access is None:
        return None if services_.api_keys else auth.INSECURE
    if token:
        return await services_.access.key_principal(token)
    return auth.ANONYMOUS if services_.keyless else None


async def _require(request: Request, scope: str) -> None:
    caller = await caller_of(request)
    if caller is None:
        raise ApiError(
            401,
            "missing or invalid API key (Authorization: Bearer ...)",
            type_="authentication_error",
            code="invalid_api_key",
        )
    if not caller.can(scope):
        raise ApiError(
            403,
            f"this API key lacks the {scope!r} scope",
            type_="permission_error",
            code="insufficient_scope",
        )
    auth.CALLER.set(caller)


async def authorize(request: Request) -> None:
    """Every /v1 route: a key with the ``inference`` scope (or keyless loopback)."""
    await _require(request, auth.INFERENCE)


async def authorize_metrics(request: Request) -> None:
    """/metrics: an admin key, unless keyless (loopback) or --insecure."""
    if services(request).access is None:
        return
    await _require(request, auth.ADMIN if not services(request).keyless else auth.INFERENCE)


AUTO = "auto"


def resolve_model(
    services_: HttpServices, model: str, *, last_user: str, message_count: int, has_tools: bool
) -> str:
    """The alias to serve: ``"auto"`` chosen by task, else ``model`` if the fleet
    serves it or a ready node can load it; 404 ``model_not_found`` otherwise."""
    fleet = services_.fleet
    if model == AUTO:
        try:
            return auto_model.choose(
                last_user,
                message_count,
                has_tools,
                table=services_.auto_models,
                model_sizes=fleet.model_sizes(),
                tagged=services_.turns.loads.tagged(("simple", "complex")),
            )
        except EdgefleetError as error:
            raise api_error(error) from None
    if model not in fleet.models() and not services_.turns.loads.loadable(model):
        raise ApiError(
            404,
            f"the model {model!r} does not exist in this fleet",
            type_="not_found_error",
            param="model",
            code="model_not_found",
        )
    return model


def list_models(fleet: FleetView, loads: ModelLoads | None = None) -> list[dict]:
    """``/v1/models`` entries: every alias in the fleet, those a node could
    load on demand (``ready_nodes`` 0, ``loadable``), and ``auto``."""
    models = fleet.models()
    served = [
        {"id": alias, "object": "model", "created": 0, "owned_by": "edgefleet", "ready_nodes": n}
        for alias, n in sorted(models.items())
    ]
    if loads is not None:
        served += [
            {
                "id": alias,
                "object": "model",
                "created": 0,
                "owned_by": "edgefleet",
                "ready_nodes": 0,
                "loadable": True,
            }
            for alias in sorted(loads.loadable_models() - set(models))
        ]
    auto = {
        "id": AUTO,
        "object": "model",
        "created": 0,
        "owned_by": "edgefleet",
        "ready_nodes": len(fleet.ready_nodes()),
    }
    return [*served, auto]


T = TypeVar("T")


class ClientGone(ApiError):
    """The client closed its connection before the reply was ready (nobody reads this)."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection", code="client_closed_request")


async def _disconnected(request: Request) -> None:
    """Return when the client of ``request`` has gone (its body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def while_connected(work: Awaitable[T], request: Request | None) -> T:
    """``work``'s result; cancelled (and ``ClientGone`` raised) if the client goes first."""
    if request is None:
        return await work
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((job, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        job.cancel()  # nothing if it is done; else its generation ends now
        # Both wound up (their outcome is read below), without swallowing a
        # cancellation of this handler itself.
        await asyncio.gather(watch, job, return_exceptions=True)
    if job.cancelled():
        raise ClientGone
    return job.result()


async def collected(
    stream: AsyncIterator[Relayed], request: Request | None = None
) -> tuple[str, coordinator_pb2.ChatChunk | None]:
    """A whole non-streaming reply: its text and its last chunk (usage, finish).
    With ``request``: cancelled when that client disconnects."""

    async def collect():
        text, last = [], None
        try:
            async for chunk, _ in stream:
                text.append(chunk.text)
                last = chunk
        except EdgefleetError as error:
            raise api_error(error) from None
        return "".join(text), last

    return await while_connected(collect(), request)


async def started(
    stream: AsyncIterator[Relayed], request: Request | None = None
) -> AsyncIterator[Relayed]:
    """Begin a reply now, so that a failure before its first chunk becomes a
    proper HTTP error rather than a broken event stream; returns an iterator
    over the whole reply, first chunk included. With ``request``: the wait for
    the first chunk (placement, prompt processing) ends if that client goes."""

    async def first_chunk():
        try:
            return await anext(stream)
        except StopAsyncIteration:
            return None
        except EdgefleetError as error:
            raise api_error(error) from None

    first = await while_connected(first_chunk(), request)

    async def whole():
        if first is not None:
            yield first
            async for item in stream:
                yield item

    return whole()


def usage_of(usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
