"""One turn of a conversation on the fleet: the use case behind every chat API.

gRPC ``Chat`` (a stored session), gRPC ``Complete`` and both HTTP APIs
(stateless: the client sends the history) all go through ``Turns``. One path
ranks the nodes, generates with failover and relays the chunks
(``_generate``); a session turn wraps it in the session's lock and commits
the turn before the client hears it is over.

Affinity: a session remembers its node; a stateless conversation is known by
the client's key, else a hash of its opening messages, so a continued
conversation returns to the node that has its prefix cached.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence

from coordinator.fleet import FleetView
from coordinator.metrics import CoordinatorMetrics
from coordinator.model_loads import LoadNote, ModelLoads
from coordinator.quotas import Quotas
from coordinator.router import Router
from coordinator.sessions import Sessions, Turn
from coordinator.tracking import RequestTracker
from edgefleet import limits
from edgefleet.auth import CALLER
from edgefleet.errors import EdgefleetError, Reason, Unavailable, error_of
from edgefleet.generation import messages_from_proto, sampling_from_proto
from edgefleet.v1 import common_pb2, coordinator_pb2, node_pb2

MAX_TURN_BYTES = 256 * 1024
# How long a finished turn waits for etcd to come back before giving up.
COMMIT_RETRY_S = 10.0

# (reply chunk, placement decision µs): what every turn yields.
Relayed = tuple[coordinator_pb2.ChatChunk, float]


class AffinityTable:
    """Which node last served a conversation (bounded, most recent kept)."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._nodes: collections.OrderedDict[str, str] = collections.OrderedDict()

    def get(self, key: str) -> str:
        node = self._nodes.get(key, "")
        if node:
            self._nodes.move_to_end(key)
        return node

    def remember(self, key: str, node_id: str) -> None:
        self._nodes[key] = node_id
        self._nodes.move_to_end(key)
        while len(self._nodes) > self._capacity:
            self._nodes.popitem(last=False)


def conversation_key(request: coordinator_pb2.CompleteRequest) -> str:
    """The client's affinity key, else a hash of the conversation's opening
    messages (through the first user message), which every later request of
    the same conversation repeats."""
    if request.affinity_key:
        return "key:" + request.affinity_key
    digest = hashlib.sha256(request.model.encode())
    for message in request.messages:
        digest.update(f"\0{message.role}\0{message.content}".encode())
        if message.role == "user":
            break
    return "prefix:" + digest.hexdigest()


