"""A small client for the coordinator's gRPC API, used by the CLI and tests.

It takes a list of coordinator addresses and moves to the next one when a
replica cannot be reached, so any replica can serve any call.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from edgefleet.errors import EdgefleetError, Reason, error_from_rpc, error_of, reason_of
from edgefleet.generation import continued, count_carried_tokens
from edgefleet.profile import Profile
from edgefleet.v1 import (
    access_pb2_grpc,
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

# Codes after which another replica may succeed.
FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class ReplyStream:
    """A streamed reply: iterate it for chunks; ``cancel()`` (from any thread)
    abandons it, and the coordinator stops the generation."""

    def __init__(self) -> None:
        self.call = None
        self.cancelled = False
        self._chunks: Iterator[coordinator_pb2.ChatChunk] = iter(())

    def bind(self, chunks: Iterator[coordinator_pb2.ChatChunk]) -> None:
        self._chunks = chunks

    def __iter__(self) -> ReplyStream:
        return self

    def __next__(self) -> coordinator_pb2.ChatChunk:
        return next(self._chunks)

    def cancel(self) -> None:
        self.cancelled = True
        if self.call is not None:
            self.call.cancel()

    def close(self) -> None:
        self.cancel()


UPLOAD_CHUNK = 1 << 20  # bytes per AddModel message (the coordinator's most)


class FleetClient:
    """``ca_pem`` (the fleet CA: TLS) and ``api_key`` (sent as a Bearer token)
    come from a client profile (``from_profile``); without, plaintext."""

    def __init__(
        self,
        addresses: list[str] | str,
        *,
        timeout_s: float = 30.0,
        ca_pem: str | bytes = "",
        api_key: str = "",
    ) -> None:
        if isinstance(addresses, str):
            addresses = [a.strip() for a in addresses.split(",") if a.strip()]
        if not addresses:
            raise ValueError("at least one coordinator address is needed")
        self.addresses = addresses
        self.timeout_s = timeout_s
        profile = Profile(
            ca_pem=ca_pem.decode() if isinstance(ca_pem, bytes) else ca_pem, api_key=api_key
        )
        credentials = profile.credentials()
        self._channels = {
            a: (
                grpc.secure_channel(a, credentials, options=profile.channel_options())
                if credentials is not None
                else grpc.insecure_channel(a)
            )
            for a in addresses
        }
        self._preferred = 0

    @classmethod
    def from_profile(
        cls, profile: Profile, addresses: list[str] | None = None, *, api_key: str = "", **kwargs
    ) -> FleetClient:
        return cls(
            addresses or profile.coordinators,
            ca_pem=profile.ca_pem,
            api_key=api_key or profile.api_key,
            **kwargs,
        )

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stubs(self, service=None):
        """Stubs in the order to try them: the last replica that worked first."""
        service = service or coordinator_pb2_grpc.CoordinatorServiceStub
        count = len(self.addresses)
        for offset in range(count):
            index = (self._preferred + offset) % count
            yield index, service(self._channels[self.addresses[index]])

    def access(self, method: str, request, timeout_s: float | None = None):
        """One AccessService call (tokens, node identities, keys, audit)."""
        return self._unary(method, request, timeout_s, service=access_pb2_grpc.AccessServiceStub)

    def registry(self, method: str, request, timeout_s: float | None = None):
        """One ModelService call (the fleet's model registry)."""
        return self._unary(method, request, timeout_s, service=models_pb2_grpc.ModelServiceStub)

    def add_model(
        self,
        path,
        header: models_pb2.AddModelHeader,
        *,
        progress=None,
        timeout_s: float = 3600.0,
    ) -> models_pb2.RegisteredModel:
        """Upload a GGUF file to the fleet registry (to one replica: the file is
        kept where it was sent). ``progress(bytes_sent)`` after each chunk."""
        from pathlib import Path

        path = Path(path)
        header.size_bytes = path.stat().st_size
        header.file_name = header.file_name or path.name

        def messages():
            yield models_pb2.AddModelRequest(header=header)
            sent = 0
            with path.open("rb") as f:
                while data := f.read(UPLOAD_CHUNK):
                    yield models_pb2.AddModelRequest(chunk=data)
                    sent += len(data)
                    if progress is not None:
                        progress(sent)

        _, stub = next(self._stubs(models_pb2_grpc.ModelServiceStub))
        try:
            return stub.AddModel(messages(), timeout=timeout_s)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE and reason_of(error) is None:
                raise self._exhausted(error) from None
            raise error_from_rpc(error) from None

    def _unary(self, method: str, request, timeout_s: float | None = None, service=None):
        last: grpc.RpcError | None = None
        for index, stub in self._stubs(service):
            try:
                reply = getattr(stub, method)(request, timeout=timeout_s or self.timeout_s)
                self._preferred = index
                return reply
            except grpc.RpcError as error:
                if error.code() not in FAILOVER_CODES:
                    raise error_from_rpc(error) from None
                last = error
        raise self._exhausted(last)

    def _exhausted(self, last: grpc.RpcError | None) -> EdgefleetError:
        """Every replica failed; say why the last one did."""
        if last is None:
            return error_of(
                Reason.NO_COORDINATOR, f"no coordinator answered ({', '.join(self.addresses)})"
            )
        if last.code() == grpc.StatusCode.UNAVAILABLE and reason_of(last) is None:
            # No coordinator said why: the transport failed (nothing listening, unreachable).
            return error_of(
                Reason.NO_COORDINATOR,
                f"no coordinator answered ({', '.join(self.addresses)}): {last.details()}",
            )
        return error_from_rpc(last)

    def _stream(self, method: str, request) -> ReplyStream:
        reply = ReplyStream()
        reply.bind(self._replies(method, request, reply))
        return reply

    def _replies(
        self, method: str, request, reply: ReplyStream
    ) -> Iterator[coordinator_pb2.ChatChunk]:
        """Stream a reply; if the replica dies mid-reply, resume it on another one.

        The request is re-sent with the text received so far as
        ``assistant_prefix`` (and, for a chat turn, the turn id), so the reply
        goes on where it stopped and the turn is stored once.
        """
        last: grpc.RpcError | None = None
        received: list[str] = []
        received_tokens = 0
        turn_id = ""
        for index, stub in self._stubs():
            attempt = self._resumed(request, turn_id, "".join(received), received_tokens)
            if attempt is None:  # max_tokens was reached just as the replica failed
                yield coordinator_pb2.ChatChunk(
                    finish_reason=common_pb2.FINISH_REASON_LENGTH,
                    usage=common_pb2.Usage(completion_tokens=received_tokens),
                    turn_id=turn_id,
                )
                return
            carried = received_tokens
            call = getattr(stub, method)(attempt, timeout=None)
            reply.call = call
            try:
                for chunk in call:
                    self._preferred = index
                    turn_id = turn_id or chunk.turn_id
                    received.append(chunk.text)
                    received_tokens += chunk.token_count
                    if chunk.finish_reason:
                        # Usage of the whole reply, not just the resumed part.
                        count_carried_tokens(chunk.usage, carried)
                    yield chunk
                return
            except grpc.RpcError as error:
                if reply.cancelled or error.code() not in FAILOVER_CODES:
                    raise error_from_rpc(error) from None
                last = error
            finally:
                call.cancel()
        raise self._exhausted(last)

    @staticmethod
    def _resumed(request, turn_id: str, received: str, received_tokens: int):
        """The request that resumes a reply after ``received``; None if it is complete."""
        if not turn_id and not received:
            return request
        resumed = continued(request, received, received_tokens)
        if resumed is not None and turn_id and hasattr(resumed, "resume_turn_id"):
            resumed.resume_turn_id = turn_id
        return resumed

    # --- API ------------------------------------------------------------------------
    def create_session(
        self,
        model: str,
        *,
        system_prompt: str = "",
        metadata: dict | None = None,
        idle_ttl_s: float = 0.0,
    ) -> coordinator_pb2.Session:
        return self._unary(
            "CreateSession",
            coordinator_pb2.CreateSessionRequest(
                model=model,
                system_prompt=system_prompt,
                metadata=metadata or {},
                idle_ttl_seconds=idle_ttl_s,
            ),
        )

    def chat(self, session_id: str, content: str, **sampling) -> ReplyStream:
        return self._stream(
            "Chat",
            coordinator_pb2.ChatRequest(
                session_id=session_id,
                content=content,
                sampling=common_pb2.SamplingParams(**sampling),
            ),
        )

    def complete(
        self,
        model: str,
        messages: list[tuple[str, str]],
        *,
        assistant_prefix: str = "",
        constraint: common_pb2.OutputConstraint | None = None,
        **sampling,
    ) -> ReplyStream:
        return self._stream(
            "Complete",
            coordinator_pb2.CompleteRequest(
                model=model,
                messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages],
                sampling=common_pb2.SamplingParams(**sampling),
                assistant_prefix=assistant_prefix,
                constraint=constraint,
            ),
        )

    def get_session(self, session_id: str) -> coordinator_pb2.Session:
        return self._unary("GetSession", coordinator_pb2.GetSessionRequest(session_id=session_id))

    def close_session(self, session_id: str) -> None:
        self._unary("CloseSession", coordinator_pb2.CloseSessionRequest(session_id=session_id))

    def status(self) -> coordinator_pb2.FleetStatusResponse:
        return self._unary("FleetStatus", coordinator_pb2.FleetStatusRequest(), timeout_s=10)

    def drain(self, node_id: str, drain: bool = True) -> coordinator_pb2.DrainNodeResponse:
        return self._unary(
            "DrainNode", coordinator_pb2.DrainNodeRequest(node_id=node_id, drain=drain)
        )

    def models(self) -> coordinator_pb2.ListFleetModelsResponse:
        return self._unary("ListModels", coordinator_pb2.ListFleetModelsRequest())
