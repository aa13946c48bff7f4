"""Slow, vanished and greedy clients (issue 13, "Connections").

- The quota rules (``coordinator.quotas``): pure, on a fake clock, in milliseconds.
- The HTTP listener's connection rules (``coordinator.http_app``): uvicorn with
  the guarded protocol in this process, on a loopback port, with a tiny app.
- The same against real processes: a secure fleet (etcd, a coordinator with
  small limits, one node that joined with a token), where each test uses API
  keys of its own so the quotas of one test never touch another's.

No assertion is on speed: waits are for a condition, with generous deadlines.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from pathlib import Path

import httpx
import pytest

from coordinator.http_app import HttpLimits, http_server
from coordinator.openai_common import api_error
from coordinator.quotas import QuotaLimits, Quotas, principal_key
from edgefleet import auth
from edgefleet.auth import Principal
from edgefleet.errors import EdgefleetError, Reason
from tests.helpers import wait_until

CHAT = "/v1/chat/completions"
MODEL = "smollm2-135m"
LONG_PROMPT = "Count from 1 to 500, one number per line."


# --- quotas: pure --------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def key(name: str) -> Principal:
    return Principal("key", name, name, frozenset({auth.INFERENCE}))


def refusal(quotas: Quotas, caller: Principal) -> EdgefleetError:
    with pytest.raises(EdgefleetError) as refused:
        quotas.admit(caller)
    return refused.value


def test_a_key_gets_its_burst_then_its_rate():
    clock = Clock()
    quotas = Quotas(QuotaLimits(rate_per_s=2, burst=3), clock=clock)
    for _ in range(3):
        quotas.admit(key("a")).release()
    error = refusal(quotas, key("a"))
    assert error.reason is Reason.RATE_LIMITED and error.code.name == "RESOURCE_EXHAUSTED"
    assert error.retry_after_s == pytest.approx(0.5)
    clock.now += 0.25
    assert refusal(quotas, key("a")).retry_after_s == pytest.approx(0.25)
    clock.now += 0.25
    quotas.admit(key("a")).release()  # one token came back
    clock.now += 60
    for _ in range(3):  # a quiet spell fills the bucket, never beyond the burst
        quotas.admit(key("a")).release()
    assert refusal(quotas, key("a")).reason is Reason.RATE_LIMITED
    # Another key has a bucket of its own.
    quotas.admit(key("b")).release()


def test_generations_in_progress_are_counted_per_key_and_given_back_once():
    quotas = Quotas(QuotaLimits(max_concurrent=2))
    first, second = quotas.admit(key("a")), quotas.admit(key("a"))
    error = refusal(quotas, key("a"))
    assert error.reason is Reason.TOO_MANY_STREAMS and error.retry_after_s == 1.0
    with quotas.admit(key("b")):
        assert quotas.running("key:b") == 1
    assert quotas.running("key:b") == 0
    first.release()
    first.release()  # idempotent: a second release gives nothing back twice
    assert quotas.running("key:a") == 1
    with quotas.admit(key("a")):
        assert refusal(quotas, key("a")).reason is Reason.TOO_MANY_STREAMS
    second.release()
    assert quotas.running("key:a") == 0


def test_a_refused_call_spends_nothing():
    clock = Clock()
    quotas = Quotas(QuotaLimits(rate_per_s=1, burst=2, max_concurrent=1), clock=clock)
    held = quotas.admit(key("a"))  # one token spent, one left
    for _ in range(5):  # refused for streams: no token spent
        assert refusal(quotas, key("a")).reason is Reason.TOO_MANY_STREAMS
    held.release()
    quotas.admit(key("a")).release()  # the token left is still there
    for _ in range(5):  # refused for rate: nothing counted as running
        assert refusal(quotas, key("a")).reason is Reason.RATE_LIMITED
    assert quotas.running("key:a") == 0


def test_who_spends_a_quota():
    assert principal_key(key("k1")) == "key:k1"
    assert principal_key(auth.static_key_principal("s", ["s"])) == "key:static"
    assert principal_key(auth.ANONYMOUS) == "anonymous"  # keyless loopback: one caller
    assert principal_key(auth.INSECURE) is None  # --insecure: no identities, no quotas
    quotas = Quotas(QuotaLimits(rate_per_s=1, burst=1, max_concurrent=1))
    for _ in range(10):
        quotas.admit(auth.INSECURE)
    quotas.admit(auth.ANONYMOUS)
    assert refusal(quotas, auth.ANONYMOUS).reason is Reason.TOO_MANY_STREAMS


def test_zero_turns_a_limit_off_and_bad_limits_are_refused():
    quotas = Quotas(QuotaLimits())
    held = [quotas.admit(key("a")) for _ in range(1000)]
    assert quotas.running("key:a") == 0  # off: nothing is even counted
    del held
    only_streams = Quotas(QuotaLimits(max_concurrent=1))
    only_streams.admit(key("a"))
    assert refusal(only_streams, key("a")).reason is Reason.TOO_MANY_STREAMS
    for bad in ({"rate_per_s": -1}, {"rate_per_s": float("nan")}, {"burst": -1}):
        with pytest.raises(ValueError):
            QuotaLimits(**bad)
    assert QuotaLimits(rate_per_s=2.5).bucket_size == 3  # no burst: one second's worth


def test_the_bucket_table_is_bounded():
    clock = Clock()
    quotas = Quotas(QuotaLimits(rate_per_s=1, burst=1), clock=clock, max_principals=3)
    for name in "abcdef":
        quotas.admit(key(name)).release()
    assert len(quotas._buckets) == 3
    # A forgotten key comes back with a full bucket (generous, never stricter).
    quotas.admit(key("a")).release()


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        (Reason.RATE_LIMITED, "rate_limit_exceeded"),
        (Reason.TOO_MANY_STREAMS, "too_many_concurrent_requests"),
    ],
)
def test_quota_refusals_are_429_with_retry_after(reason, code):
    quotas = Quotas(QuotaLimits(rate_per_s=0.1, burst=1, max_concurrent=1))
    held = quotas.admit(key("a"))
    if reason is Reason.RATE_LIMITED:
        held.release()
    error = api_error(refusal(quotas, key("a")))
    assert (error.status, error.type, error.code) == (429, "rate_limit_error", code)
    assert int(error.headers["Retry-After"]) >= 1


# --- the guarded uvicorn protocol, in this process ---------------------------------------
async def tiny_app(scope, receive, send):
    """Reads the whole body, answers 200 with its length."""
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"bytes": size}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


async def _serve(limits: HttpLimits):
    from edgefleet.local.processes import free_port

    port = free_port()
    server = http_server(tiny_app, f"127.0.0.1:{port}", limits=limits)
    assert await server.start()
    task = asyncio.create_task(server.main_loop())
    return server, task, port


async def _stop(server, task) -> None:
    await server.stop()
    task.cancel()


async def _read_all(reader: asyncio.StreamReader, timeout_s: float = 20.0) -> bytes:
    """Everything until the server closes the connection (a reset counts as closed)."""
    data = b""
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionResetError:
        pass
    return data


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers = {k.lower(): v for k, v in headers.items()}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 20)
    return int(lines[0].split()[1]), headers, body


def test_a_keep_alive_connection_gets_the_head_timeout_again_for_its_next_request():
    async def scenario():
        server, task, port = await _serve(HttpLimits(header_timeout_s=0.5, idle_timeout_s=30))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GET)
            assert (await _response(reader))[0] == 200
            writer.write(b"GET / HTTP/1.1\r\nHost")  # the next head, never finished
            for _ in range(3):  # a byte now and then does not extend the time
                await asyncio.sleep(0.2)
                writer.write(b"x")
            tail = await _read_all(reader)
            assert tail.startswith(b"HTTP/1.1 408 "), tail
            assert json.loads(tail.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
            # A silent connection is closed without a word.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await _read_all(reader) == b""
            # Two pipelined requests are both answered, then the connection idles.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GET + b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
            assert (await _response(reader))[0] == 200
            status, _, body = await _response(reader)
            assert status == 200 and json.loads(body) == {"bytes": 3}
            writer.close()
        finally:
            await _stop(server, task)

    asyncio.run(scenario())


def test_connections_beyond_the_limit_get_503_and_the_served_ones_go_on():
    async def scenario():
        limits = HttpLimits(header_timeout_s=30, max_connections=2)
        server, task, port = await _serve(limits)
        try:
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GET)
            status, headers, body = await _response(reader)
            assert status == 503 and headers["retry-after"] == "1"
            assert json.loads(body)["error"]["code"] == "too_many_connections"
            assert await _read_all(reader) == b""  # then closed
            for reader, writer in held:  # the served ones are served, and stay open
                for _ in range(2):
                    writer.write(GET)
                    assert (await _response(reader))[0] == 200
            held[0][1].close()
            await held[0][1].wait_closed()

            async def served_again() -> bool:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(GET)
                status = (await _response(reader))[0]
                writer.close()
                return status == 200

            deadline = time.monotonic() + 20
            while not await served_again():  # the closed one's place is free again
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            await _stop(server, task)

    asyncio.run(scenario())


# --- real processes: a secure fleet with small limits --------------------------------------
HEAD_TIMEOUT_S = 4
BODY_TIMEOUT_S = 3
MAX_CONNECTIONS = 30
STREAMS_PER_KEY = 2
RATE_BURST = 3


class Fleet:
    def __init__(self, base: Path) -> None:
        from edgefleet.local.etcd_server import EtcdCluster
        from edgefleet.local.processes import free_port, join_token, start_coordinator, start_node
        from edgefleet.profile import Profile

        self.base = base
        self.etcd = EtcdCluster(1, base_dir=base / "etcd").start()
        self.coordinator = start_coordinator(
            grpc_address=f"127.0.0.1:{free_port()}",
            etcd=self.etcd.endpoints,
            extra_args=(
                "--id",
                "coord-c",
                "--http-header-timeout",
                str(HEAD_TIMEOUT_S),
                "--http-body-timeout",
                str(BODY_TIMEOUT_S),
                "--http-max-connections",
                str(MAX_CONNECTIONS),
                "--rate-limit",
                "0.02",  # one generation per 50 s after the burst: a test never refills
                "--rate-burst",
                str(RATE_BURST),
                "--max-streams-per-key",
                str(STREAMS_PER_KEY),
                # One node on shared cores: a slow token is not a failed node here.
                "--stall-timeout",
                "60",
                "--first-token-timeout",
                "120",
            ),
            log_path=base / "coordinator.log",
            state_dir=base / "coordinator",
        )
        self.nodes = []
        self.coordinator.wait_serving(60)
        self.profile = Profile.load(self.coordinator.extra["profile"])
        self.http = f"http://{self.coordinator.extra['http']}"
        node = start_node(
            listen=f"127.0.0.1:{free_port()}",
            models=MODEL,
            slots=3,
            extra_args=("--coordinator", self.coordinator.address, "--node-id", "n1"),
            log_path=base / "node.log",
            name="n1",
            join=(join_token(self.coordinator), base / "n1"),
        )
        self.nodes.append(node)
        node.wait_serving(120)
        wait_until(lambda: self.slots() == (3, 3), timeout_s=60, what="the node ready")

    def admin(self):
        from edgefleet.local.processes import admin_client

        return admin_client(self.coordinator)

    def key(self) -> str:
        from edgefleet.v1 import access_pb2

        with self.admin() as admin:
            return admin.access(
                "CreateApiKey", access_pb2.CreateApiKeyRequest(name="t", scopes=["inference"])
            ).key

    def client(self, api_key: str):
        from edgefleet.client import FleetClient

        return FleetClient([self.coordinator.address], ca_pem=self.profile.ca_pem, api_key=api_key)

    def slots(self) -> tuple[int, int] | None:
        """(free, total) slots of the ready node, as the coordinator sees it."""
        from edgefleet.v1.common_pb2 import NODE_STATE_READY

        with self.admin() as admin:
            nodes = [n for n in admin.status().nodes if n.state == NODE_STATE_READY]
        if len(nodes) != 1:
            return None
        return nodes[0].capacity.slots_free, nodes[0].capacity.slots_total

    def cancelled(self, method: str) -> float:
        """How many requests of ``method`` the coordinator counted as cancelled."""
        text = httpx.get(f"{self.http}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("edgefleet_requests_total{") and f'method="{method}"' in line:
                if 'status="CANCELLED"' in line:
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        for node in self.nodes:
            node.terminate(timeout_s=15)
        self.coordinator.terminate(timeout_s=15)
        self.etcd.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, default_model_path):
    fleet = Fleet(tmp_path_factory.mktemp("connections"))
    try:
        yield fleet
    finally:
        fleet.stop()


def bearer(api_key: str) -> dict:
    return {"Authorization": f"Bearer {api_key}"}


def chat(fleet: Fleet, api_key: str, **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    return httpx.post(
        f"{fleet.http}{CHAT}", json={**body, **fields}, headers=bearer(api_key), timeout=120
    )


def connect(fleet: Fleet) -> socket.socket:
    host, port = fleet.coordinator.extra["http"].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def wait_closed(sockets: list[socket.socket], *, trickle: set[int] = frozenset(), timeout_s=60):
    """Wait until the server has closed every socket (EOF or reset), sending one
    more header line every half second on those in ``trickle``; returns what
    each one received."""
    received = {s.fileno(): b"" for s in sockets}
    open_ = {s.fileno(): s for s in sockets}
    deadline = time.monotonic() + timeout_s
    while open_:
        assert time.monotonic() < deadline, f"{len(open_)} connections still open"
        for fd in trickle & open_.keys():
            try:
                open_[fd].send(b"X-Slow: 1\r\n")
            except OSError:
                pass
        readable, _, _ = select.select(list(open_.values()), [], [], 0.5)
        for sock in readable:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            received[sock.fileno()] += data
            if not data:
                del open_[sock.fileno()]
    return list(received.values())


def test_half_sent_requests_are_closed_after_the_head_timeout_and_others_are_served(fleet):
    api_key = fleet.key()
    half = []
    for _ in range(20):
        sock = connect(fleet)
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: app".encode())
        half.append(sock)
    trickle = {s.fileno() for s in half[::2]}  # half of them keep sending a byte or so
    started = time.monotonic()
    # Meanwhile a normal request is served.
    reply = chat(fleet, api_key)
    assert reply.status_code == 200, reply.text
    answers = wait_closed(half, trickle=trickle)
    print(f"20 half-sent requests closed within {time.monotonic() - started:.1f}s")
    for answer in answers:  # a 408 if the server could still say so, else just closed
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
    for sock in half:
        sock.close()
    assert chat(fleet, api_key).status_code == 200


def test_connections_beyond_the_limit_get_503_while_the_others_are_served(fleet):
    held = [connect(fleet) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # the server has accepted them (no harm if it already had)
        refused = httpx.get(f"{fleet.http}/healthz", timeout=30)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "too_many_connections"
        # A held connection is served as usual.
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()
    wait_until(
        lambda: httpx.get(f"{fleet.http}/healthz", timeout=30).status_code == 200,
        timeout_s=30,
        what="connections served again once the held ones closed",
    )


def test_a_body_slower_than_the_floor_gets_408(fleet):
    sock = connect(fleet)
    try:
        sock.sendall(
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f'Content-Length: 1000\r\n\r\n{{"model": '.encode()
        )
        (answer,) = wait_closed([sock])
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


LONG_CHAT = {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 1500}
LONG_RESPONSE = {"input": LONG_PROMPT, "max_output_tokens": 1500}


@pytest.mark.parametrize(
    ("path", "method", "body"),
    [(CHAT, "chat.completions", LONG_CHAT), ("/v1/responses", "responses", LONG_RESPONSE)],
)
def test_a_vanished_non_streaming_client_frees_its_slot(fleet, path, method, body):
    api_key = fleet.key()
    before = fleet.cancelled(method)
    payload = json.dumps({"model": MODEL, "temperature": 0, **body}).encode()
    sock = connect(fleet)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    wait_until(lambda: fleet.slots() == (2, 3), timeout_s=60, what="the generation on a slot")
    sock.close()  # the client goes away before its reply is ready
    wait_until(lambda: fleet.slots() == (3, 3), timeout_s=60, what="the slot free again")
    wait_until(
        lambda: fleet.cancelled(method) == before + 1, timeout_s=30, what="a cancelled request"
    )


def _open_stream(fleet: Fleet, api_key: str):
    """A streamed chat under way: (client, stream context, response, its lines).
    Keep the lines iterator: dropping it closes the connection (httpx), and
    the coordinator then ends the generation as it should."""
    client = httpx.Client(timeout=120)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    context = client.stream("POST", f"{fleet.http}{CHAT}", json=body, headers=bearer(api_key))
    reply = context.__enter__()
    lines = reply.iter_lines()
    assert reply.status_code == 200
    assert next(lines).startswith("data: ")  # the reply is under way
    return client, context, reply, lines


def test_a_keys_stream_beyond_its_quota_gets_429_and_another_key_is_served(fleet):
    greedy, other = fleet.key(), fleet.key()
    streams = [_open_stream(fleet, greedy) for _ in range(STREAMS_PER_KEY)]
    try:
        refused = chat(fleet, greedy)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == (
            "rate_limit_error",
            "too_many_concurrent_requests",
        )
        served = chat(fleet, other)
        assert served.status_code == 200, served.text
    finally:
        for client, context, _, _ in streams:
            context.__exit__(None, None, None)
            client.close()
    # Streams closed by their client give their places back.
    wait_until(lambda: chat(fleet, greedy).status_code == 200, timeout_s=60, what="a place back")
    wait_until(lambda: fleet.slots() == (3, 3), timeout_s=60, what="every slot free")


def test_a_burst_beyond_the_rate_gets_429_with_retry_after(fleet):
    hasty, other = fleet.key(), fleet.key()
    for _ in range(RATE_BURST):
        assert chat(fleet, hasty, max_tokens=1).status_code == 200
    refused = chat(fleet, hasty, max_tokens=1)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert chat(fleet, other, max_tokens=1).status_code == 200


def test_grpc_quotas_are_resource_exhausted_with_a_retry_hint(fleet):
    from edgefleet.errors import ResourceExhausted

    api_key = fleet.key()
    with fleet.client(api_key) as client:
        streams = [
            client.complete(MODEL, [("user", LONG_PROMPT)], max_tokens=400, temperature=0)
            for _ in range(STREAMS_PER_KEY)
        ]
        try:
            for stream in streams:
                next(stream)
            with pytest.raises(ResourceExhausted) as refused:
                list(client.complete(MODEL, [("user", "Hi")], max_tokens=2))
            assert refused.value.reason is Reason.TOO_MANY_STREAMS
            assert refused.value.retry_after_s == 1.0
        finally:
            for stream in streams:
                stream.cancel()
    wait_until(lambda: fleet.slots() == (3, 3), timeout_s=60, what="every slot free")


def test_nothing_leaked_and_the_node_stayed(fleet):
    assert fleet.coordinator.alive()
    assert fleet.slots() == (3, 3)
    assert httpx.get(f"{fleet.http}/readyz", timeout=10).json()["ready"]
    # Many short connections in a row: none is refused once its predecessor closed.
    for _ in range(MAX_CONNECTIONS + 5):
        with httpx.Client() as client:
            assert client.get(f"{fleet.http}/healthz", timeout=30).status_code == 200
