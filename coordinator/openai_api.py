"""``POST /v1/chat/completions`` and ``GET /v1/models``: the fleet behind one base URL.

Requests are checked against pydantic models; every error is the OpenAI
error shape with the matching HTTP status (``openai_common``). Replies come
from ``Turns.complete``, so streams fail over between nodes like gRPC ones.
The handlers are module-level functions; ``register`` adds them to an app.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator import tools
from coordinator.model_loads import LoadNote
from coordinator.openai_common import (
    ApiError,
    NoLogprobs,
    Seed,
    StopStrings,
    TokenCount,
    Unsupported,
    api_error,
    authorize,
    collected,
    list_models,
    resolve_model,
    services,
    setting,
    started,
    usage_of,
)
from edgefleet.errors import EdgefleetError
from edgefleet.generation import sampling_params
from edgefleet.v1 import common_pb2, coordinator_pb2

MAX_BODY_BYTES = 4 * 1024 * 1024
# A request body must arrive within BODY_TIMEOUT_S plus one second for every
# BODY_MIN_RATE bytes received: a slow but steady upload goes on, a trickle
# (or a stall) is answered 408 and its connection closed.
BODY_TIMEOUT_S = 30.0
BODY_MIN_RATE = 4096

FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CONTEXT_FULL: "length",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    common_pb2.FINISH_REASON_CANCELLED: "stop",
}


# --- request models ------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCallIn(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallIn] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(BaseModel):
    # Unknown top-level fields are refused, as OpenAI does; known ones that
    # edgefleet does not act on are accepted and ignored.
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: TokenCount = None
    max_completion_tokens: TokenCount = None
    temperature: setting(0, 2) = None
    top_p: setting(0, 1, low_open=True) = None
    stop: StopStrings = None
    seed: Seed = None
    user: str | None = None
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: setting(-2, 2) = None
    frequency_penalty: setting(-2, 2) = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: NoLogprobs = None
    logit_bias: Unsupported = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None


def to_complete_request(body: ChatCompletionRequest, session_header: str | None, plan):
    if body.n not in (None, 1):
        raise ApiError(400, "n > 1 is not supported; ask for one choice", param="n")
    if body.logprobs:
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    tool_call_ids = set()
    messages = []
    for index, message in enumerate(body.messages):
        if message.role == "assistant" and message.tool_calls:
            tool_call_ids.update(call.id for call in message.tool_calls)
        if message.role == "tool" and message.tool_call_id not in tool_call_ids:
            raise ApiError(
                400,
                f"messages[{index}] answers tool_call_id "
                f"{message.tool_call_id!r}, which no assistant message made",
                param=f"messages.[{index}].tool_call_id",
            )
        content = message.text()
        if message.role == "assistant" and message.tool_calls:
            content = tools.history_text(message.tool_calls)
        messages.append(
            common_pb2.ChatMessage(
                role=message.role,
                content=content,
                name=message.name or "",
                tool_call_id=message.tool_call_id or "",
            )
        )
    sampling = sampling_params(
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        stop=body.stop,
    )
    constraint = common_pb2.OutputConstraint()
    if body.response_format is not None:
        if body.response_format.type == "json_object":
            constraint.json_object = True
        elif body.response_format.type == "json_schema":
            if body.response_format.json_schema is None:
                raise ApiError(
                    400,
                    "response_format json_schema needs a json_schema",
                    param="response_format.json_schema",
                )
            constraint.json_schema = json.dumps(body.response_format.json_schema.schema_)
    if plan.forced and body.response_format is not None and body.response_format.type != "text":
        raise ApiError(
            400,
            "a required tool call and response_format cannot be combined",
            param="response_format",
        )
    messages = tools.apply(plan, messages, constraint)
    return coordinator_pb2.CompleteRequest(
        model=body.model,
        messages=messages,
        sampling=sampling,
        constraint=constraint,
        affinity_key=session_header or body.user or "",
    )


# --- handlers ----------------------------------------------------------------------------
MODEL_LOAD_HEADER = "x-edgefleet-model-load-ms"


def load_headers(note: LoadNote) -> dict[str, str]:
    """The response header saying how long the request waited for its model to
    load on demand (none when it did not wait)."""
    if note.wait is None:
        return {}
    return {MODEL_LOAD_HEADER: f"{note.wait.waited_ms:.0f}"}


async def get_models(request: Request) -> dict:
    services_ = services(request)
    return {"object": "list", "data": list_models(services_.fleet, services_.turns.loads)}


async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    x_session_id: Annotated[str | None, Header()] = None,
):
    services_ = services(request)
    body.model = resolve_model(
        services_,
        body.model,
        last_user=next((m.text() for m in reversed(body.messages) if m.role == "user"), ""),
        message_count=len(body.messages),
        has_tools=bool(body.tools),
    )
    try:
        plan = tools.parse_tools(body.tools, body.tool_choice)
    except EdgefleetError as error:
        raise api_error(error) from None
    complete = to_complete_request(body, x_session_id, plan)
    note = LoadNote()
    stream = services_.turns.complete(
        complete, method="chat.completions", metadata=list(request.headers.items()), note=note
    )
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        reply = await started(stream, request)
        return StreamingResponse(
            _sse(reply, completion_id, created, body.model, include_usage, plan),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **load_headers(note)},
        )
    reply, last = await collected(stream, request)
    response.headers.update(load_headers(note))
    message: dict[str, Any] = {"role": "assistant", "content": reply}
    finish_reason = FINISH.get(last.finish_reason, "stop")
    calls = tools.parse_reply(plan, reply)
    if calls:
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        finish_reason = "tool_calls"
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage_of(last.usage),
        "system_fingerprint": f"edgefleet-{last.node_id}",
    }


async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "null"})


async def on_invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    problem = error.errors()[0]
    # Fields and list indices only: not pydantic's union-branch tags ("str", "list[str]").
    location = [
        str(part)
        for part in problem.get("loc", ())
        if isinstance(part, int) or (part != "body" and part not in UNION_TAGS and "[" not in part)
    ]
    param = ".".join(location) or None
    message = problem.get("msg", "invalid request")
    if problem.get("type") == "json_invalid":
        message, param = "the request body is not valid JSON", None
    elif problem.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif param:
        message = f"{param}: {message}"
    return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)


async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (a body that is not UTF-8 JSON, ...) in OpenAI's shape."""
    problem = ApiError(error.status_code, str(error.detail))
    return JSONResponse(problem.body(), status_code=error.status_code, headers=error.headers)


