"""``POST /v1/responses``: the subset of OpenAI's Responses API agent frameworks use.

``input`` as text or items (messages, ``function_call`` and
``function_call_output``), ``instructions``, function ``tools``, ``stream``
with the standard event types, and ``previous_response_id``: every stored
response keeps its whole conversation (``Sessions.store_conversation``, under
the session idle TTL), so a follow-up names only the new input. ``"model":
"auto"`` works as on chat completions.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from coordinator import tools
from coordinator.openai_common import (
    ApiError,
    HttpServices,
    NoLogprobs,
    TokenCount,
    api_error,
    authorize,
    collected,
    resolve_model,
    services,
    setting,
    started,
)
from edgefleet.errors import EdgefleetError
from edgefleet.generation import sampling_params
from edgefleet.v1 import common_pb2, coordinator_pb2


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    stream: bool = False
    previous_response_id: str | None = None
    max_output_tokens: TokenCount = None
    temperature: setting(0, 2) = None
    top_p: setting(0, 1, low_open=True) = None
    store: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    service_tier: str | None = None
    top_logprobs: NoLogprobs = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in (
                "input_text",
                "output_text",
                "text",
            ):
                raise ApiError(400, "only text content parts are supported", param=param)
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise ApiError(400, "content must be a string or a list of text parts", param=param)


def input_messages(items: str | list[dict[str, Any]]) -> list[common_pb2.ChatMessage]:
    if isinstance(items, str):
        return [common_pb2.ChatMessage(role="user", content=items)]
    messages = []
    calls: set[str] = set()
    for index, item in enumerate(items):
        kind = item.get("type", "message")
        param = f"input.[{index}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ApiError(400, f"unknown role {role!r}", param=f"{param}.role")
            messages.append(
                common_pb2.ChatMessage(
                    role=role, content=_text_of(item.get("content"), f"{param}.content")
                )
            )
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not call_id or not name:
                raise ApiError(400, "function_call items need call_id and name", param=param)
            calls.add(call_id)
            arguments = item.get("arguments") or "{}"
            messages.append(
                common_pb2.ChatMessage(
                    role="assistant",
                    content=json.dumps({"name": name, "arguments": _loads(arguments)}),
                )
            )
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not call_id:
                raise ApiError(400, "function_call_output items need call_id", param=param)
            output = item.get("output", "")
            messages.append(
                common_pb2.ChatMessage(
                    role="tool",
                    tool_call_id=call_id,
                    content=output if isinstance(output, str) else json.dumps(output),
                )
            )
        else:
            raise ApiError(400, f"input item type {kind!r} is not supported", param=f"{param}.type")
    return messages


def _loads(text: str):
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return text


def chat_tools(response_tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses-style function tools in the chat-completions shape."""
    if not response_tools:
        return None
    converted = []
    for index, tool in enumerate(response_tools):
        if tool.get("type") != "function":
            raise ApiError(
                400,
                f"tool type {tool.get('type')!r} is not supported",
                param=f"tools.[{index}].type",
            )
        converted.append(
            {
                "type": "function",
                "function": {
                    "name": tool.get("name"),
                    "description": tool.get("description", ""),
                    "parameters": tool.get("parameters"),
                },
            }
        )
    return converted


