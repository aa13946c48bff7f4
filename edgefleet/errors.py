"""Errors with a gRPC status code and a named reason, declared once.

Every failure a client can cause or see is an ``EdgefleetError``: a gRPC
status code, a machine-readable ``Reason`` and a message for people. The
reason travels in the ``edgefleet-reason`` trailing metadata beside the
status (like etcd's ``rpctypes``), so decisions (fail over or not, which HTTP
status, which OpenAI ``code``) read the reason and never the message text:
rewording a message changes nothing but the words.
"""

from __future__ import annotations

import enum

import grpc

Code = grpc.StatusCode


class Reason(enum.Enum):
    """Why a call failed. Each reason has exactly one status code."""

    def __init__(self, code: grpc.StatusCode, doc: str) -> None:
        self.code = code
        self.doc = doc

    # --- the request is at fault (never a node's fault) ----------------------------
    INVALID_REQUEST = (Code.INVALID_ARGUMENT, "a field is missing, malformed or out of range")
    BAD_SAMPLING = (Code.INVALID_ARGUMENT, "a sampling parameter is out of range")
    BAD_STOP = (Code.INVALID_ARGUMENT, "stop strings: too many, or empty")
    BAD_MESSAGES = (Code.INVALID_ARGUMENT, "messages: empty, too many, or an unknown role")
    PROMPT_TOO_LONG = (Code.INVALID_ARGUMENT, "the prompt does not fit the context window")
    BAD_GRAMMAR = (Code.INVALID_ARGUMENT, "the output grammar is invalid")
    BAD_SCHEMA = (Code.INVALID_ARGUMENT, "the JSON schema cannot be turned into a grammar")
    BAD_TOOLS = (Code.INVALID_ARGUMENT, "the tool definitions are invalid")
    BAD_TOOL_CHOICE = (Code.INVALID_ARGUMENT, "tool_choice names no usable tool")
    PREPARE_FAILED = (
        Code.INVALID_ARGUMENT,
        "the node could not prepare this request (its template, grammar or tokens failed)",
    )
    UNKNOWN_MODEL = (Code.NOT_FOUND, "no such model (catalog, file or fleet)")
    SESSION_NOT_FOUND = (Code.NOT_FOUND, "the session is unknown, closed or expired")
    SESSION_BUSY = (Code.ABORTED, "another turn of the session is in progress")
    SESSION_CONFLICT = (Code.ABORTED, "the session changed during the turn")
    SESSION_FULL = (Code.RESOURCE_EXHAUSTED, "the session reached its size limit")
    STORAGE_QUOTA = (
        Code.RESOURCE_EXHAUSTED,
        "the API key holds as many live sessions or stored bytes as its quota allows",
    )
    NODE_NOT_FOUND = (Code.NOT_FOUND, "no such node in the fleet")
    # --- a node cannot take the request now (try another; not a fault) -------------
    MODEL_NOT_LOADED = (Code.FAILED_PRECONDITION, "the node does not have the model loaded")
    MODEL_LOADED = (Code.ALREADY_EXISTS, "the model is already loaded on the node")
    MODEL_UNLOADING = (Code.UNAVAILABLE, "the model is being unloaded")
    NODE_DRAINING = (Code.UNAVAILABLE, "the node is draining and takes no new work")
    QUEUE_FULL = (Code.RESOURCE_EXHAUSTED, "every slot is busy and the queue is full")
    RUNTIME_UNSUPPORTED = (Code.FAILED_PRECONDITION, "the node's runtime cannot do what is asked")
    # --- model files on a node --------------------------------------------------------
    NOT_GGUF = (Code.INVALID_ARGUMENT, "the model file is not a GGUF file")
    MODEL_NOT_CACHED = (Code.NOT_FOUND, "the model is not in the node's model store")
    MODEL_FILE_BAD = (
        Code.FAILED_PRECONDITION,
        "the model file is corrupt (checksum) or incomplete",
    )
    MODEL_FETCH_FAILED = (Code.UNAVAILABLE, "the model could not be fetched")
    MODEL_LOAD_FAILED = (Code.FAILED_PRECONDITION, "the runtime could not load the model")
    MODEL_TOO_BIG = (
        Code.FAILED_PRECONDITION,
        "the model does not fit the memory budget or model count (needed vs available)",
    )
    DISK_FULL = (Code.RESOURCE_EXHAUSTED, "not enough disk space for the model file")
    UPLOAD_INCOMPLETE = (
        Code.INVALID_ARGUMENT,
        "the upload ended before (or went past) the size its header gave",
    )
    # --- the fleet as a whole ---------------------------------------------------------
    NO_READY_NODE = (Code.UNAVAILABLE, "no ready node serves the model")
    NO_MATCHING_NODE = (Code.FAILED_PRECONDITION, "no ready node matches the selector")
    MODEL_DEPLOYED = (Code.FAILED_PRECONDITION, "the model is deployed: undeploy it first")
    UPLOADS_BUSY = (
        Code.RESOURCE_EXHAUSTED,
        "as many model file transfers (uploads, sends to peers) as allowed are running",
    )
    FLEET_SATURATED = (Code.RESOURCE_EXHAUSTED, "every node serving the model is full")
    FAILOVER_EXHAUSTED = (Code.UNAVAILABLE, "the reply failed on too many nodes")
    NODE_PROTOCOL = (Code.FAILED_PRECONDITION, "a node broke the protocol")
    GENERATION_FAILED = (Code.INTERNAL, "the node's engine failed while generating")
    NO_COORDINATOR = (Code.UNAVAILABLE, "no coordinator replica answered")
    # --- the caller's quotas (coordinator.quotas; per replica) ------------------------
    RATE_LIMITED = (Code.RESOURCE_EXHAUSTED, "the caller is over its generation rate limit")
    TOO_MANY_STREAMS = (Code.RESOURCE_EXHAUSTED, "the caller has too many generations at once")
    # --- membership ----------------------------------------------------------------------
    NODE_ID_TAKEN = (Code.ALREADY_EXISTS, "another live node holds this node id")
    STALE_EPOCH = (Code.FAILED_PRECONDITION, "the registration (epoch) is not current")
    NODE_RECORD_TOO_LARGE = (
        Code.INVALID_ARGUMENT,
        "the node's registration or capacity report is over the size limit",
    )
    # --- who is calling (authentication and authorisation) -------------------------
    NOT_AUTHENTICATED = (Code.UNAUTHENTICATED, "no valid credential: API key or certificate")
    NOT_PERMITTED = (Code.PERMISSION_DENIED, "the caller may not do this (scope or identity)")
    TOKEN_MALFORMED = (Code.UNAUTHENTICATED, "the join token is not an edgefleet token")
    TOKEN_UNKNOWN = (Code.UNAUTHENTICATED, "the join token is unknown or was revoked")
    TOKEN_EXPIRED = (Code.UNAUTHENTICATED, "the join token has expired")
    TOKEN_USED_UP = (Code.UNAUTHENTICATED, "the join token has no uses left")
    BAD_CSR = (Code.INVALID_ARGUMENT, "the certificate signing request is invalid")
    NODE_PENDING = (Code.FAILED_PRECONDITION, "the node waits for an operator's approval")
    NODE_REVOKED = (Code.PERMISSION_DENIED, "the node's identity was revoked")
    CA_PIN_MISMATCH = (Code.FAILED_PRECONDITION, "the coordinator's CA is not the pinned one")
    ACCESS_NOT_FOUND = (Code.NOT_FOUND, "no such join token, node identity or API key")
    ACCESS_CONFLICT = (Code.ABORTED, "a concurrent change to the same token or identity")
    # --- the control plane's own state -----------------------------------------------
    ETCD_UNAVAILABLE = (Code.UNAVAILABLE, "etcd could not be reached or refused the call")
    ETCD_COMPACTED = (Code.OUT_OF_RANGE, "the revision is already compacted")
    # --- no specific reason: a peer that named none, or one this build does not know ---
    INTERNAL = (Code.INTERNAL, "an unexpected failure")
    UNSPECIFIED_INVALID = (Code.INVALID_ARGUMENT, "invalid argument, no reason named")
    UNSPECIFIED_NOT_FOUND = (Code.NOT_FOUND, "not found, no reason named")
    UNSPECIFIED_EXISTS = (Code.ALREADY_EXISTS, "already exists, no reason named")
    UNSPECIFIED_PRECONDITION = (Code.FAILED_PRECONDITION, "failed precondition, no reason named")
    UNSPECIFIED_EXHAUSTED = (Code.RESOURCE_EXHAUSTED, "resource exhausted, no reason named")
    UNSPECIFIED_UNAVAILABLE = (Code.UNAVAILABLE, "unavailable, no reason named")
    UNSPECIFIED_ABORTED = (Code.ABORTED, "aborted, no reason named")
    UNSPECIFIED_UNAUTHENTICATED = (Code.UNAUTHENTICATED, "unauthenticated, no reason named")
    UNSPECIFIED_DENIED = (Code.PERMISSION_DENIED, "permission denied, no reason named")

    @classmethod
    def parse(cls, name: str) -> Reason | None:
        """The reason named ``name`` (from a peer: anything may arrive), else None."""
        member = cls.__members__.get(name)
        return member if isinstance(member, cls) else None