async def on_bad_unicode(request: Request, error: UnicodeEncodeError) -> JSONResponse:
    """A lone surrogate (``"\\ud800"``) parses as JSON but is no text: 400, not a reset."""
    problem = ApiError(
        400, "text must be valid Unicode (a lone surrogate escape?)", code="invalid_unicode"
    )
    return JSONResponse(problem.body(), status_code=400)


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body parser lets it through unchanged."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body over {max_bytes} bytes")


async def on_body_too_large(request: Request, error: BodyTooLarge) -> JSONResponse:
    problem = ApiError(413, error.detail, code="request_too_large")
    return JSONResponse(problem.body(), status_code=413)


class BodyTooSlow(HTTPException):
    """An HTTPException, so FastAPI's body parser lets it through unchanged."""

    def __init__(self, timeout_s: float, min_rate: int) -> None:
        super().__init__(
            408,
            f"the request body did not arrive in time ({timeout_s:g} s, "
            f"then at least {min_rate} bytes/s)",
        )


async def on_body_too_slow(request: Request, error: BodyTooSlow) -> JSONResponse:
    problem = ApiError(408, error.detail, code="request_timeout")
    return JSONResponse(problem.body(), status_code=408, headers={"Connection": "close"})


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` by the bytes actually received,
    so a chunked body (no Content-Length) is cut off too, before it is parsed;
    and bodies slower than ``timeout_s`` plus one second per ``min_rate``
    bytes (0: no pace check)."""

    def __init__(
        self,
        app,
        max_bytes: int = MAX_BODY_BYTES,
        timeout_s: float = BODY_TIMEOUT_S,
        min_rate: int = BODY_MIN_RATE,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.min_rate = min_rate

    def _too_large(self) -> ApiError:
        return ApiError(413, f"request body over {self.max_bytes} bytes", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                error = self._too_large()
                return await JSONResponse(error.body(), status_code=413)(scope, receive, send)
        received = 0
        body_done = False
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def paced():
            # Only while the body is coming: afterwards receive() waits for the
            # client to leave (http.disconnect), for as long as the reply takes.
            if body_done or not self.timeout_s:
                return await receive()
            deadline = started + self.timeout_s + (received / self.min_rate if self.min_rate else 0)
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    return await receive()
            except TimeoutError:
                raise BodyTooSlow(self.timeout_s, self.min_rate) from None

        async def limited():
            nonlocal received, body_done
            message = await paced()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # answered by on_body_too_large
            return message

        await self.app(scope, limited, send)


def register(
    app: FastAPI,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout_s: float = BODY_TIMEOUT_S,
    body_min_rate: int = BODY_MIN_RATE,
) -> None:
    """The chat-completions routes, the OpenAI error handlers and the body limits."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
    router.add_api_route("/models", get_models, methods=["GET"])
    router.add_api_route("/chat/completions", chat_completions, methods=["POST"])
    app.include_router(router)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(UnicodeEncodeError, on_bad_unicode)
    app.add_exception_handler(BodyTooLarge, on_body_too_large)
    app.add_exception_handler(BodyTooSlow, on_body_too_slow)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_middleware(
        BodyLimit, max_bytes=max_body_bytes, timeout_s=body_timeout_s, min_rate=body_min_rate
    )


async def _sse(
    reply,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    plan: tools.ToolPlan,
):
    def event(choices: list, **extra) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    def content(text: str) -> str:
        return event([{"index": 0, "delta": {"content": text}, "finish_reason": None}])

    yield event(
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    )
    # With tools, a reply that opens with "{" may be a call: hold it back until
    # it is complete, then send it as tool_calls (or as text if it is not one).
    holding = plan.forced
    decided = not plan.active or plan.forced
    held: list[str] = []
    try:
        async for chunk, _ in reply:
            if chunk.text:
                if holding:
                    held.append(chunk.text)
                elif not decided:
                    held.append(chunk.text)
                    lead = "".join(held).lstrip()
                    if lead:
                        decided = True
                        holding = lead.startswith(("{", "["))
                        if not holding:
                            yield content("".join(held))
                            held = []
                else:
                    yield content(chunk.text)
            if chunk.finish_reason:
                finish_reason = FINISH.get(chunk.finish_reason, "stop")
                if held:
                    calls = tools.parse_reply(plan, "".join(held))
                    if calls:
                        yield event(
                            [
                                {
                                    "index": 0,
                                    "delta": {
                                        "tool_calls": [
                                            {"index": i, **call} for i, call in enumerate(calls)
                                        ]
                                    },
                                    "finish_reason": None,
                                }
                            ]
                        )
                        finish_reason = "tool_calls"
                    else:
                        yield content("".join(held))
                yield event([{"index": 0, "delta": {}, "finish_reason": finish_reason}])
                if include_usage:
                    yield event([], usage=usage_of(chunk.usage))
    except EdgefleetError as error:
        # Headers are gone: report in the stream, as OpenAI does.
        yield f"data: {json.dumps(api_error(error).body())}\n\n"
    yield "data: [DONE]\n\n"
