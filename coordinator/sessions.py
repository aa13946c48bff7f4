"""Agent sessions stored in etcd: history, idle expiry, one turn at a time.

A session lives under its own lease, so it expires after ``idle_ttl`` without
a turn. A turn takes the session's turn lock (a key under this replica's
lease, so a dead replica's lock goes with it), generates, then commits the
user and assistant messages in one transaction that checks the session was
not changed meanwhile: two replicas can never interleave turns of a session.

Stored Responses-API conversations (``previous_response_id``) live here too:
the same record, under the same idle TTL, in their own key space.

Every record counts against its API key's storage quota (``coordinator.usage``):
its usage key is written in the record's own transaction, under its lease.

A commit whose outcome is unknown (etcd's reply lost: a timeout, a broken
connection) is resolved by reading the session back: if it holds the turn's
id, the turn was stored and the commit succeeded. The commit is guarded by
the session's revision, so the same turn can never be stored twice, however
often it is retried.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.etcd import Compare, Delete, Etcd, Put
from coordinator.keys import Keys
from coordinator.usage import RESPONSES, SESSIONS, StorageLimits, StorageQuota, charged
from edgefleet.auth import CALLER, owner_may_see
from edgefleet.errors import (
    Aborted,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from edgefleet.v1 import common_pb2, coordinator_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionLimits:
    max_messages: int = 512
    max_bytes: int = 512 * 1024  # etcd's request limit is 1.5 MiB
    default_idle_ttl_s: float = 1800.0
    max_idle_ttl_s: float = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Turn:
    session: coordinator_pb2.Session
    mod_revision: int
    lease: int
    turn_id: str
    lock_value: bytes  # "<turn id>@<replica id>": who holds the turn lock
    stored_bytes: int = 0  # the session's size in etcd when the turn began

    @property
    def already_stored(self) -> bool:
        """A resumed turn that its first replica stored before it failed."""
        return self.session.last_turn_id == self.turn_id


class Sessions:
    def __init__(
        self,
        etcd: Etcd,
        keys: Keys,
        *,
        limits: SessionLimits,
        replica_lease: Callable[[], int],
        coordinator_id: str,
        storage: StorageLimits | None = None,
    ) -> None:
        self._etcd = etcd
        self._keys = keys
        self.limits = limits
        self.quota = StorageQuota(etcd, keys, storage or StorageLimits())
        self._replica_lease = replica_lease  # () -> this replica's current lease id
        self._coordinator_id = coordinator_id

    async def create(
        self, request: coordinator_pb2.CreateSessionRequest
    ) -> coordinator_pb2.Session:
        ttl = request.idle_ttl_seconds or self.limits.default_idle_ttl_s
        if not 1 <= ttl <= self.limits.max_idle_ttl_s:
            raise InvalidArgument(
                f"idle_ttl_seconds must be in [1, {self.limits.max_idle_ttl_s:.0f}], got {ttl:g}",
                reason=Reason.INVALID_REQUEST,
            )
        # The lease is the idle TTL, in whole seconds as etcd grants them: the
        # session never outlives what it says.
        ttl = float(max(1, round(ttl)))
        now = time.time()
        session = coordinator_pb2.Session(
            session_id=uuid.uuid4().hex,
            model=request.model,
            metadata=dict(request.metadata),
            created_at=now,
            updated_at=now,
            idle_ttl_seconds=ttl,
            owner=CALLER.get().owner,
        )
        if request.system_prompt:
            session.messages.append(
                common_pb2.ChatMessage(role="system", content=request.system_prompt)
            )
        self._check_size(session)
        record = session.SerializeToString()
        await self.quota.check(session.owner, new_sessions=1, added_bytes=charged(len(record)))
        lease = await self._etcd.grant(ttl)
        await self._etcd.txn(
            [],
            [
                Put(self._keys.session(session.session_id), record, lease=lease),
                *self.quota.record(session.owner, SESSIONS, session.session_id, len(record), lease),
            ],
        )
        return session

    async def get(self, session_id: str) -> tuple[coordinator_pb2.Session, int, int]:
        """(session, mod_revision, lease); NotFound when unknown or expired."""
        session, kv = await self._read(session_id)
        return session, kv.mod_revision, kv.lease

    async def _read(self, session_id: str):
        """(session, its KeyValue); NotFound when unknown, expired or another key's."""
        if not session_id:
            raise InvalidArgument("session_id must not be empty", reason=Reason.INVALID_REQUEST)
        kv = await self._etcd.get(self._keys.session(session_id))
        session = coordinator_pb2.Session.FromString(kv.value) if kv is not None else None
        # Another key's session is as absent as an unknown one: nothing leaks.
        if session is None or not owner_may_see(session.owner, CALLER.get()):
            raise NotFound(
                f"session {session_id!r} not found (unknown, closed or expired)",
                reason=Reason.SESSION_NOT_FOUND,
            )
        return session, kv

    async def begin_turn(
        self, session_id: str, user_content: str, resume_turn_id: str = ""
    ) -> Turn:
        """Take the session's turn lock (or, resuming, take it over from a failed replica)."""
        session, kv = await self._read(session_id)
        revision, lease, stored_bytes = kv.mod_revision, kv.lease, len(kv.value)
        key = self._keys.turn(session_id)
        if resume_turn_id:
            turn_id = resume_turn_id
            lock_value = f"{turn_id}@{self._coordinator_id}".encode()
            if session.last_turn_id == turn_id:
                return Turn(session, revision, lease, turn_id, lock_value, stored_bytes)
            held = await self._etcd.get(key)
            if held is not None and not held.value.startswith(f"{turn_id}@".encode()):
                raise Aborted(
                    f"another turn of session {session_id} is in progress",
                    reason=Reason.SESSION_BUSY,
                )
            guard = Compare(key, value=held.value) if held else Compare(key, mod_revision=0)
        else:
            turn_id = uuid.uuid4().hex
            lock_value = f"{turn_id}@{self._coordinator_id}".encode()
            guard = Compare(key, mod_revision=0)
        grown = coordinator_pb2.Session()
        grown.CopyFrom(session)
        grown.messages.append(common_pb2.ChatMessage(role="user", content=user_content))
        self._check_size(grown)
        # Refused before any work is spent; the reply is stored whatever its length.
        await self.quota.check(
            session.owner, added_bytes=charged(grown.ByteSize()) - charged(stored_bytes)
        )
        locked, _ = await self._etcd.txn(
            [guard], [Put(key, lock_value, lease=self._replica_lease())]
        )
        if not locked:
            raise Aborted(
                f"another turn of session {session_id} is in progress; retry after it",
                reason=Reason.SESSION_BUSY,
            )
        return Turn(session, revision, lease, turn_id, lock_value, stored_bytes)

    async def commit_turn(
        self, turn: Turn, user_content: str, assistant_text: str, node_id: str
    ) -> coordinator_pb2.Session:
        session = coordinator_pb2.Session()
        session.CopyFrom(turn.session)
        session.messages.append(common_pb2.ChatMessage(role="user", content=user_content))
        session.messages.append(common_pb2.ChatMessage(role="assistant", content=assistant_text))
        previous_node = session.node_id
        session.node_id = node_id
        session.turns += 1
        session.updated_at = time.time()
        session.last_turn_id = turn.turn_id
        session_key = self._keys.session(session.session_id)
        turn_key = self._keys.turn(session.session_id)
        record = session.SerializeToString()
        operations: list[Put | Delete] = [
            Put(session_key, record, lease=turn.lease),
            Put(self._keys.session_node(node_id, session.session_id), b"", lease=turn.lease),
            Delete(turn_key),
            *self.quota.resized(
                session.owner,
                SESSIONS,
                session.session_id,
                turn.stored_bytes,
                len(record),
                turn.lease,
            ),
        ]
        if previous_node and previous_node != node_id:
            operations.append(Delete(self._keys.session_node(previous_node, session.session_id)))
        guards = [
            Compare(session_key, mod_revision=turn.mod_revision),
            Compare(turn_key, value=turn.lock_value),
        ]
        try:
            committed, _ = await self._etcd.txn(guards, operations)
        except Unavailable:
            # Sent, then no answer: stored or not, only the session can tell.
            # Still unknown (etcd away, or not stored yet): the caller retries,
            # and the revision guard lets at most one attempt store the turn.
            stored = await self.stored_turn(turn)
            if stored is None:
                raise
            log.info("turn %s: commit reply lost, but the turn is stored", turn.turn_id)
            session, committed = stored, True
        if not committed:
            # A guard failed. Perhaps because an earlier attempt of this very
            # commit was applied and its reply lost: then the turn is stored.
            stored = await self.stored_turn(turn)
            if stored is None:
                raise Aborted(
                    f"session {session.session_id} changed during the turn (closed, expired or "
                    "written by another replica); the turn was not stored",
                    reason=Reason.SESSION_CONFLICT,
                )
            session = stored
        await self._etcd.refresh(turn.lease)  # a turn is activity: restart the idle clock
        return session

    async def stored_turn(self, turn: Turn) -> coordinator_pb2.Session | None:
        """The session as stored, if it holds ``turn``; None if it does not
        (not stored, or the session is gone). Unavailable: etcd cannot say."""
        kv = await self._etcd.get(self._keys.session(turn.session.session_id))
        if kv is None:
            return None
        session = coordinator_pb2.Session.FromString(kv.value)
        return session if session.last_turn_id == turn.turn_id else None

    async def release(self, turn: Turn) -> None:
        """Drop the turn lock if this turn still holds it (turn failed or was cancelled)."""
        key = self._keys.turn(turn.session.session_id)
        await self._etcd.txn([Compare(key, value=turn.lock_value)], [Delete(key)])

    async def close(self, session_id: str) -> None:
        _, _, lease = await self.get(session_id)
        await self._etcd.revoke(lease)  # the session and its index keys go with the lease

    async def count_by_node(self) -> dict[str, int]:
        kvs, _ = await self._etcd.get_prefix(self._keys.sessions_by_node, keys_only=True)
        counts: dict[str, int] = {}
        for kv in kvs:
            node_id = kv.key[len(self._keys.sessions_by_node) :].split("/", 1)[0]
            counts[node_id] = counts.get(node_id, 0) + 1
        return counts

    # --- stored conversations of the Responses API ----------------------------------
    async def store_conversation(
        self, response_id: str, model: str, messages: list[common_pb2.ChatMessage]
    ) -> None:
        """Keep a response's whole conversation for ``previous_response_id``."""
        ttl = float(max(1, round(self.limits.default_idle_ttl_s)))
        conversation = coordinator_pb2.Session(
            session_id=response_id,
            model=model,
            messages=messages,
            created_at=time.time(),
            idle_ttl_seconds=ttl,
            owner=CALLER.get().owner,
        )
        record = conversation.SerializeToString()
        self._check_conversation_size(len(record))
        owner = conversation.owner
        await self.quota.check(owner, added_bytes=charged(len(record)))
        lease = await self._etcd.grant(ttl)
        await self._etcd.txn(
            [],
            [
                Put(self._keys.response(response_id), record, lease=lease),
                *self.quota.record(owner, RESPONSES, response_id, len(record), lease),
            ],
        )

    async def check_conversation(self, messages: list[common_pb2.ChatMessage]) -> None:
        """Raise now what ``store_conversation`` would raise for a conversation
        that starts with ``messages`` (its size, the caller's storage quota),
        so that a response that cannot be stored is refused before it is
        generated. The reply may still take the key a little over its quota."""
        record = coordinator_pb2.Session(messages=messages, owner=CALLER.get().owner)
        self._check_conversation_size(record.ByteSize())
        await self.quota.check(record.owner, added_bytes=charged(record.ByteSize()))

    async def conversation(self, response_id: str) -> list[common_pb2.ChatMessage] | None:
        """The conversation stored with a response; None when unknown or expired."""
        kv = await self._etcd.get(self._keys.response(response_id))
        if kv is None:
            return None
        record = coordinator_pb2.Session.FromString(kv.value)
        if not owner_may_see(record.owner, CALLER.get()):
            return None
        return list(record.messages)

    def _check_conversation_size(self, size: int) -> None:
        if size > self.limits.max_bytes:
            raise ResourceExhausted(
                f"the conversation to store is {size} bytes, over the limit of "
                f"{self.limits.max_bytes} bytes; send store=false, or start a new conversation",
                reason=Reason.SESSION_FULL,
            )

    def _check_size(self, session: coordinator_pb2.Session) -> None:
        # Room for the assistant's reply is checked again at commit by etcd's own limit.
        if len(session.messages) + 1 > self.limits.max_messages:
            raise ResourceExhausted(
                f"session {session.session_id} has reached {self.limits.max_messages} "
                "messages; start a new session",
                reason=Reason.SESSION_FULL,
            )
        size = session.ByteSize()
        if size > self.limits.max_bytes:
            raise ResourceExhausted(
                f"session {session.session_id or '(new)'} would be {size} bytes, over the "
                f"limit of {self.limits.max_bytes} bytes; start a new session",
                reason=Reason.SESSION_FULL,
            )