REASON_METADATA_KEY = "edgefleet-reason"
RETRY_AFTER_METADATA_KEY = "retry-after-ms"


class EdgefleetError(Exception):
    """An error with its gRPC status code and named reason."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: Reason = Reason.INTERNAL

    def __init__(
        self, message: str, *, reason: Reason | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        if self.reason.code != self.code:
            # The reason decides the code: a class is only a shorthand.
            self.code = self.reason.code
        # Hint for RESOURCE_EXHAUSTED/UNAVAILABLE: when a retry may succeed.
        self.retry_after_s = retry_after_s


class InvalidArgument(EdgefleetError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = Reason.UNSPECIFIED_INVALID


class NotFound(EdgefleetError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = Reason.UNSPECIFIED_NOT_FOUND


class AlreadyExists(EdgefleetError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = Reason.UNSPECIFIED_EXISTS


class FailedPrecondition(EdgefleetError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = Reason.UNSPECIFIED_PRECONDITION


class ResourceExhausted(EdgefleetError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = Reason.UNSPECIFIED_EXHAUSTED


class Unavailable(EdgefleetError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = Reason.UNSPECIFIED_UNAVAILABLE


class Aborted(EdgefleetError):
    code = grpc.StatusCode.ABORTED
    default_reason = Reason.UNSPECIFIED_ABORTED


class Unauthenticated(EdgefleetError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = Reason.UNSPECIFIED_UNAUTHENTICATED


class PermissionDenied(EdgefleetError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = Reason.UNSPECIFIED_DENIED


_BY_CODE: dict[grpc.StatusCode, type[EdgefleetError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Aborted,
        Unauthenticated,
        PermissionDenied,
    )
}


def error_of(reason: Reason, message: str, *, retry_after_s: float | None = None):
    """An error for ``reason``, of the class that matches its code."""
    cls = _BY_CODE.get(reason.code, EdgefleetError)
    return cls(message, reason=reason, retry_after_s=retry_after_s)


def trailers_of(error: EdgefleetError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that carries an error's reason and retry hint."""
    trailers = [(REASON_METADATA_KEY, error.reason.name)]
    if error.retry_after_s is not None:
        trailers.append((RETRY_AFTER_METADATA_KEY, str(int(error.retry_after_s * 1000))))
    return tuple(trailers)


