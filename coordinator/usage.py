"""Per-key storage quotas: how many live sessions, and how many bytes of
sessions and stored conversations, one API key may keep in etcd.

etcd stops every write once its own quota (2 GiB by default) is full, so no
caller may come near it through the API. Each stored record (a session, a
Responses-API conversation) has a *usage key* beside it, written in the same
transaction and under the same lease:

    <prefix>usage/<owner>/<kind>/<class>/<record id>    ""    lease: the record's

so closing, expiring or revoking a record takes its usage with it: no count
can leak, whichever replica wrote it and whether or not one is still alive.

A record is *charged* its size plus a fixed overhead (its keys, its index
keys, its lease), rounded up to the next half power of two from 1 KiB: its
*class*. A key's usage is then one read-only transaction of count-only ranges,
one per kind and class (46 of them), answered from etcd's in-memory index:
a few dozen integers cross the wire however much the key holds. Rounding
charges at most 41 % over the real size; the quota counts charged bytes.

The check happens before the write and is not part of its transaction, so
writes of one key racing on several replicas at the same moment may pass the
limit by as many records as raced. A turn is checked before it generates
(with its user message); the reply that follows is stored whatever its
length, so a key may end a little over its byte limit, and then it gets no
new session, turn or stored conversation until it is back under.

Callers without an owner (a fleet run ``--insecure``, where nothing is
checked) have no quota, like the rate limits (``coordinator.quotas``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.etcd import Delete, Etcd, Put
from coordinator.keys import Keys
from edgefleet.errors import EdgefleetError, Reason, error_of

SESSIONS = "sessions"
RESPONSES = "responses"
KINDS = (SESSIONS, RESPONSES)

# What a record costs etcd beside its value: its key, its index and usage keys, its lease.
RECORD_OVERHEAD_BYTES = 512
SMALLEST_CHARGE = 1024
# Classes 0..22: 1 KiB to 2 MiB, past etcd's largest request (1.5 MiB).
CLASSES = 23

MiB = 1024 * 1024


@dataclass(frozen=True)
class StorageLimits:
    """Per owner (API key); 0 turns a limit off."""

    max_sessions: int = 1000
    max_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        if self.max_sessions < 0 or self.max_bytes < 0:
            raise ValueError("storage limits must be >= 0")

    @property
    def off(self) -> bool:
        return self.max_sessions == 0 and self.max_bytes == 0


def charge_class(size: int) -> int:
    """The class of a record of ``size`` bytes (its value)."""
    charge = max(SMALLEST_CHARGE, size + RECORD_OVERHEAD_BYTES)
    # The smallest c with class_bytes(c) >= charge.
    c = max(0, math.ceil(2 * math.log2(charge / SMALLEST_CHARGE) - 1e-9))
    while class_bytes(c) < charge:
        c += 1
    return min(c, CLASSES - 1)


def class_bytes(c: int) -> int:
    """What a record of class ``c`` is charged."""
    return math.ceil(SMALLEST_CHARGE * 2 ** (c / 2))


def charged(size: int) -> int:
    return class_bytes(charge_class(size))


@dataclass(frozen=True)
class Usage:
    """What one owner stores now: live sessions, stored conversations, charged bytes."""

    sessions: int = 0
    responses: int = 0
    bytes: int = 0

    @classmethod
    def from_counts(cls, counts: Sequence[int]) -> Usage:
        """From the counts of every (kind, class) prefix, in ``prefixes`` order."""
        sessions = sum(counts[:CLASSES])
        responses = sum(counts[CLASSES : 2 * CLASSES])
        charged_bytes = sum(
            count * class_bytes(i % CLASSES) for i, count in enumerate(counts[: 2 * CLASSES])
        )
        return cls(sessions, responses, charged_bytes)


def _size(n: int) -> str:
    if n >= MiB and n % (MiB // 16) == 0:
        return f"{n / MiB:g} MiB"
    if n >= 1024 and n % 64 == 0:
        return f"{n / 1024:g} KiB"
    return f"{n} bytes"


def refusal(
    usage: Usage,
    limits: StorageLimits,
    *,
    new_sessions: int = 0,
    added_bytes: int = 0,
    who: str = "this API key",
) -> EdgefleetError | None:
    """Why a write that adds ``new_sessions`` and grows the owner's charge by
    ``added_bytes`` must be refused (STORAGE_QUOTA), or None if it may go.

    Every call is for a write that grows what the owner stores (a new record,
    a longer session), so an owner already at or over its byte limit is
    refused even when the growth stays within the record's charge class.
    """
    if limits.max_sessions and new_sessions > 0:
        if usage.sessions + new_sessions > limits.max_sessions:
            return error_of(
                Reason.STORAGE_QUOTA,
                f"{who} already has {usage.sessions} live sessions, its limit "
                f"(--key-max-sessions {limits.max_sessions}); close one (CloseSession) "
                "or let one expire",
            )
    if limits.max_bytes:
        after = usage.bytes + max(0, added_bytes)
        if after > limits.max_bytes or usage.bytes >= limits.max_bytes:
            return error_of(
                Reason.STORAGE_QUOTA,
                f"{who} stores {_size(usage.bytes)} of sessions and conversations; "
                f"this write would take it to {_size(after)}, over its limit of "
                f"{_size(limits.max_bytes)} (--key-max-bytes); close sessions or let "
                "stored responses expire",
            )
    return None


class StorageQuota:
    """Reads an owner's usage from etcd and names the usage keys of its writes."""

    def __init__(self, etcd: Etcd, keys: Keys, limits: StorageLimits) -> None:
        self._etcd = etcd
        self._keys = keys
        self.limits = limits

    @staticmethod
    def who(owner: str) -> str:
        return "this API key" if owner.startswith("key:") else f"{owner} callers (together)"

    def applies(self, owner: str) -> bool:
        return bool(owner) and not self.limits.off

    def prefixes(self, owner: str) -> list[str]:
        return [self._keys.usage_class(owner, kind, c) for kind in KINDS for c in range(CLASSES)]

    async def usage(self, owner: str) -> Usage:
        return Usage.from_counts(await self._etcd.count_prefixes(self.prefixes(owner)))

    async def check(self, owner: str, *, new_sessions: int = 0, added_bytes: int = 0) -> None:
        """Raise STORAGE_QUOTA if ``owner`` may not store this much more."""
        if not self.applies(owner):
            return
        problem = refusal(
            await self.usage(owner),
            self.limits,
            new_sessions=new_sessions,
            added_bytes=added_bytes,
            who=self.who(owner),
        )
        if problem is not None:
            raise problem

    def record(self, owner: str, kind: str, record_id: str, size: int, lease: int) -> list[Put]:
        """The usage key of a new record of ``size`` bytes (none without an owner)."""
        if not owner:
            return []
        key = self._keys.usage_record(owner, kind, charge_class(size), record_id)
        return [Put(key, b"", lease=lease)]

    def resized(
        self, owner: str, kind: str, record_id: str, old_size: int, new_size: int, lease: int
    ) -> list[Put | Delete]:
        """Move a record's usage key to its new class (nothing if the class is the same)."""
        old, new = charge_class(old_size), charge_class(new_size)
        if not owner or old == new:
            return []
        return [
            Delete(self._keys.usage_record(owner, kind, old, record_id)),
            Put(self._keys.usage_record(owner, kind, new, record_id), b"", lease=lease),
        ]
