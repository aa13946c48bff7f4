"""Errors that carry a gRPC status code.

Every failure a client can cause or see is one of these, raised anywhere in
either daemon and turned into a gRPC status (and later an HTTP status) in one
place, so codes stay consistent across the system.
"""

from __future__ import annotations

import grpc


class EdgefleetError(Exception):
    """Base class: an error with the gRPC status code that describes it."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Hint for RESOURCE_EXHAUSTED/UNAVAILABLE: when a retry may succeed.
        self.retry_after_s = retry_after_s


class InvalidArgument(EdgefleetError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(EdgefleetError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(EdgefleetError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(EdgefleetError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(EdgefleetError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(EdgefleetError):
    code = grpc.StatusCode.UNAVAILABLE


class Aborted(EdgefleetError):
    code = grpc.StatusCode.ABORTED


RETRY_AFTER_METADATA_KEY = "retry-after-ms"


async def abort_with(context: grpc.aio.ServicerContext, error: EdgefleetError) -> None:
    """End an RPC with the error's status; adds a retry hint when there is one."""
    if error.retry_after_s is not None:
        context.set_trailing_metadata(
            ((RETRY_AFTER_METADATA_KEY, str(int(error.retry_after_s * 1000))),)
        )
    await context.abort(error.code, error.message)


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Aborted,
    )
}


def error_from_rpc(error: grpc.RpcError) -> EdgefleetError:
    """The EdgefleetError a gRPC failure stands for (INTERNAL when unknown)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    retry_after_s = None
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == RETRY_AFTER_METADATA_KEY:
            retry_after_s = int(value) / 1000
    cls = _BY_CODE.get(code, EdgefleetError)
    return cls(details or code.name, retry_after_s=retry_after_s)