# A status message travels percent-encoded in the grpc-message header, which a
# client refuses beyond 8-16 KiB: a message quoting a huge input is cut.
MAX_MESSAGE_CHARS = 300


def bounded_message(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[:MAX_MESSAGE_CHARS] + f"... ({len(message)} characters)"


async def abort_with(context: grpc.aio.ServicerContext, error: EdgefleetError) -> None:
    """End an RPC with the error's status, its reason and its retry hint."""
    context.set_trailing_metadata(trailers_of(error))
    await context.abort(error.code, bounded_message(error.message))


def reason_of(error: grpc.RpcError) -> Reason | None:
    """The named reason a failed call carried in its trailers (None: none or unknown)."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == REASON_METADATA_KEY:
            return Reason.parse(value if isinstance(value, str) else "")
    return None


def error_from_rpc(error: grpc.RpcError) -> EdgefleetError:
    """The EdgefleetError a gRPC failure stands for.

    With a named reason the code follows the reason; without one (a peer that
    is not edgefleet, a transport failure) the status code picks the class.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    retry_after_s = None
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == RETRY_AFTER_METADATA_KEY:
            try:
                retry_after_s = max(0.0, min(int(value) / 1000, 3600.0))
            except (TypeError, ValueError):
                retry_after_s = None
    reason = reason_of(error)
    if reason is not None and reason.code == code:
        return error_of(reason, details or code.name, retry_after_s=retry_after_s)
    cls = _BY_CODE.get(code)
    if cls is None:
        return EdgefleetError(details or code.name, retry_after_s=retry_after_s)
    return cls(details or code.name, retry_after_s=retry_after_s)