class Turns:
    def __init__(
        self,
        router: Router,
        sessions: Sessions,
        fleet: FleetView,
        metrics: CoordinatorMetrics | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self._quotas = quotas or Quotas()  # the caller's rate and streams (none: no limits)
        self._router = router
        self._sessions = sessions
        self._fleet = fleet
        self._metrics = metrics
        self._affinity = AffinityTable()

    # --- sessions ------------------------------------------------------------------------

    @property
    def loads(self) -> ModelLoads:
        """Models loaded on demand (and which could be)."""
        return self._router.loads

    async def create_session(
        self, request: coordinator_pb2.CreateSessionRequest
    ) -> coordinator_pb2.Session:
        if request.model not in self._fleet.models() and not self.loads.loadable(request.model):
            raise error_of(
                Reason.UNKNOWN_MODEL, f"no node in the fleet serves model {request.model!r}"
            )
        return await self._sessions.create(request)

    async def session_turn(
        self, request: coordinator_pb2.ChatRequest, *, metadata: Sequence = ()
    ) -> AsyncIterator[Relayed]:
        """One turn of a stored session: the turn id first, then the reply.

        The turn is committed before its last chunk goes out, so the next turn
        (on any replica) sees it; a failed or abandoned turn releases the lock.
        """
        with RequestTracker("Chat", metadata, self._metrics, request.sampling) as tracker:
            try:
                if not request.content.strip():
                    raise error_of(Reason.BAD_MESSAGES, "content must not be empty")
                if len(request.content.encode()) > MAX_TURN_BYTES:
                    raise error_of(Reason.BAD_MESSAGES, f"content is over {MAX_TURN_BYTES} bytes")
                sampling_from_proto(request.sampling)
                turn = await self._sessions.begin_turn(
                    request.session_id, request.content, request.resume_turn_id
                )
            except EdgefleetError as error:
                tracker.failed(error)
                raise
            session = turn.session
            tracker.describe(session.model, session.session_id, self._router.policy)
            if turn.already_stored:
                # The first replica stored this turn before it failed: hand over the rest.
                stored = session.messages[-1].content
                yield (
                    coordinator_pb2.ChatChunk(
                        text=stored[len(request.assistant_prefix) :],
                        finish_reason=common_pb2.FINISH_REASON_STOP,
                        node_id=session.node_id,
                        session_id=session.session_id,
                        model=session.model,
                        turn_id=turn.turn_id,
                    ),
                    0.0,
                )
                return
            try:
                # The turn id first: a client that loses this replica resumes with it.
                yield (
                    coordinator_pb2.ChatChunk(session_id=session.session_id, turn_id=turn.turn_id),
                    0.0,
                )
                generate = node_pb2.GenerateRequest(
                    request_id=turn.turn_id,
                    model=session.model,
                    messages=[
                        *session.messages,
                        common_pb2.ChatMessage(role="user", content=request.content),
                    ],
                    sampling=request.sampling,
                    assistant_prefix=request.assistant_prefix,
                    session_id=session.session_id,
                )
                text = [request.assistant_prefix]
                final = None
                async for reply, placement_us in self._generate(
                    generate, tracker, affinity_node=session.node_id, session_id=session.session_id
                ):
                    if reply.finish_reason:
                        final = reply, placement_us
                        break
                    text.append(reply.text)
                    yield reply, placement_us
                if final is None:
                    raise error_of(Reason.INTERNAL, "the node ended the stream without finishing")
                await self._commit(turn, request.content, "".join(text), final[0].node_id)
                yield final
            except EdgefleetError as error:
                tracker.failed(error)
                await self._release(turn)
                raise
            except BaseException:
                await self._release(turn)
                raise

    async def _commit(self, turn: Turn, content: str, reply: str, node_id: str) -> None:
        """Store the turn; if etcd is briefly away, retry for a while first."""
        deadline = asyncio.get_running_loop().time() + COMMIT_RETRY_S
        while True:
            try:
                await self._sessions.commit_turn(turn, content, reply, node_id)
                return
            except Unavailable:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _release(self, turn: Turn) -> None:
        with contextlib.suppress(EdgefleetError):  # etcd down: the lock expires with us
            await self._sessions.release(turn)

    # --- stateless ---------------------------------------------------------------------------
    async def complete(
        self,
        request: coordinator_pb2.CompleteRequest,
        *,
        method: str,
        metadata: Sequence = (),
        note: LoadNote | None = None,
    ) -> AsyncIterator[Relayed]:
        """A reply to a whole conversation the client sends; raises EdgefleetError.
        ``note`` learns how long the request waited for its model to load, if it did."""
        with RequestTracker(method, metadata, self._metrics, request.sampling) as tracker:
            tracker.describe(request.model, "", self._router.policy)
            try:
                messages_from_proto(request.messages)
                sampling_from_proto(request.sampling)
                # Refused here, before a node spends anything on it (nodes check again).
                limits.check_constraint(
                    request.constraint,
                    schema_field="constraint.json_schema",
                    grammar_field="constraint.gbnf",
                )
                generate = node_pb2.GenerateRequest(
                    request_id=uuid.uuid4().hex,
                    model=request.model,
                    messages=request.messages,
                    sampling=request.sampling,
                    constraint=request.constraint,
                    tools=request.tools,
                    assistant_prefix=request.assistant_prefix,
                )
                key = conversation_key(request)
                async for reply, placement_us in self._generate(
                    generate, tracker, affinity_node=self._affinity.get(key), note=note
                ):
                    if reply.finish_reason:
                        self._affinity.remember(key, reply.node_id)
                    yield reply, placement_us
            except EdgefleetError as error:
                tracker.failed(error)
                raise

    # --- the one path: rank, generate with failover, relay -----------------------------
    async def _generate(
        self,
        generate: node_pb2.GenerateRequest,
        tracker: RequestTracker,
        *,
        affinity_node: str,
        session_id: str = "",
        note: LoadNote | None = None,
    ) -> AsyncIterator[Relayed]:
        """The reply's text chunks, then its final chunk (usage, finish reason).
        Every generation passes here, so here the caller's quotas are spent, and
        a model no ready node serves is loaded on demand (the wait is the
        ranking's: the first token comes later, without an error)."""
        with self._quotas.admit(CALLER.get()) as admission:
            ranking, wait = await self._router.place(
                generate.model, affinity_node=affinity_node, parent=tracker.context
            )
            if note is not None:
                note.wait = wait
            async for chunk in self._router.generate(generate, ranking, parent=tracker.context):
                reply = tracker.relay(chunk, session_id)
                if chunk.finish_reason:
                    admission.release()  # the generation is over, however long it is read
                    yield reply, ranking.decision_us
                    return
                if chunk.text:
                    yield reply, ranking.decision_us
