"""Per-caller quotas on generations: a request rate and a number at once.

Pure logic over a clock, no I/O. Every generation (HTTP and gRPC alike) asks
``Quotas.admit`` for the caller's principal before any node is asked:

- a **token bucket** per principal: ``rate_per_s`` generations a second on
  average, up to ``burst`` at once after a quiet spell; beyond that the
  caller gets ``RATE_LIMITED`` with the seconds until its next token;
- a **count of generations in progress** per principal, at most
  ``max_concurrent``; beyond that ``TOO_MANY_STREAMS``. The count is held
  for the generation's whole life and given back when it ends, fails or its
  client goes away.

Both refusals are ``RESOURCE_EXHAUSTED`` with a retry hint (HTTP 429 with
``Retry-After``; gRPC trailer ``retry-after-ms``). A refused call spends
nothing: no token, no count.

Who is a principal: each fleet API key is one; the keys given with
``--api-key`` are one together ("static"); keyless loopback HTTP callers
(``anonymous``) share one. A fleet run ``--insecure`` has no identities and
no quotas. The counts live in each replica's memory: with R replicas a
caller spread over all of them may get up to R times the limits.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgefleet.auth import Principal
from edgefleet.errors import EdgefleetError, Reason, error_of

# The most principals whose buckets are remembered; the least recently seen
# is forgotten first (it comes back with a full bucket: generous, never wrong
# by more than one burst).
MAX_PRINCIPALS = 10_000
# Retry hint for TOO_MANY_STREAMS: when one of the caller's own streams will
# end is unknown, so ask again soon.
STREAM_RETRY_S = 1.0


@dataclass(frozen=True)
class QuotaLimits:
    """0 turns a limit off."""

    rate_per_s: float = 0.0
    burst: int = 0  # 0: max(1, ceil(rate_per_s))
    max_concurrent: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s >= 0):
            raise ValueError("the rate must be a finite number >= 0")
        if self.burst < 0 or self.max_concurrent < 0:
            raise ValueError("burst and max_concurrent must be >= 0")

    @property
    def bucket_size(self) -> float:
        return float(self.burst or max(1, math.ceil(self.rate_per_s)))

    @property
    def off(self) -> bool:
        return self.rate_per_s == 0 and self.max_concurrent == 0


class TokenBucket:
    """``rate`` tokens a second, at most ``size`` kept."""

    def __init__(self, rate: float, size: float, now: float) -> None:
        self.rate = rate
        self.size = size
        self.tokens = size
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.size, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def wait_s(self, now: float) -> float:
        """Seconds until a token is there (0: one is there now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1


def principal_key(caller: Principal) -> str | None:
    """Whose quota a call spends; None: no quota (``--insecure``, no identities)."""
    if caller.kind == "key":
        return f"key:{caller.principal_id}"
    if caller.kind == "anonymous":
        return "anonymous"
    return None


class Admission:
    """One admitted generation: leave the ``with`` (or call ``release``) when it ends."""

    def __init__(self, quotas: Quotas | None, key: str | None) -> None:
        self._quotas = quotas
        self._key = key

    def release(self) -> None:
        quotas, self._quotas = self._quotas, None
        if quotas is not None and self._key is not None:
            quotas._ended(self._key)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Quotas:
    def __init__(
        self,
        limits: QuotaLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_principals: int = MAX_PRINCIPALS,
    ) -> None:
        self.limits = limits or QuotaLimits()
        self._clock = clock
        self._max_principals = max_principals
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()
        self._running: collections.Counter[str] = collections.Counter()

    def running(self, key: str) -> int:
        """Generations of ``key`` in progress now."""
        return self._running.get(key, 0)

    def admit(self, caller: Principal) -> Admission:
        """Admit one generation of ``caller`` or raise RATE_LIMITED / TOO_MANY_STREAMS."""
        key = principal_key(caller)
        if key is None or self.limits.off:
            return Admission(None, None)
        limits = self.limits
        if limits.max_concurrent and self._running[key] >= limits.max_concurrent:
            raise self._refusal(
                Reason.TOO_MANY_STREAMS,
                f"{limits.max_concurrent} generations of this caller are already in "
                "progress; wait for one to end",
                STREAM_RETRY_S,
            )
        bucket = None
        if limits.rate_per_s:
            now = self._clock()
            bucket = self._bucket(key, now)
            wait_s = bucket.wait_s(now)
            if wait_s > 0:
                raise self._refusal(
                    Reason.RATE_LIMITED,
                    f"over the rate limit of {limits.rate_per_s:g} generations/s "
                    f"(burst {limits.bucket_size:g}) for this caller",
                    wait_s,
                )
            bucket.take(now)
        self._running[key] += 1
        return Admission(self, key)

    def _bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.limits.rate_per_s, self.limits.bucket_size, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self._max_principals:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def _ended(self, key: str) -> None:
        self._running[key] -= 1
        if self._running[key] <= 0:
            del self._running[key]

    @staticmethod
    def _refusal(reason: Reason, message: str, retry_after_s: float) -> EdgefleetError:
        return error_of(
            reason, message + " (limits are per coordinator replica)", retry_after_s=retry_after_s
        )
