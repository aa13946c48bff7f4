"""Turning a GenerateRequest into a runtime request (grammar included)."""

from __future__ import annotations

import json

from edgefleet.errors import InvalidArgument, Reason
from edgefleet.generation import messages_from_proto, sampling_from_proto
from edgefleet.v1 import common_pb2, node_pb2
from node_agent.runtime.base import GenerationRequest


def grammar_from_constraint(constraint: common_pb2.OutputConstraint) -> str | None:
    kind = constraint.WhichOneof("kind")
    if kind is None:
        return None
    from llama_cpp import llama_grammar  # the grammar converters live in llama.cpp's package

    if kind == "gbnf":
        if not constraint.gbnf.strip():
            raise InvalidArgument("constraint.gbnf must not be empty", reason=Reason.BAD_GRAMMAR)
        return constraint.gbnf
    if kind == "json_object":
        return llama_grammar.JSON_GBNF
    try:
        schema = json.loads(constraint.json_schema)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"constraint.json_schema is not valid JSON: {exc}", reason=Reason.BAD_SCHEMA
        ) from exc
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:
        raise InvalidArgument(
            f"constraint.json_schema cannot be used: {exc}", reason=Reason.BAD_SCHEMA
        ) from exc


def generation_request_from_proto(request: node_pb2.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        messages=messages_from_proto(request.messages),
        sampling=sampling_from_proto(request.sampling),
        assistant_prefix=request.assistant_prefix,
        grammar=grammar_from_constraint(request.constraint),
    )
