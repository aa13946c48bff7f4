"""Function calling for models whose chat templates know nothing of tools.

The tools are described to the model in a system message, with one reply
format for a call: a JSON object ``{"name": ..., "arguments": {...}}``. When
the caller requires a call (``tool_choice`` "required" or a named function),
generation is constrained by a JSON Schema grammar built from the functions'
parameter schemas, so the arguments always parse and match. With "auto" the
model may answer in text or with a call, and the reply is parsed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from edgefleet import limits
from edgefleet.errors import InvalidArgument, Reason
from edgefleet.v1 import common_pb2


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses its tools."""

    tools: tuple[Tool, ...]
    mode: str  # none | auto | required | named
    named: str = ""

    @property
    def active(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


def parse_tools(tools: list[dict] | None, tool_choice: Any) -> ToolPlan:
    """Check OpenAI ``tools``/``tool_choice`` (InvalidArgument naming the param),
    within edgefleet.limits: how many, how big, and the schemas they bring."""
    if tools and len(tools) > limits.MAX_TOOLS:
        raise InvalidArgument(
            f"tools has {len(tools)} entries; the limit is {limits.MAX_TOOLS}",
            reason=Reason.BAD_TOOLS,
        )
    parsed = []
    total_bytes = 0
    for index, tool in enumerate(tools or []):
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(tool.get("function"), dict)
        ):
            raise InvalidArgument(
                f"tools[{index}] must be {{'type': 'function', 'function': ...}}",
                reason=Reason.BAD_TOOLS,
            )
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(
                f"tools[{index}].function.name is required", reason=Reason.BAD_TOOLS
            )
        if len(name) > limits.MAX_TOOL_NAME:
            raise InvalidArgument(
                f"tools[{index}].function.name is {len(name)} characters; "
                f"the limit is {limits.MAX_TOOL_NAME}",
                reason=Reason.BAD_TOOLS,
            )
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise InvalidArgument(
                f"tools[{index}].function.parameters must be a JSON Schema", reason=Reason.BAD_TOOLS
            )
        limits.check_schema(
            parameters, what=f"tools[{index}].function.parameters", reason=Reason.BAD_TOOLS
        )
        parsed.append(Tool(name, str(function.get("description") or ""), parameters))
        total_bytes += len(json.dumps(tool).encode("utf-8", "surrogatepass"))
        if total_bytes > limits.MAX_TOOLS_BYTES:
            raise InvalidArgument(
                f"tools are over {limits.MAX_TOOLS_BYTES // 1024} KiB as JSON "
                f"(the limit for all tool definitions together)",
                reason=Reason.BAD_TOOLS,
            )
    names = {tool.name for tool in parsed}
    if tool_choice is None:
        mode, named = ("auto" if parsed else "none"), ""
    elif tool_choice in ("none", "auto", "required"):
        mode, named = tool_choice, ""
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        mode, named = "named", str(tool_choice["function"].get("name", ""))
        if named not in names:
            raise InvalidArgument(
                f"tool_choice names {named!r}, which is not in tools", reason=Reason.BAD_TOOL_CHOICE
            )
    else:
        raise InvalidArgument(
            "tool_choice must be none, auto, required or a named function",
            reason=Reason.BAD_TOOL_CHOICE,
        )
    if mode in ("required", "named") and not parsed:
        raise InvalidArgument(f"tool_choice {mode!r} needs tools", reason=Reason.BAD_TOOL_CHOICE)
    plan = ToolPlan(tuple(parsed), mode, named)
    if plan.forced:  # the grammar of a forced call holds the allowed tools' schemas together
        limits.check_schema(
            call_schema(plan),
            what="the tool-call schema (the allowed tools' parameters together)",
            reason=Reason.BAD_TOOLS,
        )
    return plan


def instruction(plan: ToolPlan) -> str:
    lines = ["You can call these functions:"]
    for tool in plan.tools:
        lines.append(
            f"- {tool.name}: {tool.description} Parameters (JSON Schema): "
            f"{json.dumps(tool.parameters)}"
        )
    lines.append(
        'To call a function, reply with only a JSON object: {"name": "<function name>", '
        '"arguments": {<arguments>}}. Otherwise answer normally.'
    )
    if plan.forced:
        target = plan.named or "one of the functions"
        lines.append(f"Now call {target}.")
    return "\n".join(lines)


def call_schema(plan: ToolPlan) -> dict:
    """JSON Schema every forced reply must match: a call of an allowed function."""
    allowed = [t for t in plan.tools if not plan.named or t.name == plan.named]
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in allowed
    ]
    return variants[0] if len(variants) == 1 else {"oneOf": variants}


def apply(
    plan: ToolPlan, messages: list[common_pb2.ChatMessage], constraint: common_pb2.OutputConstraint
) -> list[common_pb2.ChatMessage]:
    """Messages (and the output constraint) for a request that has tools."""
    if not plan.active:
        return messages
    if plan.forced:
        constraint.json_schema = json.dumps(call_schema(plan))
    system = common_pb2.ChatMessage(role="system", content=instruction(plan))
    if messages and messages[0].role in ("system", "developer"):
        merged = common_pb2.ChatMessage(
            role="system", content=messages[0].content + "\n\n" + system.content
        )
        return [merged, *messages[1:]]
    return [system, *messages]


def history_text(tool_calls) -> str:
    """How an assistant's earlier tool calls appear in the prompt (the same format)."""
    calls = [
        {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}
        for c in tool_calls
    ]
    return json.dumps(calls[0] if len(calls) == 1 else calls)


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return text


def parse_reply(plan: ToolPlan, text: str) -> list[dict] | None:
    """Tool calls in the OpenAI shape if the reply is a call, else None."""
    if not plan.active:
        return None
    candidate = text.strip()
    if not candidate.startswith(("{", "[")):
        return None
    try:
        value = json.loads(candidate)
    except json.JSONDecodeError:
        return None
    calls = value if isinstance(value, list) else [value]
    names = {tool.name for tool in plan.tools}
    result = []
    for call in calls:
        if not isinstance(call, dict) or call.get("name") not in names:
            return None
        arguments = call.get("arguments", {})
        result.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(arguments)},
            }
        )
    return result or None