async def create_response(body: ResponsesRequest, request: Request):
    services_ = services(request)
    new_messages = input_messages(body.input)
    if not new_messages:
        raise ApiError(400, "input must not be empty", param="input")
    history = await _history(services_, body.previous_response_id)
    body.model = resolve_model(
        services_,
        body.model,
        last_user=next((m.content for m in reversed(new_messages) if m.role == "user"), ""),
        message_count=len(history) + len(new_messages),
        has_tools=bool(body.tools),
    )
    try:
        plan = tools.parse_tools(chat_tools(body.tools), body.tool_choice)
    except EdgefleetError as error:
        raise api_error(error) from None
    messages = list(history)
    if body.instructions and not any(m.role in ("system", "developer") for m in history):
        messages.insert(0, common_pb2.ChatMessage(role="system", content=body.instructions))
    messages += new_messages
    constraint = common_pb2.OutputConstraint()
    prompt = tools.apply(plan, messages, constraint)
    complete = coordinator_pb2.CompleteRequest(
        model=body.model,
        messages=prompt,
        sampling=sampling_params(
            max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p
        ),
        constraint=constraint,
        affinity_key=body.previous_response_id or body.user or "",
    )
    if body.store:
        try:  # a response that could not be stored is refused before it is generated
            await services_.sessions.check_conversation(messages)
        except EdgefleetError as error:
            raise api_error(error) from None
    response = ResponseBuilder(services_, body, plan, messages)
    stream = services_.turns.complete(
        complete, method="responses", metadata=list(request.headers.items())
    )
    if not body.stream:
        try:
            return await response.finish(*await collected(stream, request))
        except EdgefleetError as error:  # storing it failed (its quota, etcd away)
            raise api_error(error) from None
    reply = await started(stream, request)
    return StreamingResponse(
        response.events(reply),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _history(services_: HttpServices, previous_id: str | None) -> list:
    if not previous_id:
        return []
    try:
        history = await services_.sessions.conversation(previous_id)
    except EdgefleetError as error:
        raise api_error(error) from None
    if history is None:
        raise ApiError(
            400,
            f"previous response {previous_id!r} not found (or expired)",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return history


class ResponseBuilder:
    """One response: its fixed fields, its output, its stored conversation, its events."""

    def __init__(self, services_: HttpServices, body: ResponsesRequest, plan, messages) -> None:
        self._sessions = services_.sessions
        self._body = body
        self._plan = plan
        self._messages = messages
        self.response_id = f"resp_{uuid.uuid4().hex}"
        self.base = {
            "id": self.response_id,
            "object": "response",
            "created_at": int(time.time()),
            "model": body.model,
            "instructions": body.instructions,
            "previous_response_id": body.previous_response_id,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "tools": body.tools or [],
            "tool_choice": body.tool_choice or ("auto" if body.tools else "none"),
            "parallel_tool_calls": False,
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "metadata": body.metadata or {},
            "store": body.store,
            "error": None,
            "incomplete_details": None,
            "usage": None,
        }

    async def finish(self, text: str, last) -> dict:
        """The completed response for the reply ``text``; stores the conversation."""
        calls = tools.parse_reply(self._plan, text)
        if calls:
            output = [
                {
                    "type": "function_call",
                    "id": f"fc_{uuid.uuid4().hex[:24]}",
                    "call_id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                    "status": "completed",
                }
                for call in calls
            ]
        else:
            output = [
                {
                    "type": "message",
                    "id": f"msg_{uuid.uuid4().hex[:24]}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ]
        if self._body.store:
            await self._sessions.store_conversation(
                self.response_id,
                self._body.model,
                [*self._messages, common_pb2.ChatMessage(role="assistant", content=text)],
            )
        usage = last.usage
        incomplete = last.finish_reason in (
            common_pb2.FINISH_REASON_LENGTH,
            common_pb2.FINISH_REASON_CONTEXT_FULL,
        )
        return {
            **self.base,
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "output": output,
            "usage": {
                "input_tokens": usage.prompt_tokens,
                "output_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                "input_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }

    async def events(self, reply):
        """The reply as Responses-API server-sent events."""
        sequence = 0

        def event(kind: str, **fields) -> str:
            nonlocal sequence
            payload = {"type": kind, "sequence_number": sequence, **fields}
            sequence += 1
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

        base = self.base
        in_progress = {**base, "status": "in_progress", "output": []}
        yield event("response.created", response=in_progress)
        yield event("response.in_progress", response=in_progress)
        item_id = f"msg_{uuid.uuid4().hex[:24]}"
        # A forced tool call is not streamed as text: it is one function_call item.
        as_text = not self._plan.forced
        if as_text:
            yield event(
                "response.output_item.added",
                output_index=0,
                item={
                    "type": "message",
                    "id": item_id,
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                },
            )
            yield event(
                "response.content_part.added",
                item_id=item_id,
                output_index=0,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            )
        text, last = [], None
        try:
            async for chunk, _ in reply:
                if chunk.text:
                    text.append(chunk.text)
                    if as_text:
                        yield event(
                            "response.output_text.delta",
                            item_id=item_id,
                            output_index=0,
                            content_index=0,
                            delta=chunk.text,
                            logprobs=[],
                        )
                last = chunk
            done = await self.finish("".join(text), last)
        except EdgefleetError as error:  # the generation, or storing its conversation
            yield event(
                "response.failed",
                response={
                    **base,
                    "status": "failed",
                    "output": [],
                    "error": api_error(error).body()["error"],
                },
            )
            return
        item = done["output"][0]
        if as_text and item["type"] == "message":
            full = "".join(text)
            yield event(
                "response.output_text.done",
                item_id=item_id,
                output_index=0,
                content_index=0,
                text=full,
                logprobs=[],
            )
            yield event(
                "response.content_part.done",
                item_id=item_id,
                output_index=0,
                content_index=0,
                part=item["content"][0],
            )
            yield event("response.output_item.done", output_index=0, item={**item, "id": item_id})
            done["output"][0]["id"] = item_id
        else:
            for index, output in enumerate(done["output"]):
                yield event(
                    "response.output_item.added",
                    output_index=index,
                    item={**output, "status": "in_progress", "arguments": ""},
                )
                yield event(
                    "response.function_call_arguments.delta",
                    item_id=output["id"],
                    output_index=index,
                    delta=output["arguments"],
                )
                yield event(
                    "response.function_call_arguments.done",
                    item_id=output["id"],
                    output_index=index,
                    arguments=output["arguments"],
                )
                yield event("response.output_item.done", output_index=index, item=output)
        yield event("response.completed", response=done)


def register(app: FastAPI) -> None:
    router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
    router.add_api_route("/responses", create_response, methods=["POST"])
    app.include_router(router)
