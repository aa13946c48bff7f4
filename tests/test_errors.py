"""Named error reasons: declared once, carried in trailers, and the only thing
decisions read (fail over or not, HTTP status, OpenAI code). No processes."""

from __future__ import annotations

import grpc
import pytest

from coordinator.openai_common import api_error
from coordinator.router import Verdict, verdict
from edgefleet.errors import (
    REASON_METADATA_KEY,
    RETRY_AFTER_METADATA_KEY,
    EdgefleetError,
    InvalidArgument,
    Reason,
    error_from_rpc,
    error_of,
    reason_of,
    trailers_of,
)

Code = grpc.StatusCode


class FakeRpcError(grpc.RpcError):
    """What a failed call looks like to its caller."""

    def __init__(self, code, details="", trailers=()):
        self._code, self._details, self._trailers = code, details, tuple(trailers)

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


def rpc_error_of(error: EdgefleetError) -> FakeRpcError:
    return FakeRpcError(error.code, error.message, trailers_of(error))


def test_every_reason_declares_its_code_once_and_names_are_unique():
    assert len({r.name for r in Reason}) == len(Reason)
    assert all(isinstance(r.code, grpc.StatusCode) and r.doc for r in Reason)


@pytest.mark.parametrize("reason", list(Reason))
def test_a_reason_survives_the_wire(reason):
    sent = error_of(reason, "whatever the words", retry_after_s=1.5)
    received = error_from_rpc(rpc_error_of(sent))
    assert received.reason is reason
    assert received.code == reason.code
    assert received.retry_after_s == 1.5
    assert received.message == "whatever the words"


def test_a_peer_without_a_reason_or_with_a_bogus_one_gets_the_codes_generic_reason():
    for trailers in ((), ((REASON_METADATA_KEY, "NO_SUCH_REASON"),)):
        received = error_from_rpc(FakeRpcError(Code.UNAVAILABLE, "down", trailers))
        assert received.reason is Reason.UNSPECIFIED_UNAVAILABLE
    # A reason that does not match the status code is not believed.
    lying = FakeRpcError(Code.INTERNAL, "x", ((REASON_METADATA_KEY, "PROMPT_TOO_LONG"),))
    assert error_from_rpc(lying).code == Code.INTERNAL
    assert error_from_rpc(lying).reason is Reason.INTERNAL


def test_a_hostile_retry_hint_is_bounded_or_ignored():
    huge = FakeRpcError(Code.RESOURCE_EXHAUSTED, "", ((RETRY_AFTER_METADATA_KEY, "9" * 30),))
    assert error_from_rpc(huge).retry_after_s == 3600.0
    junk = FakeRpcError(Code.RESOURCE_EXHAUSTED, "", ((RETRY_AFTER_METADATA_KEY, "soon"),))
    assert error_from_rpc(junk).retry_after_s is None


def test_the_reason_decides_the_code_not_the_class():
    error = InvalidArgument("x", reason=Reason.QUEUE_FULL)
    assert error.code == Code.RESOURCE_EXHAUSTED


# --- fail over or not --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        # the node cannot take it now: next node, the node is not blamed
        (Code.RESOURCE_EXHAUSTED, Reason.QUEUE_FULL, Verdict.NEXT_NODE),
        (Code.FAILED_PRECONDITION, Reason.MODEL_NOT_LOADED, Verdict.NEXT_NODE),
        (Code.UNAVAILABLE, Reason.NODE_DRAINING, Verdict.NEXT_NODE),
        (Code.UNAVAILABLE, Reason.MODEL_UNLOADING, Verdict.NEXT_NODE),
        (Code.FAILED_PRECONDITION, Reason.RUNTIME_UNSUPPORTED, Verdict.NEXT_NODE),
        # the request is at fault: the client hears it, no node is blamed
        (Code.INVALID_ARGUMENT, Reason.PROMPT_TOO_LONG, Verdict.CALLER_ERROR),
        (Code.INVALID_ARGUMENT, Reason.BAD_GRAMMAR, Verdict.CALLER_ERROR),
        (Code.INVALID_ARGUMENT, Reason.BAD_SCHEMA, Verdict.CALLER_ERROR),
        (Code.INVALID_ARGUMENT, Reason.BAD_SAMPLING, Verdict.CALLER_ERROR),
        (Code.NOT_FOUND, Reason.UNKNOWN_MODEL, Verdict.CALLER_ERROR),
        # the node broke
        (Code.INTERNAL, Reason.GENERATION_FAILED, Verdict.NODE_FAULT),
        (Code.FAILED_PRECONDITION, Reason.MODEL_FILE_BAD, Verdict.NODE_FAULT),
        (Code.UNAVAILABLE, None, Verdict.NODE_FAULT),  # connection refused, reset
        (Code.DEADLINE_EXCEEDED, None, Verdict.NODE_FAULT),
        (Code.UNIMPLEMENTED, None, Verdict.NODE_FAULT),  # not a node at all
        (Code.INVALID_ARGUMENT, None, Verdict.NODE_FAULT),  # a node always names its reason
        (Code.INTERNAL, Reason.PROMPT_TOO_LONG, Verdict.NODE_FAULT),  # reason and code disagree
        # a full node that names no reason is still only full
        (Code.RESOURCE_EXHAUSTED, None, Verdict.NEXT_NODE),
    ],
)
def test_verdict_is_decided_by_reason(code, reason, expected):
    assert verdict(code, reason) is expected


def test_rewording_a_message_changes_no_decision():
    for words in ("model not loaded", "completely different words", ""):
        error = error_of(Reason.MODEL_NOT_LOADED, words)
        wire = rpc_error_of(error)
        assert verdict(wire.code(), reason_of(wire)) is Verdict.NEXT_NODE
        assert api_error(error).status == 400


# --- HTTP status and OpenAI fields ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("reason", "status", "type_", "param", "code"),
    [
        (Reason.PROMPT_TOO_LONG, 400, "invalid_request_error", "messages",
         "context_length_exceeded"),
        (Reason.BAD_SCHEMA, 400, "invalid_request_error", "response_format.json_schema", None),
        (Reason.BAD_GRAMMAR, 400, "invalid_request_error", "response_format", None),
        (Reason.BAD_STOP, 400, "invalid_request_error", "stop", None),
        (Reason.BAD_TOOLS, 400, "invalid_request_error", "tools", None),
        (Reason.BAD_TOOL_CHOICE, 400, "invalid_request_error", "tool_choice", None),
        (Reason.UNKNOWN_MODEL, 404, "not_found_error", None, "model_not_found"),
        (Reason.SESSION_BUSY, 409, "conflict_error", None, None),
        (Reason.FLEET_SATURATED, 429, "rate_limit_error", None, None),
        (Reason.QUEUE_FULL, 429, "rate_limit_error", None, None),
        (Reason.NO_READY_NODE, 503, "service_unavailable_error", None, None),
        (Reason.FAILOVER_EXHAUSTED, 503, "service_unavailable_error", None, None),
        (Reason.INTERNAL, 500, "server_error", None, None),
    ],
)  # fmt: skip
def test_http_mapping_reads_the_reason(reason, status, type_, param, code):
    error = api_error(error_of(reason, "words that decide nothing", retry_after_s=2.4))
    assert (error.status, error.type, error.param, error.code) == (status, type_, param, code)
    if status in (429, 503):
        assert error.headers == {"Retry-After": "2"}
    else:
        assert error.headers == {}
