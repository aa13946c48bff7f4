"""All etcd access goes through this module, so the client library can be swapped.

A thin layer over etcd3aio (asyncio, several endpoints with round-robin,
reconnecting watches). Every failure to reach etcd surfaces as
``edgefleet.errors.Unavailable`` so callers answer UNAVAILABLE and retry.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
from etcd3aio import Etcd3Client, EtcdError, prefix_range_end
from etcd3aio._protobuf import Compare as CompareProto
from etcd3aio._protobuf import LeaseKeepAliveRequest, RangeRequest, RequestOp
from etcd3aio.kv import KVService

from coordinator.keys import Keys
from edgefleet.errors import EdgefleetError, Reason, Unavailable, error_of

log = logging.getLogger(__name__)

PUT = "put"
DELETE = "delete"


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # PUT or DELETE
    kv: KeyValue


# A mirror's callbacks: take one key (listed, changed or deleted); forget the
# keys that a new listing no longer holds.
Apply = Callable[..., None]
Forget = Callable[[set[str]], None]
T = TypeVar("T")


class KeyedRecords(Generic[T]):
    """The records under one prefix, in memory, by their key's last segment:
    what ``Etcd.mirror`` keeps (``handlers``). ``parse`` reads a value; one it
    cannot read is skipped with a warning (a bad record must not stop the
    mirror), and with ``fail_closed`` the copy held so far is dropped too
    (credentials: a revocation written unreadably must not leave the old
    record in force). ``changed(name, before, after)`` hears every change;
    ``after`` is None for a deletion, seen or missed while the watch was down."""

    def __init__(
        self,
        parse: Callable[[bytes], T],
        *,
        what: str,
        changed: Callable[[str, T | None, T | None], None] | None = None,
        fail_closed: bool = False,
    ) -> None:
        self._parse = parse
        self._fail_closed = fail_closed
        self._what = what
        self._changed = changed
        self.items: dict[str, T] = {}  # never rebound: owners may hold it

    @property
    def handlers(self) -> tuple[Apply, Forget]:
        return self.apply, self.forget

    def apply(self, kv: KeyValue, *, deleted: bool) -> None:
        name = Keys.last_segment(kv.key)
        if deleted:
            self._set(name, None)
            return
        try:
            record = self._parse(kv.value)
        except Exception:
            log.warning("ignoring an unreadable %s %s", self._what, kv.key)
            if self._fail_closed:
                self._set(name, None)
            return
        self._set(name, record)

    def forget(self, seen: set[str]) -> None:
        keep = {Keys.last_segment(key) for key in seen}
        for name in [n for n in self.items if n not in keep]:
            self._set(name, None)

    def _set(self, name: str, record: T | None) -> None:
        before = self.items.pop(name, None) if record is None else self.items.get(name)
        if record is not None:
            self.items[name] = record
        elif before is None:
            return  # a deletion of what was never here
        if self._changed is not None:
            self._changed(name, before, record)


@dataclass(frozen=True)
class Compare:
    """A transaction guard on one key."""

    key: str
    mod_revision: int | None = None  # key's mod_revision must equal this (0 = absent)
    create_revision: int | None = None  # key's create_revision must equal this
    value: bytes | None = None  # key's value must equal this


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


KEEPALIVE_STREAMS = 8


class _SharedKeepAlive:
    """Lease refreshes of this client multiplexed over one LeaseKeepAlive stream.

    etcd multiplexes leases on a keep-alive stream; opening a stream per
    refresh (what etcd3aio's ``keep_alive`` does) costs a whole HTTP/2 stream
    and two tasks per heartbeat, which dominated the coordinator's CPU with a
    thousand nodes. Replies are matched to waiters by lease id, in order.
    """

    def __init__(self, client: Etcd3Client) -> None:
        self._client = client
        self._requests: asyncio.Queue | None = None
        self._reader: asyncio.Task | None = None
        self._waiters: dict[int, collections.deque[asyncio.Future[int]]] = {}

    async def refresh(self, lease_id: int) -> int:
        self._open()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(lease_id, collections.deque()).append(waiter)
        self._requests.put_nowait(LeaseKeepAliveRequest(ID=lease_id))
        try:
            return await waiter
        finally:
            queue = self._waiters.get(lease_id)
            if queue is not None and waiter in queue:  # timed out or cancelled
                queue.remove(waiter)

    def _open(self) -> None:
        if self._reader is not None and not self._reader.done():
            return
        requests: asyncio.Queue = asyncio.Queue()
        self._requests = requests

        async def outgoing():
            while True:
                yield await requests.get()

        # etcd3aio exposes no multiplexed keep-alive; its lease stub does.
        lease = self._client.lease
        call = lease._stub.LeaseKeepAlive(outgoing(), metadata=lease._metadata or None)
        self._reader = asyncio.create_task(self._read(call), name="etcd-lease-keepalive")

    async def _read(self, call) -> None:
        error: BaseException = EtcdError("the lease keep-alive stream ended")
        try:
            async for reply in call:
                waiters = self._waiters.get(reply.ID)
                while waiters:
                    waiter = waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(int(reply.TTL))
                        break
        except (grpc.aio.AioRpcError, EtcdError) as exc:
            error = exc
        finally:
            call.cancel()
            waiters, self._waiters = self._waiters, {}
            for queue in waiters.values():
                for waiter in queue:
                    if not waiter.done():
                        waiter.set_exception(error)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()


def _code_of(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status of an etcd failure, when it has one (also when wrapped)."""
    for candidate in (exc, exc.__cause__, exc.__context__):
        if isinstance(candidate, grpc.aio.AioRpcError):
            return candidate.code()
    return None


def _kv(raw) -> KeyValue:
    return KeyValue(
        key=raw.key.decode(),
        value=bytes(raw.value),
        create_revision=raw.create_revision,
        mod_revision=raw.mod_revision,
        lease=raw.lease,
    )


@dataclass(frozen=True)
class EtcdTls:
    """Client TLS to etcd: the CA that signed etcd's certificate, and our own
    certificate and key where etcd asks for client certificates."""

    ca_pem: bytes
    cert_pem: bytes | None = None
    key_pem: bytes | None = None

    @classmethod
    def from_files(cls, cacert: str, cert: str = "", key: str = "") -> EtcdTls | None:
        if not cacert:
            return None
        read = lambda path: open(path, "rb").read() if path else None  # noqa: E731
        return cls(read(cacert), read(cert), read(key))


def resolve_endpoints(endpoints: Sequence[str]) -> tuple[list[str], str]:
    """``host:port`` endpoints as IPv4 ``address:port`` (the etcd client's
    channel takes addresses only), and the first host name given, for TLS.

    Names are resolved once, when the client is made: a member that moves to
    another address is found again when the coordinator restarts.
    """
    addresses, hostname = [], ""
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
        try:
            ipaddress.IPv4Address(host)
            addresses.append(endpoint)
            continue
        except ValueError:
            pass
        try:
            found = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ValueError(f"cannot resolve etcd endpoint {endpoint!r}: {exc}") from None
        addresses.append(f"{found[0][4][0]}:{port}")
        hostname = hostname or host
    return addresses, hostname


class Etcd:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout_s: float = 2.0,
        observe: Callable[[str, float, bool], None] | None = None,
        tls: EtcdTls | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = list(endpoints)
        self.timeout_s = timeout_s
        self._observe = observe  # (operation, seconds, ok): metrics
        addresses, hostname = resolve_endpoints(self.endpoints)
        tls_args = {}
        if tls is not None:
            tls_args = {"ca_cert": tls.ca_pem, "cert_key": tls.key_pem, "cert_chain": tls.cert_pem}
            if hostname:  # certificates name the hosts, not the addresses they resolve to
                tls_args["tls_server_name"] = hostname
        self._client = Etcd3Client(addresses, rpc_max_attempts=2, **tls_args)
        # etcd serves one keep-alive stream's renewals one after another: a
        # few streams side by side keep a thousand renewals a second moving.
        self._keepalive = [_SharedKeepAlive(self._client) for _ in range(KEEPALIVE_STREAMS)]
        self._connected = False

    async def connect(self) -> None:
        await self._client.connect()
        self._connected = True

    async def close(self) -> None:
        for lane in self._keepalive:
            lane.close()
        if self._connected:
            await self._client.close()
            self._connected = False

    def _unavailable(self, operation: str, exc: BaseException) -> Unavailable:
        return Unavailable(
            f"etcd unavailable ({operation} on {','.join(self.endpoints)}): {exc}",
            reason=Reason.ETCD_UNAVAILABLE,
        )

    async def _call(self, operation: str, coroutine):
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(coroutine, self.timeout_s * 2)
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
            if self._observe is not None:
                self._observe(operation, time.perf_counter() - started, False)
            if _code_of(exc) == grpc.StatusCode.OUT_OF_RANGE:
                raise error_of(Reason.ETCD_COMPACTED, f"etcd {operation}: {exc}") from exc
            raise self._unavailable(operation, exc) from exc
        if self._observe is not None:
            self._observe(operation, time.perf_counter() - started, True)
        return result

    async def ping(self) -> None:
        await self._call("ping", self._client.kv.get(b"/edgefleet/ping", timeout=self.timeout_s))

    # --- keys ------------------------------------------------------------------------
    async def get(self, key: str) -> KeyValue | None:
        reply = await self._call("get", self._client.kv.get(key, timeout=self.timeout_s))
        return _kv(reply.kvs[0]) if reply.kvs else None

    async def get_prefix(
        self, prefix: str, *, keys_only: bool = False
    ) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the store revision of the read."""
        reply = await self._call(
            "get_prefix",
            self._client.kv.get(
                prefix, prefix_range_end(prefix), keys_only=keys_only, timeout=self.timeout_s
            ),
        )
        return [_kv(raw) for raw in reply.kvs], reply.header.revision

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        reply = await self._call(
            "put", self._client.kv.put(key, value, lease=lease, timeout=self.timeout_s)
        )
        return reply.header.revision

    async def delete(self, key: str) -> bool:
        reply = await self._call("delete", self._client.kv.delete(key, timeout=self.timeout_s))
        return reply.deleted > 0

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Put | Delete],
        failure: Sequence[Put | Delete] = (),
    ) -> tuple[bool, int]:
        """Apply ``success`` if every guard holds, else ``failure``; (succeeded, revision).

        Sent once, never retried here: a transaction whose reply was lost may
        have been applied, and a blind second attempt would then see its own
        write and report that a guard failed. Unavailable therefore means
        *outcome unknown*; the caller resolves it by reading back what the
        transaction would have written (``Sessions.commit_turn`` does).
        """
        reply = await self._call(
            "txn",
            self._client.kv.txn(
                [self._compare(c) for c in compares],
                [self._op(op) for op in success],
                [self._op(op) for op in failure],
                timeout=self.timeout_s,
                max_attempts=1,
            ),
        )
        return reply.succeeded, reply.header.revision

    async def count_prefixes(self, prefixes: Sequence[str]) -> list[int]:
        """How many keys are under each prefix, read at one revision in one
        round trip (a read-only transaction of count-only ranges): no keys or
        values cross the wire, however many there are."""
        if not prefixes:
            return []
        reply = await self._call(
            "count",
            self._client.kv.txn(
                [],
                [
                    RequestOp(
                        request_range=RangeRequest(
                            key=prefix.encode(),
                            range_end=prefix_range_end(prefix),
                            count_only=True,
                        )
                    )
                    for prefix in prefixes
                ],
                [],
                timeout=self.timeout_s,
            ),
        )
        return [int(response.response_range.count) for response in reply.responses]

    @staticmethod
    def _compare(compare: Compare):
        if compare.value is not None:
            return KVService.txn_compare_value(compare.key, compare.value)
        if compare.create_revision is not None:
            return KVService.txn_compare_create_revision(compare.key, compare.create_revision)
        return CompareProto(
            result=CompareProto.EQUAL,
            target=CompareProto.MOD,
            key=compare.key.encode(),
            mod_revision=compare.mod_revision or 0,
        )

    @staticmethod
    def _op(op: Put | Delete):
        if isinstance(op, Put):
            return KVService.txn_op_put(op.key, op.value, lease=op.lease)
        return KVService.txn_op_delete(op.key)

    async def revision(self) -> int:
        """The store's current revision."""
        reply = await self._call("get", self._client.kv.get(b"/", timeout=self.timeout_s))
        return reply.header.revision

    async def compact(self, revision: int) -> None:
        """Drop the history of every key before ``revision`` (done if it already was)."""
        try:
            await self._call("compact", self._client.kv.compact(revision, timeout=self.timeout_s))
        except EdgefleetError as error:
            if error.reason is not Reason.ETCD_COMPACTED:
                raise

    # --- leases ----------------------------------------------------------------------
    async def grant(self, ttl_s: float) -> int:
        reply = await self._call(
            "lease grant", self._client.lease.grant(max(1, round(ttl_s)), timeout=self.timeout_s)
        )
        return reply.ID

    async def refresh(self, lease_id: int) -> int:
        """Keep a lease alive once; returns its remaining TTL (0: it has expired)."""
        lane = self._keepalive[lease_id % len(self._keepalive)]
        return await self._call("lease keepalive", lane.refresh(lease_id))

    async def lease_ttl(self, lease_id: int) -> tuple[int, int]:
        """(TTL the lease was granted, seconds it has left); (0, -1) once it is gone."""
        reply = await self._call(
            "lease ttl", self._client.lease.time_to_live(lease_id, timeout=self.timeout_s)
        )
        return int(reply.grantedTTL), int(reply.TTL)

    async def revoke(self, lease_id: int) -> None:
        try:
            await self._call(
                "lease revoke", self._client.lease.revoke(lease_id, timeout=self.timeout_s)
            )
        except Unavailable as exc:
            if _code_of(exc.__cause__) == grpc.StatusCode.NOT_FOUND:
                return  # already expired or revoked: nothing left to do
            raise

    # --- watches ---------------------------------------------------------------------
    async def watch_prefix(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[list[WatchEvent]]:
        """Batches of events under ``prefix`` from ``start_revision`` on.

        The underlying client reconnects on transient errors and resumes from
        the last revision seen, so no event is lost across an etcd restart.
        """
        stream = self._client.watch.watch(
            prefix, prefix_range_end(prefix), start_revision=start_revision
        )
        async for reply in stream:
            if reply.canceled:
                raise Unavailable(
                    f"etcd cancelled the watch on {prefix}: {reply.cancel_reason}",
                    reason=Reason.ETCD_UNAVAILABLE,
                )
            if reply.events:
                yield [
                    WatchEvent(kind=DELETE if event.type == 1 else PUT, kv=_kv(event.kv))
                    for event in reply.events
                ]

    # --- mirrors -------------------------------------------------------------------------
    async def mirror(
        self, prefixes: dict[str, tuple[Apply, Forget]], synced: asyncio.Event
    ) -> None:
        """Keep an in-memory copy of each prefix until cancelled: list it, then
        follow its watch; after any failure, list it again.

        ``apply(kv, deleted=...)`` takes each key as it is listed or changes;
        ``forget(seen)`` after each listing drops what is no longer there (a
        delete missed while the watch was down). ``synced`` is set once every
        prefix has been listed.
        """
        listed: set[str] = set()
        await asyncio.gather(
            *(
                self._mirror(prefix, apply, forget, listed, len(prefixes), synced)
                for prefix, (apply, forget) in prefixes.items()
            )
        )

    async def _mirror(self, prefix, apply, forget, listed, count, synced) -> None:
        backoff = 0.2
        while True:
            try:
                kvs, revision = await self.get_prefix(prefix)
                for kv in kvs:
                    apply(kv, deleted=False)
                forget({kv.key for kv in kvs})
                listed.add(prefix)
                if len(listed) == count:
                    synced.set()
                backoff = 0.2
                async for events in self.watch_prefix(prefix, revision + 1):
                    for event in events:
                        apply(event.kv, deleted=event.kind == DELETE)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd gone or watch cancelled: re-list and go on
                log.warning("watch on %s failed (%s); re-listing in %.1fs", prefix, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
