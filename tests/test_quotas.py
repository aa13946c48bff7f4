"""Storage quotas (issue 13): what one API key, one node or one lost reply can
do to etcd.

- Pure rules first (charge classes, the refusal, the heartbeat pacer, record
  trimming): milliseconds.
- Then the use cases in-process against a real etcd: sessions and stored
  conversations counted per key (and freed by close and by expiry), a turn
  refused before it generates, heartbeats at a high rate, and a commit whose
  reply is lost at the etcd client layer after etcd applied it.
- Then black-box: a secure coordinator process whose API key hits its
  session quota over gRPC, and keyless HTTP that hits its byte quota (429).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from coordinator import node_limits, usage
from coordinator.etcd import Etcd
from coordinator.fleet import FleetView
from coordinator.keys import Keys
from coordinator.membership import Membership
from coordinator.node_limits import RecordPacer, record_too_large, trim_capacity
from coordinator.sessions import SessionLimits, Sessions
from coordinator.usage import StorageLimits, Usage, charge_class, charged, class_bytes, refusal
from edgefleet import auth
from edgefleet.errors import (
    Aborted,
    EdgefleetError,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from edgefleet.local.etcd_server import EtcdCluster
from edgefleet.local.processes import free_port, join_token, start_coordinator, start_node
from edgefleet.v1 import common_pb2, coordinator_pb2
from tests.helpers import wait_until

KEY_A = auth.Principal("key", "key-a", "a", frozenset({auth.INFERENCE}))
KEY_B = auth.Principal("key", "key-b", "b", frozenset({auth.INFERENCE}))


# --- pure rules ----------------------------------------------------------------------------


def test_a_record_is_charged_its_size_rounded_up_to_its_class():
    assert charged(0) == usage.SMALLEST_CHARGE
    previous = 0
    for size in [0, 1, 100, 511, 512, 513, 1000, 5000, 70_000, 512 * 1024, 1_500_000]:
        cost = size + usage.RECORD_OVERHEAD_BYTES
        assert charged(size) >= cost, size
        assert charged(size) <= max(usage.SMALLEST_CHARGE, cost * 1.42), size
        assert charged(size) >= previous  # monotonic
        previous = charged(size)
    assert [class_bytes(c) for c in range(3)] == [1024, 1449, 2048]
    assert charge_class(10**9) == usage.CLASSES - 1  # bounded: no class is ever missed


def test_the_refusal_names_the_limit_that_was_reached():
    limits = StorageLimits(max_sessions=3, max_bytes=10_000)
    assert refusal(Usage(2, 0, 4096), limits, new_sessions=1, added_bytes=1024) is None
    full = refusal(Usage(3, 0, 4096), limits, new_sessions=1, added_bytes=1024)
    assert full.reason is Reason.STORAGE_QUOTA and full.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 live sessions" in full.message and "--key-max-sessions 3" in full.message
    heavy = refusal(Usage(1, 0, 9000), limits, added_bytes=2048)
    assert heavy.reason is Reason.STORAGE_QUOTA and "--key-max-bytes" in heavy.message
    # Stored responses take bytes, never session slots.
    assert refusal(Usage(3, 50, 4096), limits, added_bytes=1024) is None
    # A key already over its bytes (a long reply) may not grow even within a class.
    assert refusal(Usage(1, 0, 10_000), limits, added_bytes=0) is not None
    # 0: no limit.
    assert refusal(Usage(10**6, 0, 10**12), StorageLimits(0, 0), new_sessions=1) is None


def test_the_pacer_writes_a_change_at_once_but_not_more_often_than_its_interval():
    pacer = RecordPacer(min_interval_s=0.5, refresh_s=5.0)
    writes = []
    for i in range(1000):  # a node reporting a new value every millisecond for a second
        now = i / 1000
        signature = (i % 2,)
        if pacer.record_due(signature, now):
            pacer.record_written(signature, now)
            writes.append(now)
    assert writes == [0.0, 0.501]  # 0.5 reported what was written at 0.0
    # A change held back is written by the first beat after the interval.
    assert not pacer.record_due((0,), 0.99) and pacer.record_due((0,), 1.01)
    # Unchanged: rewritten every refresh_s only.
    assert not pacer.record_due((1,), 5.49) and pacer.record_due((1,), 5.51)
    assert pacer.lease_due(0.0)
    pacer.lease_refreshed(0.0)
    assert not pacer.lease_due(0.49) and pacer.lease_due(0.5)


def test_a_report_is_trimmed_and_an_oversized_record_is_named():
    capacity = common_pb2.Capacity(
        models=[
            common_pb2.LoadedModel(alias=f"m{i}" + "x" * 5000, path="/" * 100_000)
            for i in range(1000)
        ],
        gpus=[common_pb2.GpuInfo(name="g" * 10_000) for _ in range(100)],
    )
    trim_capacity(capacity)
    assert len(capacity.models) == node_limits.MAX_MODELS
    assert len(capacity.gpus) == node_limits.MAX_GPUS
    record = coordinator_pb2.NodeStatus(node_id="n", capacity=capacity)
    assert record.ByteSize() <= node_limits.MAX_RECORD_BYTES
    assert record_too_large(record) is None
    record.labels["note"] = "x" * node_limits.MAX_RECORD_BYTES
    error = record_too_large(record)
    assert error.reason is Reason.NODE_RECORD_TOO_LARGE
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(node_limits.MAX_RECORD_BYTES) in error.message


# --- in-process against a real etcd ------------------------------------------------------


@contextlib.asynccontextmanager
async def _sessions(endpoints, *, storage: StorageLimits, **limits):
    etcd = Etcd(endpoints)
    await etcd.connect()
    replica_lease = await etcd.grant(30)
    try:
        yield (
            Sessions(
                etcd,
                Keys(),
                limits=SessionLimits(**limits),
                replica_lease=lambda: replica_lease,
                coordinator_id="c1",
                storage=storage,
            ),
            etcd,
        )
    finally:
        await etcd.close()


def _as(caller: auth.Principal) -> None:
    auth.CALLER.set(caller)


def _create(idle_ttl_s: float = 0.0, **kwargs):
    return coordinator_pb2.CreateSessionRequest(model="m", idle_ttl_seconds=idle_ttl_s, **kwargs)


def test_a_keys_live_sessions_are_capped_and_close_and_expiry_free_room(etcd_cluster):
    async def scenario():
        async with _sessions(etcd_cluster.endpoints, storage=StorageLimits(3, 0)) as (sessions, _):
            _as(KEY_A)
            first = await sessions.create(_create())
            await sessions.create(_create())
            await sessions.create(_create(idle_ttl_s=1))  # expires soon
            with pytest.raises(ResourceExhausted) as refused:
                await sessions.create(_create())
            assert refused.value.reason is Reason.STORAGE_QUOTA
            assert "--key-max-sessions 3" in refused.value.message
            _as(KEY_B)  # another key has its own quota
            await sessions.create(_create())
            _as(KEY_A)
            await sessions.close(first.session_id)
            await sessions.create(_create())  # the closed one's room
            with pytest.raises(ResourceExhausted):
                await sessions.create(_create())
            # The short session's lease runs out: its usage goes with it.
            deadline = time.monotonic() + 30
            while (await sessions.quota.usage(KEY_A.owner)).sessions > 2:
                assert time.monotonic() < deadline, "the expired session still counts"
                await asyncio.sleep(0.2)
            await sessions.create(_create())
            assert (await sessions.quota.usage(KEY_A.owner)).sessions == 3
            assert (await sessions.quota.usage(KEY_B.owner)).sessions == 1

    asyncio.run(scenario())


def test_the_byte_quota_counts_sessions_and_stored_conversations(etcd_cluster):
    big = "x" * 3000

    async def scenario():
        storage = StorageLimits(max_sessions=0, max_bytes=16 * 1024)
        async with _sessions(etcd_cluster.endpoints, storage=storage) as (sessions, etcd):
            _as(KEY_A)
            message = common_pb2.ChatMessage(role="user", content=big)
            await sessions.store_conversation("resp_1", "m", [message])
            await sessions.store_conversation("resp_2", "m", [message])
            session = await sessions.create(_create(system_prompt=big))
            held = await sessions.quota.usage(KEY_A.owner)
            assert (held.sessions, held.responses) == (1, 2)
            sizes = [
                len((await etcd.get(key)).value)
                for key in (
                    Keys().response("resp_1"),
                    Keys().response("resp_2"),
                    Keys().session(session.session_id),
                )
            ]
            assert held.bytes == sum(charged(size) for size in sizes) == 12 * 1024
            # A turn that would take the key over is refused before it generates,
            # and holds no lock: the session stays usable.
            with pytest.raises(ResourceExhausted) as refused:
                await sessions.begin_turn(session.session_id, big * 2)
            assert refused.value.reason is Reason.STORAGE_QUOTA
            assert "--key-max-bytes" in refused.value.message
            turn = await sessions.begin_turn(session.session_id, "short")
            await sessions.release(turn)
            with pytest.raises(ResourceExhausted):
                await sessions.store_conversation("resp_3", "m", [message, message])
            # ...which the Responses API can learn before it generates.
            with pytest.raises(ResourceExhausted) as early:
                await sessions.check_conversation([message, message])
            assert early.value.reason is Reason.STORAGE_QUOTA
            await sessions.check_conversation([common_pb2.ChatMessage(role="user", content="hi")])
            # A conversation too big for one record is refused by its own limit.
            with pytest.raises(ResourceExhausted) as too_big:
                await sessions.store_conversation(
                    "resp_4", "m", [common_pb2.ChatMessage(role="user", content="y" * 600_000)]
                )
            assert too_big.value.reason is Reason.SESSION_FULL

    asyncio.run(scenario())


def test_usage_follows_a_session_through_its_turns(etcd_cluster):
    async def scenario():
        storage = StorageLimits(max_sessions=5, max_bytes=64 * 1024 * 1024)
        async with _sessions(etcd_cluster.endpoints, storage=storage) as (sessions, etcd):
            _as(KEY_A)
            session = await sessions.create(_create())
            for i in range(4):
                turn = await sessions.begin_turn(session.session_id, f"question {i}")
                await sessions.commit_turn(turn, f"question {i}", "z" * 4000, "node-1")
            stored = (await etcd.get(Keys().session(session.session_id))).value
            held = await sessions.quota.usage(KEY_A.owner)
            assert held.sessions == 1  # moved between classes, never counted twice
            assert held.bytes == charged(len(stored))
            await sessions.close(session.session_id)
            assert await sessions.quota.usage(KEY_A.owner) == Usage(0, 0, 0)

    asyncio.run(scenario())


def test_a_sessions_lease_is_its_idle_ttl(etcd_cluster):
    async def scenario():
        async with _sessions(etcd_cluster.endpoints, storage=StorageLimits()) as (sessions, etcd):
            _as(KEY_A)
            session = await sessions.create(_create(idle_ttl_s=90.4))
            assert session.idle_ttl_seconds == 90
            _, _, lease = await sessions.get(session.session_id)
            granted, left = await etcd.lease_ttl(lease)
            assert granted == 90 and 0 < left <= 90
            await sessions.store_conversation("resp_x", "m", [])
            kv = await etcd.get(Keys().response("resp_x"))
            granted, _ = await etcd.lease_ttl(kv.lease)
            assert granted == round(SessionLimits().default_idle_ttl_s)

    asyncio.run(scenario())


# --- an ambiguous commit ------------------------------------------------------------------


class LostReply:
    """Wraps the etcd client's Txn stub: the chosen attempts reach etcd and are
    applied, but their reply is lost (DEADLINE_EXCEEDED), or they are lost on
    the way there (not applied)."""

    def __init__(self, etcd: Etcd, *, applied: bool, times: int = 1) -> None:
        self.kv = etcd._client.kv
        self.real = self.kv._stub.Txn
        self.applied = applied
        self.left = times

    def __enter__(self):
        async def txn(request, **kwargs):
            if self.left <= 0:
                return await self.real(request, **kwargs)
            self.left -= 1
            if self.applied:
                await self.real(request, **kwargs)
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="injected: the reply was lost",
            )

        self.kv._stub.Txn = txn
        return self

    def __exit__(self, *exc):
        self.kv._stub.Txn = self.real


def _turns_stored(session: coordinator_pb2.Session) -> list[str]:
    return [m.content for m in session.messages if m.role == "user"]


def test_a_commit_whose_reply_is_lost_after_etcd_applied_it_succeeds_once(etcd_cluster):
    async def scenario():
        async with _sessions(etcd_cluster.endpoints, storage=StorageLimits()) as (sessions, etcd):
            _as(KEY_A)
            session = await sessions.create(_create())
            turn = await sessions.begin_turn(session.session_id, "hello")
            with LostReply(etcd, applied=True):
                stored = await sessions.commit_turn(turn, "hello", "hi there", "node-1")
            assert stored.last_turn_id == turn.turn_id
            assert stored.messages[-1].content == "hi there"
            # The caller retries the same commit anyway: still one turn.
            again = await sessions.commit_turn(turn, "hello", "hi there", "node-1")
            assert again.last_turn_id == turn.turn_id
            final, _, _ = await sessions.get(session.session_id)
            assert _turns_stored(final) == ["hello"] and final.turns == 1
            # ...and a client resuming the turn by its id gets it as stored.
            resumed = await sessions.begin_turn(session.session_id, "hello", turn.turn_id)
            assert resumed.already_stored
            # The lock went with the commit: the next turn starts at once.
            await sessions.release(await sessions.begin_turn(session.session_id, "next"))

    asyncio.run(scenario())


def test_a_commit_lost_on_its_way_is_unavailable_and_its_retry_stores_it_once(etcd_cluster):
    async def scenario():
        async with _sessions(etcd_cluster.endpoints, storage=StorageLimits()) as (sessions, etcd):
            _as(KEY_A)
            session = await sessions.create(_create())
            turn = await sessions.begin_turn(session.session_id, "hello")
            with LostReply(etcd, applied=False):
                with pytest.raises(Unavailable):
                    await sessions.commit_turn(turn, "hello", "hi", "node-1")
            stored = await sessions.commit_turn(turn, "hello", "hi", "node-1")  # the retry
            assert stored.last_turn_id == turn.turn_id
            final, _, _ = await sessions.get(session.session_id)
            assert _turns_stored(final) == ["hello"] and final.turns == 1

    asyncio.run(scenario())


def test_a_turn_that_really_lost_its_session_is_still_a_conflict(etcd_cluster):
    async def scenario():
        async with _sessions(etcd_cluster.endpoints, storage=StorageLimits()) as (sessions, etcd):
            _as(KEY_A)
            session = await sessions.create(_create())
            turn = await sessions.begin_turn(session.session_id, "hello")
            await sessions.close(session.session_id)
            with LostReply(etcd, applied=True):
                with pytest.raises(Unavailable):  # unknown, and nothing to read back
                    await sessions.commit_turn(turn, "hello", "hi", "node-1")
            with pytest.raises(Aborted) as aborted:
                await sessions.commit_turn(turn, "hello", "hi", "node-1")
            assert aborted.value.reason is Reason.SESSION_CONFLICT

    asyncio.run(scenario())


# --- heartbeats ------------------------------------------------------------------------------


def _capacity(free: int) -> common_pb2.Capacity:
    return common_pb2.Capacity(
        slots_total=4,
        slots_free=free,
        models=[common_pb2.LoadedModel(alias="m", slots_total=4, slots_free=free)],
    )


def test_heartbeats_at_a_high_rate_cost_etcd_a_bounded_number_of_writes(etcd_cluster):
    """A node that reports a change 200 times a second for two seconds: its
    record is rewritten at most every min interval, its last report still
    lands, and falling silent still evicts it."""
    min_interval_s = 0.5

    async def scenario():
        etcd = Etcd(etcd_cluster.endpoints)
        await etcd.connect()
        keys = Keys()
        fleet = FleetView(etcd, keys)
        mirror = asyncio.create_task(fleet.run())
        membership = Membership(
            etcd,
            keys,
            fleet,
            coordinator_id="c1",
            lease_ttl_s=2.0,
            heartbeat_interval_s=1.0,
            record_min_interval_s=min_interval_s,
        )
        try:
            await asyncio.wait_for(fleet.synced.wait(), 10)
            registered = await membership.register(
                coordinator_pb2.RegisterRequest(
                    node_id="n1", address="127.0.0.1:1", models=["m"], capacity=_capacity(4)
                )
            )
            for _ in range(1000):  # the mirror sees the registration
                if "n1" in fleet.nodes:
                    break
                await asyncio.sleep(0.01)
            before = await etcd.revision()
            started = time.monotonic()
            silent = asyncio.Event()

            async def beats():
                for i in range(400):
                    yield coordinator_pb2.HeartbeatRequest(
                        node_id="n1", epoch=registered.epoch, capacity=_capacity(i % 4)
                    )
                    await asyncio.sleep(0.005)
                # The last report (3 free) again, at the normal pace, then silence.
                for _ in range(3):
                    yield coordinator_pb2.HeartbeatRequest(
                        node_id="n1", epoch=registered.epoch, capacity=_capacity(3)
                    )
                    await asyncio.sleep(0.6)
                silent.set()
                await asyncio.sleep(3600)  # connection open, no beats

            async def serve():
                async for _ in membership.heartbeats(beats()):
                    pass

            streaming = asyncio.create_task(serve())
            await silent.wait()
            elapsed = time.monotonic() - started
            writes = await etcd.revision() - before
            # Unpaced this was one write per beat: 400.
            assert writes <= elapsed / min_interval_s + 2, (writes, elapsed)
            record = coordinator_pb2.NodeStatus.FromString((await etcd.get(keys.node("n1"))).value)
            assert record.capacity.models[0].slots_free == 3  # the last report landed
            # Silence still evicts the node (silence timeout: 2 beats + 0.5 s).
            await asyncio.wait_for(streaming, 30)
            assert await etcd.get(keys.node("n1")) is None
        finally:
            mirror.cancel()
            await asyncio.gather(mirror, return_exceptions=True)
            await etcd.close()

    asyncio.run(scenario())


def test_an_oversized_registration_is_refused_with_its_reason(etcd_cluster):
    async def scenario():
        etcd = Etcd(etcd_cluster.endpoints)
        await etcd.connect()
        keys = Keys()
        membership = Membership(etcd, keys, FleetView(etcd, keys), coordinator_id="c1")
        try:
            with pytest.raises(EdgefleetError) as refused:
                await membership.register(
                    coordinator_pb2.RegisterRequest(
                        node_id="n1",
                        address="127.0.0.1:1",
                        models=["m"],
                        labels={"blob": "x" * 100_000},
                    )
                )
            assert refused.value.reason is Reason.NODE_RECORD_TOO_LARGE
            assert await etcd.get(keys.node("n1")) is None
            # A report with too much in it is trimmed, not refused.
            await membership.register(
                coordinator_pb2.RegisterRequest(
                    node_id="n2",
                    address="127.0.0.1:2",
                    models=["m"],
                    capacity=common_pb2.Capacity(
                        models=[
                            common_pb2.LoadedModel(alias=f"m{i}", path="p" * 10_000)
                            for i in range(500)
                        ]
                    ),
                )
            )
            kv = await etcd.get(keys.node("n2"))
            assert len(kv.value) <= node_limits.MAX_RECORD_BYTES
            record = coordinator_pb2.NodeStatus.FromString(kv.value)
            assert len(record.capacity.models) == node_limits.MAX_MODELS
        finally:
            await etcd.close()

    asyncio.run(scenario())


# --- black box: a secure coordinator process -------------------------------------------------


@pytest.fixture
def quota_fleet(tmp_path: Path):
    """etcd, a secure coordinator with small quotas, one simulated node (the
    control plane is under test here, not the model)."""
    etcd = EtcdCluster(1, base_dir=tmp_path / "etcd").start()
    coordinator = start_coordinator(
        grpc_address=f"127.0.0.1:{free_port()}",
        etcd=etcd.endpoints,
        extra_args=("--id", "coord-q", "--key-max-sessions", "2", "--key-max-bytes", "8192"),
        log_path=tmp_path / "coordinator.log",
        state_dir=tmp_path / "coordinator",
    )
    node = None
    try:
        coordinator.wait_serving(60)
        node = start_node(
            listen=f"127.0.0.1:{free_port()}",
            models="smollm2-135m",
            extra_args=(
                "--coordinator",
                coordinator.address,
                "--node-id",
                "sim-1",
                "--runtime",
                "simulated",
                "--sim-tokens-per-s",
                "500",
            ),
            log_path=tmp_path / "node.log",
            join=(join_token(coordinator), tmp_path / "node"),
        )
        node.wait_serving(60)
        from edgefleet.local.processes import admin_client

        def node_ready() -> bool:
            with admin_client(coordinator) as admin:
                return any(n.state == common_pb2.NODE_STATE_READY for n in admin.status().nodes)

        wait_until(node_ready, what="the simulated node in the coordinator's view")
        yield coordinator
    finally:
        if node is not None:
            node.terminate(timeout_s=15)
        coordinator.terminate(timeout_s=15)
        etcd.stop()


def _key(coordinator) -> str:
    from edgefleet.local.processes import admin_client
    from edgefleet.v1 import access_pb2

    with admin_client(coordinator) as admin:
        return admin.access(
            "CreateApiKey", access_pb2.CreateApiKeyRequest(name="quota", scopes=["inference"])
        ).key


def test_an_api_key_over_its_session_quota_gets_resource_exhausted(quota_fleet):
    from edgefleet.client import FleetClient
    from edgefleet.profile import Profile

    profile = Profile.load(quota_fleet.extra["profile"])
    with FleetClient([quota_fleet.address], ca_pem=profile.ca_pem, api_key=_key(quota_fleet)) as c:
        model = "smollm2-135m"
        wait_until(lambda: _try_create(c, model), timeout_s=60, what="a node serving the model")
        second = c.create_session(model)
        with pytest.raises(ResourceExhausted) as refused:
            c.create_session(model)
        assert refused.value.reason is Reason.STORAGE_QUOTA
        assert "--key-max-sessions 2" in refused.value.message
        # The refusal broke nothing: the key's sessions still chat, and closing frees room.
        assert "".join(chunk.text for chunk in c.chat(second.session_id, "Hi", max_tokens=4))
        c.close_session(second.session_id)
        assert c.create_session(model).session_id


def _try_create(client, model):
    try:
        return client.create_session(model)
    except EdgefleetError as error:
        if error.reason in (Reason.UNKNOWN_MODEL, Reason.NO_READY_NODE):
            return None
        raise


def test_keyless_http_over_its_byte_quota_gets_429_naming_the_limit(quota_fleet):
    """Stored responses of keyless loopback HTTP (one caller, "anonymous")
    fill its 8 KiB: the next one is a 429 whose message names the limit."""
    url = f"http://{quota_fleet.extra['http']}/v1/responses"
    body = json.dumps({"model": "smollm2-135m", "input": "x" * 1500, "max_output_tokens": 4})

    def post() -> tuple[int, dict]:
        request = urllib.request.Request(
            url, data=body.encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    statuses = []
    for _ in range(6):
        status, payload = post()
        statuses.append(status)
        if status == 429:
            break
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    assert "--key-max-bytes" in payload["error"]["message"]
    assert "anonymous callers" in payload["error"]["message"]
    assert payload["error"]["type"] == "rate_limit_error"
    assert payload["error"]["code"] == "storage_quota_exceeded"
