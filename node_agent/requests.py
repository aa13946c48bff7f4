"""Turning a GenerateRequest into a runtime request (grammar included).

What a request asks for is bounded before any work is spent on it
(``edgefleet.limits``: schema and grammar sizes, nesting, repetitions), and
the heavy steps (schema to GBNF, the chat template, tokenizing) run off the
event loop in a worker thread (``off_loop``), so one huge or hostile request
cannot stall heartbeats or the other streams. A step that fails in a way
nobody foresaw fails that request alone, with a named reason (PREPARE_FAILED,
the caller's error): it never becomes a fault of the node.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TypeVar

from edgefleet import limits
from edgefleet.errors import EdgefleetError, InvalidArgument, Reason
from edgefleet.generation import messages_from_proto, sampling_from_proto
from edgefleet.v1 import common_pb2, node_pb2
from node_agent.runtime.base import GenerationRequest

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_DETAIL_CHARS = 300  # of an exception's text quoted back (it may quote the whole input)


def brief(exc: BaseException) -> str:
    """An exception's type and the start of its text, for an error message."""
    text = str(exc)
    if len(text) > MAX_DETAIL_CHARS:
        text = text[:MAX_DETAIL_CHARS] + "..."
    return f"{type(exc).__name__}: {text}"


def grammar_from_constraint(constraint: common_pb2.OutputConstraint) -> str | None:
    kind = constraint.WhichOneof("kind")
    if kind is None:
        return None
    from llama_cpp import llama_grammar  # the grammar converters live in llama.cpp's package

    if kind == "gbnf":
        if not constraint.gbnf.strip():
            raise InvalidArgument("constraint.gbnf must not be empty", reason=Reason.BAD_GRAMMAR)
        limits.check_grammar(constraint.gbnf, what="constraint.gbnf")
        return constraint.gbnf
    if kind == "json_object":
        return llama_grammar.JSON_GBNF
    schema = limits.check_json_schema(constraint.json_schema, what="constraint.json_schema")
    try:
        gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        # Named on its own: a schema that refers to itself without end. (It is an
        # Exception too, but it must never escape as anything but the request's error.)
        raise InvalidArgument(
            "constraint.json_schema nests or refers to itself too deeply to convert",
            reason=Reason.BAD_SCHEMA,
        ) from None
    except Exception as exc:  # the converter's own refusals: asserts, KeyErrors, ...
        raise InvalidArgument(
            f"constraint.json_schema cannot be used: {brief(exc)}",
            reason=Reason.BAD_SCHEMA,
        ) from exc
    limits.check_grammar(
        gbnf, what="the grammar built from constraint.json_schema", reason=Reason.BAD_SCHEMA
    )
    return gbnf


def generation_request_from_proto(request: node_pb2.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        messages=messages_from_proto(request.messages),
        sampling=sampling_from_proto(request.sampling),
        assistant_prefix=request.assistant_prefix,
        grammar=grammar_from_constraint(request.constraint),
    )


async def off_loop(step: Callable[..., T], *args) -> T:
    """Run one step of preparing a request in a worker thread.

    An ``EdgefleetError`` passes as it is; any other exception is a failure
    nobody foresaw on this one request (a template or converter bug, say):
    it is logged and becomes PREPARE_FAILED, which fails this request only.
    """
    try:
        return await asyncio.to_thread(step, *args)
    except EdgefleetError:
        raise
    except Exception as exc:
        log.exception("preparing a request failed unexpectedly")
        raise InvalidArgument(
            f"the node could not prepare this request: {brief(exc)}",
            reason=Reason.PREPARE_FAILED,
        ) from exc
