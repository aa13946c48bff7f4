"""The attack suite's fuzzers, against real processes (the bad-input issue).

- **HTTP**: schemathesis generates requests from the coordinator's own
  OpenAPI schema (``/openapi.json``, served with ``--dev``), valid ones and
  ones that break the schema, and sends them to a real coordinator with one
  real node. Every answer: no 5xx, no connection reset.
- **gRPC**: every RPC of CoordinatorService and NodeService (a fleet run
  ``--insecure``) and of AccessService (a secure fleet: admin key, inference
  key, no key, and a node's certificate on the node listener) gets random and
  mutated requests built from the protobuf descriptors (tests/fuzz_helpers.py).
  Every error: a status a bad request may get (never INTERNAL or UNKNOWN) with
  its named reason.

Afterwards the fleet is whole: its node still registered under the same
epoch, every slot free again, the sessions the fuzzing made readable and
closable (none stuck mid-turn), no etcd lease left behind, and a normal chat
served.

Seeds are fixed, so a failure reproduces. The quick part runs in the default
suite; the full-size part is marked ``chaos`` (``make chaos``).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig

from edgefleet import tls
from edgefleet.errors import Reason, reason_of
from edgefleet.local.etcd_server import EtcdCluster
from edgefleet.local.processes import (
    DaemonProcess,
    admin_client,
    free_port,
    join_token,
    start_coordinator,
    start_node,
)
from edgefleet.profile import Profile
from edgefleet.v1 import (
    access_pb2,
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from tests.conftest import FleetFactory
from tests.fuzz_helpers import Caller, MessageFuzzer, Method, Rules, Verdict, describe, methods_of
from tests.helpers import wait_until

SEED = 13
MODEL = "smollm2-135m"
READY = common_pb2.NODE_STATE_READY
COORDINATOR_SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"]
ACCESS_SERVICE = access_pb2.DESCRIPTOR.services_by_name["AccessService"]
NODE_SERVICE = node_pb2.DESCRIPTOR.services_by_name["NodeService"]
# Requests per RPC (and schemathesis examples per operation and mode).
QUICK, FULL = 6, 60
HTTP_QUICK, HTTP_FULL = 8, 50
# The coordinator takes messages up to 16 MiB; stay under it (a bigger one is
# refused by gRPC itself, before any handler).
LIMIT = 12 << 20
FULL_SESSION = (Reason.PROMPT_TOO_LONG, Reason.SESSION_FULL)
USER_HI = [common_pb2.ChatMessage(role="user", content="Hi")]
TWO_TOKENS = common_pb2.SamplingParams(max_tokens=2)


# --- fleets -------------------------------------------------------------------------------------
@dataclass
class Fleet:
    """A fleet under fuzzing and what must be true of it afterwards."""

    coordinator: DaemonProcess
    node: DaemonProcess
    node_id: str
    epoch: int
    http: str = ""
    etcd: str = ""  # an etcd endpoint, to list its leases
    profile: Profile | None = None
    node_state_dir: Path | None = None

    def channel(self, api_key: str = "") -> grpc.Channel:
        if self.profile is None:
            return grpc.insecure_channel(self.coordinator.address)
        profile = Profile(ca_pem=self.profile.ca_pem, api_key=api_key)
        return grpc.secure_channel(
            self.coordinator.address, profile.credentials(), options=profile.channel_options()
        )

    def admin_channel(self) -> grpc.Channel:
        return self.channel(self.profile.api_key if self.profile else "")

    def node_channel(self) -> grpc.Channel:
        """To the node's NodeService: plaintext in a fleet run --insecure."""
        return grpc.insecure_channel(self.node.address)


def etcd_leases(endpoint: str) -> set[str]:
    """The ids of the leases etcd holds now (its JSON gateway)."""
    reply = httpx.post(f"http://{endpoint}/v3/lease/leases", json={}, timeout=10)
    reply.raise_for_status()
    return {lease["ID"] for lease in reply.json().get("leases", [])}


def _epoch(channel: grpc.Channel, node_id: str) -> int:
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    for node in stub.FleetStatus(coordinator_pb2.FleetStatusRequest(), timeout=10).nodes:
        if node.node_id == node_id and node.state == READY:
            return node.epoch
    return 0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, default_model_path):
    """etcd, a coordinator run --insecure --dev (it serves /openapi.json), one node."""
    workdir = tmp_path_factory.mktemp("fuzz-api")
    etcd = EtcdCluster(1, base_dir=workdir / "etcd").start()
    factory = FleetFactory(workdir, etcd.endpoints)
    try:
        coordinator = factory.coordinator("--dev")
        node = factory.node("n1", slots=2, queue=16, extra_args=("--context", "512"))
        factory.wait_ready_nodes(1)
        with grpc.insecure_channel(coordinator.address) as channel:
            epoch = _epoch(channel, "n1")
        yield Fleet(
            coordinator,
            node,
            "n1",
            epoch,
            http=f"http://{coordinator.extra['http']}",
            etcd=etcd.endpoints[0],
        )
    finally:
        factory.stop_all()
        etcd.stop()


@pytest.fixture(scope="module")
def secure_fleet(tmp_path_factory, default_model_path):
    """etcd, a secure coordinator (fleet CA, keys), one node that joined with a token."""
    workdir = tmp_path_factory.mktemp("fuzz-access")
    etcd = EtcdCluster(1, base_dir=workdir / "etcd").start()
    coordinator = start_coordinator(
        grpc_address=f"127.0.0.1:{free_port()}",
        etcd=etcd.endpoints,
        extra_args=("--id", "coord-fuzz"),
        log_path=workdir / "coordinator.log",
        state_dir=workdir / "coordinator",
    )
    node = None
    try:
        coordinator.wait_serving(60)
        node_state = workdir / "alpha"
        node = start_node(
            listen=f"127.0.0.1:{free_port()}",
            models=MODEL,
            slots=2,
            extra_args=(
                "--coordinator",
                coordinator.address,
                "--node-id",
                "alpha",
                "--threads",
                "1",
                "--context",
                "512",
            ),
            log_path=workdir / "alpha.log",
            name="alpha",
            join=(join_token(coordinator), node_state),
        )
        node.wait_serving(120)
        profile = Profile.load(coordinator.extra["profile"])
        fleet = Fleet(coordinator, node, "alpha", 0, profile=profile, node_state_dir=node_state)
        with fleet.admin_channel() as channel:
            fleet.epoch = wait_until(lambda: _epoch(channel, "alpha"), what="alpha ready")
        yield fleet
    finally:
        if node is not None:
            node.terminate(timeout_s=15)
        coordinator.terminate(timeout_s=15)
        etcd.stop()


# --- what must hold afterwards ---------------------------------------------------------------
def assert_fleet_whole(
    fleet: Fleet, sessions: set[str] = frozenset(), leases: set[str] | None = None
) -> None:
    """The node kept its registration, every slot is free, no session is stuck,
    no etcd lease is left behind (``leases``: those held before the fuzzing),
    and a normal chat is served."""
    assert fleet.coordinator.alive(), "the coordinator died"
    assert fleet.node.alive(), "the node died"
    with fleet.admin_channel() as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)

        def only_the_real_node():
            nodes = stub.FleetStatus(coordinator_pb2.FleetStatusRequest(), timeout=10).nodes
            # Nodes the fuzzer registered have no heartbeat: their leases run out.
            return [(n.node_id, n.state, n.epoch) for n in nodes] == [
                (fleet.node_id, READY, fleet.epoch)
            ] and nodes[0]

        node = wait_until(only_the_real_node, timeout_s=60, what="the real node alone, same epoch")

        def slots_free():
            status = stub.FleetStatus(coordinator_pb2.FleetStatusRequest(), timeout=10)
            capacity = status.nodes[0].capacity
            return capacity.slots_total > 0 and capacity.slots_free == capacity.slots_total

        wait_until(slots_free, timeout_s=60, what="every slot free in the fleet's view")
        assert node.node_id == fleet.node_id
        if fleet.profile is None:
            with fleet.node_channel() as node_channel:
                node_stub = node_pb2_grpc.NodeServiceStub(node_channel)

                def node_idle():
                    capacity = node_stub.GetCapacity(node_pb2.GetCapacityRequest(), timeout=10)
                    return (
                        not capacity.draining
                        and capacity.slots_free == capacity.slots_total
                        and capacity.queue_depth == 0
                        and capacity.active_generations == 0
                    )

                wait_until(node_idle, timeout_s=60, what="the node idle, not draining")
        # Sessions: each readable (or closed by the fuzzing), none stuck mid-turn.
        live = []
        for session_id in sorted(sessions):
            try:
                stub.GetSession(
                    coordinator_pb2.GetSessionRequest(session_id=session_id), timeout=10
                )
                live.append(session_id)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND, (session_id, error)
        for session_id in live[:3]:
            turn = coordinator_pb2.ChatRequest(
                session_id=session_id, content="Say hi.", sampling=TWO_TOKENS
            )
            try:
                chunks = list(stub.Chat(turn, timeout=120))
                assert chunks and chunks[-1].finish_reason, session_id
            except grpc.RpcError as error:
                # A session the fuzzing filled may take no more turns; one stuck
                # mid-turn (SESSION_BUSY) would be a leak.
                assert reason_of(error) in FULL_SESSION, (session_id, error)
        for session_id in live:
            stub.CloseSession(
                coordinator_pb2.CloseSessionRequest(session_id=session_id), timeout=10
            )
            try:
                stub.GetSession(
                    coordinator_pb2.GetSessionRequest(session_id=session_id), timeout=10
                )
                raise AssertionError(f"session {session_id} still there after CloseSession")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
        if leases is not None:
            # Registrations the fuzzer made expire with their leases; sessions
            # it made are closed above: what is left was there before.
            wait_until(
                lambda: etcd_leases(fleet.etcd) <= leases,
                timeout_s=60,
                what="no etcd lease left behind by the fuzzing",
            )
        # A normal chat is served by the real node.
        chunks = list(
            stub.Complete(
                coordinator_pb2.CompleteRequest(
                    model=MODEL,
                    messages=[common_pb2.ChatMessage(role="user", content="Name a colour.")],
                    sampling=common_pb2.SamplingParams(max_tokens=4),
                ),
                timeout=120,
            )
        )
        assert "".join(c.text for c in chunks) and chunks[-1].finish_reason
        assert {c.node_id for c in chunks if c.node_id} == {fleet.node_id}
    if fleet.http:
        reply = httpx.post(
            f"{fleet.http}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] is not None


# --- the gRPC fuzzer ------------------------------------------------------------------------
@dataclass
class Run:
    """One fuzzing run: what came back, the problems, the sessions it made."""

    verdicts: Counter = field(default_factory=Counter)
    leases: set[str] | None = None  # etcd's leases before the run
    # One example per kind of bad answer (method, status, reason, what is wrong).
    problems: dict[str, str] = field(default_factory=dict)
    bad: int = 0
    sessions: set[str] = field(default_factory=set)

    def record(self, verdict: Verdict, request) -> None:
        reason = verdict.reason.name if verdict.reason else "-"
        self.verdicts[f"{verdict.method} {verdict.code.name} {reason}"] += 1
        if verdict.problem:
            self.bad += 1
            kind = f"{verdict.method} {verdict.code.name} {reason} {verdict.problem}"
            if kind not in self.problems:
                self.problems[kind] = f"{verdict}\n    case {verdict.case}: {describe(request)}"
        if isinstance(verdict.reply, coordinator_pb2.Session) and verdict.reply.session_id:
            self.sessions.add(verdict.reply.session_id)

    def merge(self, other: Run) -> None:
        self.verdicts.update(other.verdicts)
        for kind, example in other.problems.items():
            self.problems.setdefault(kind, example)
        self.bad += other.bad

    def assert_clean(self) -> None:
        print("\n".join(f"{count:4d}  {key}" for key, count in sorted(self.verdicts.items())))
        assert not self.problems, (
            f"{self.bad} bad answers of {len(self.problems)} kinds (one example each):\n"
            + "\n".join(list(self.problems.values())[:30])
        )


def fuzz_service(
    run: Run,
    caller: Caller,
    methods: list[Method],
    *,
    cases: int,
    label: str,
    seeds: dict[str, list],
    rules: Rules,
    rules_for: dict[str, Rules] | None = None,
    after: dict | None = None,
) -> None:
    """``cases`` random or mutated requests to each method; each answer judged."""
    for method in methods:
        rng = random.Random(f"{SEED}/{label}/{method.name}")
        fuzzer = MessageFuzzer(rng, (rules_for or {}).get(method.name, rules))
        for index in range(cases):
            request = fuzzer.request(method.input, seeds.get(method.name, ()), LIMIT)
            sent = request
            if method.client_streaming:  # a stream of a few messages
                sent = [request] + [
                    fuzzer.request(method.input, seeds.get(method.name, ()), 1 << 20)
                    for _ in range(rng.randrange(0, 3))
                ]
            if index == cases - 1:  # and bytes that parse as the type, however odd
                sent = fuzzer.garbage(method.input)
                sent = [sent] if method.client_streaming else sent
                request = sent[0] if method.client_streaming else sent
            verdict = caller.call(method, sent, case=f"{label}/{method.name}/{index}")
            run.record(verdict, request)
            if after and method.name in after:
                after[method.name]()


def _sessions(channel: grpc.Channel, count: int) -> list[str]:
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    return [
        stub.CreateSession(
            coordinator_pb2.CreateSessionRequest(model=MODEL, system_prompt="Be brief."),
            timeout=30,
        ).session_id
        for _ in range(count)
    ]


def coordinator_seeds(session_ids: list[str]) -> dict[str, list]:
    """Valid requests to mutate, so the fuzzing reaches past the first check."""
    capacity = common_pb2.Capacity(
        slots_total=2,
        slots_free=2,
        queue_limit=4,
        models=[common_pb2.LoadedModel(alias="fuzz-model", slots_total=2, slots_free=2)],
    )
    return {
        "Register": [
            coordinator_pb2.RegisterRequest(
                node_id="fuzz-node", address="127.0.0.1:9", models=["fuzz-model"], capacity=capacity
            )
        ],
        "Heartbeat": [
            coordinator_pb2.HeartbeatRequest(node_id="fuzz-node", epoch=1, capacity=capacity)
        ],
        "Deregister": [coordinator_pb2.DeregisterRequest(node_id="fuzz-node", epoch=1)],
        "CreateSession": [
            coordinator_pb2.CreateSessionRequest(
                model=MODEL, system_prompt="Be brief.", metadata={"k": "v"}, idle_ttl_seconds=60
            )
        ],
        "Chat": [
            coordinator_pb2.ChatRequest(session_id=s, content="Hi", sampling=TWO_TOKENS)
            for s in session_ids
        ],
        "GetSession": [coordinator_pb2.GetSessionRequest(session_id=s) for s in session_ids],
        "CloseSession": [coordinator_pb2.CloseSessionRequest(session_id=s) for s in session_ids],
        "Complete": [
            coordinator_pb2.CompleteRequest(model=MODEL, messages=USER_HI, sampling=TWO_TOKENS),
            coordinator_pb2.CompleteRequest(
                model=MODEL,
                messages=USER_HI,
                sampling=TWO_TOKENS,
                constraint=common_pb2.OutputConstraint(
                    json_schema='{"type": "object", "properties": {"a": {"type": "string"}}}'
                ),
            ),
            coordinator_pb2.CompleteRequest(
                model=MODEL,
                messages=USER_HI,
                sampling=TWO_TOKENS,
                tools=[
                    common_pb2.ToolDefinition(
                        name="weather", description="d", parameters_json='{"type": "object"}'
                    )
                ],
            ),
        ],
        "DrainNode": [coordinator_pb2.DrainNodeRequest(node_id="fuzz-node", drain=True)],
    }


def coordinator_rules(fleet: Fleet, session_ids: list[str]) -> Rules:
    return Rules(
        # Draining, deregistering or re-registering the real node (its id, or its
        # own certificate with its address) is an operator's or its own right.
        protected={
            "node_id": frozenset({fleet.node_id}),
            "address": frozenset({fleet.node.address}),
        },
        pools={
            "session_id": list(session_ids),
            "model": [MODEL, "auto"],
            "role": ["user", "system", "assistant", "tool", "developer"],
            "address": ["127.0.0.1:9"],
        },
    )


def node_seeds() -> dict[str, list]:
    return {
        "Generate": [
            node_pb2.GenerateRequest(model=MODEL, messages=USER_HI, sampling=TWO_TOKENS),
            node_pb2.GenerateRequest(
                model=MODEL,
                messages=USER_HI,
                sampling=TWO_TOKENS,
                constraint=common_pb2.OutputConstraint(gbnf='root ::= "a" | "b"'),
            ),
        ],
        "LoadModel": [node_pb2.LoadModelRequest(model=MODEL, slots=1)],
    }


def node_rules() -> tuple[Rules, dict[str, Rules]]:
    # Unloading the node's model or loading a second one are an operator's
    # rights (and cost minutes), not bugs: never the real names there.
    pools = {"model": [MODEL], "role": ["user", "system", "assistant", "tool"]}
    catalog = frozenset({MODEL, "gemma3-270m"})
    return Rules(pools=pools), {
        "LoadModel": Rules(protected={"model": catalog}, pools={"model": ["nope", "/dev/zero"]}),
        "UnloadModel": Rules(protected={"model": catalog}, pools={"model": ["nope"]}),
    }


def fuzz_insecure_fleet(fleet: Fleet, cases: int, label: str) -> Run:
    run = Run(leases=etcd_leases(fleet.etcd))
    with fleet.channel() as channel, fleet.node_channel() as node_channel:
        session_ids = _sessions(channel, 2)
        run.sessions.update(session_ids)
        fuzz_service(
            run,
            Caller(channel),
            methods_of(COORDINATOR_SERVICE),
            cases=cases,
            label=f"{label}/coordinator",
            seeds=coordinator_seeds(session_ids),
            rules=coordinator_rules(fleet, session_ids),
        )
        node_stub = node_pb2_grpc.NodeServiceStub(node_channel)
        rules, rules_for = node_rules()
        fuzz_service(
            run,
            Caller(node_channel),
            methods_of(NODE_SERVICE),
            cases=cases,
            label=f"{label}/node",
            seeds=node_seeds(),
            rules=rules,
            rules_for=rules_for,
            # Draining is the caller's right: resume at once, the fleet must serve on.
            after={
                "Drain": lambda: node_stub.Drain(node_pb2.DrainRequest(drain=False), timeout=10)
            },
        )
    return run


def _api_key(fleet: Fleet, name: str, scopes: list[str]) -> tuple[str, str]:
    with admin_client(fleet.coordinator) as admin:
        created = admin.access(
            "CreateApiKey", access_pb2.CreateApiKeyRequest(name=name, scopes=scopes)
        )
    return created.key, created.info.key_id


def fuzz_secure_fleet(fleet: Fleet, cases: int, label: str) -> Run:
    run = Run()
    inference_key, inference_id = _api_key(fleet, f"fuzz-{label}", ["inference"])
    with admin_client(fleet.coordinator) as admin:
        keys = admin.access("ListApiKeys", access_pb2.ListApiKeysRequest()).keys
        token = admin.access(
            "CreateJoinToken", access_pb2.CreateJoinTokenRequest(ttl_seconds=600, approve=True)
        ).token
    csr = tls.csr_for(tls.new_key(), tls.NODE, "fuzz-joiner")
    access_rules = Rules(
        # Revoking the node or the keys the test holds is an admin's right.
        protected={
            "node_id": frozenset({fleet.node_id}),
            "key_id": frozenset({k.key_id for k in keys} | {inference_id}),
        },
        pools={
            "token": [token, "EF1.0.0.0"],
            "csr_pem": [csr],
            "node_id": ["fuzz-joiner"],
            "scopes": ["inference", "admin"],
        },
    )
    access_seeds = {
        "Join": [access_pb2.JoinRequest(token=token, csr_pem=csr, node_id="fuzz-joiner")],
        "CreateJoinToken": [access_pb2.CreateJoinTokenRequest(ttl_seconds=60, uses=1)],
        "CreateApiKey": [access_pb2.CreateApiKeyRequest(name="k", scopes=["inference"])],
        "ListAudit": [access_pb2.ListAuditRequest(limit=5)],
    }
    access_methods = methods_of(ACCESS_SERVICE)
    coordinator_methods = methods_of(COORDINATOR_SERVICE)
    with fleet.admin_channel() as admin_channel:
        session_ids = _sessions(admin_channel, 1)
        run.sessions.update(session_ids)
        seeds = {**coordinator_seeds(session_ids), **access_seeds}
        rules = coordinator_rules(fleet, session_ids)
        rules.protected.update(access_rules.protected)
        rules.pools.update(access_rules.pools)
        # Every RPC of both services under each credential a client may hold.
        for who, api_key in (
            ("admin", fleet.profile.api_key),
            ("inference", inference_key),
            ("anonymous", ""),
            ("wrong-key", "ef_" + "0" * 40),
        ):
            with fleet.channel(api_key) as channel:
                for service_methods in (access_methods, coordinator_methods):
                    fuzz_service(
                        run,
                        Caller(channel),
                        service_methods,
                        cases=cases if who == "admin" else max(2, cases // 3),
                        label=f"{label}/{who}",
                        seeds=seeds,
                        rules=rules,
                    )
    # The node listener, with the node's own certificate: it may speak only for itself.
    state = fleet.node_state_dir
    credentials = tls.channel_credentials(
        (state / "ca.crt").read_bytes(),
        (state / "node.key").read_bytes(),
        (state / "node.crt").read_bytes(),
    )
    with admin_client(fleet.coordinator) as admin:
        node_listener = admin.status().coordinators[0].node_address
    channel = grpc.secure_channel(
        node_listener, credentials, options=tls.channel_options(tls.COORDINATOR_DNS)
    )
    with channel:
        for service_methods in (access_methods, coordinator_methods):
            fuzz_service(
                run,
                Caller(channel),
                service_methods,
                cases=cases,
                label=f"{label}/node-identity",
                seeds=seeds,
                rules=rules,
            )
    return run


# --- quick, in the default suite -----------------------------------------------------------
def test_grpc_fuzz_coordinator_and_node_services(fleet):
    run = fuzz_insecure_fleet(fleet, QUICK, "quick")
    assert_fleet_whole(fleet, run.sessions, run.leases)
    run.assert_clean()


def test_grpc_fuzz_access_service_under_every_credential(secure_fleet):
    run = fuzz_secure_fleet(secure_fleet, QUICK, "quick")
    assert_fleet_whole(secure_fleet, run.sessions)
    run.assert_clean()


# A request that does not parse is INVALID_ARGUMENT; a listener may refuse the
# method or the caller before it reads any request (PERMISSION_DENIED, UNAUTHENTICATED).
UNPARSED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


def test_requests_that_do_not_parse_are_invalid_argument(fleet, secure_fleet):
    """Bytes that are no valid message of the type (bad UTF-8 in a string, a
    truncated field) are the request's fault: INVALID_ARGUMENT with a reason."""
    run = Run()
    targets = [
        (fleet.channel(), methods_of(COORDINATOR_SERVICE), "insecure"),
        (fleet.node_channel(), methods_of(NODE_SERVICE), "node"),
        (
            secure_fleet.admin_channel(),
            methods_of(ACCESS_SERVICE) + methods_of(COORDINATOR_SERVICE),
            "secure",
        ),
    ]
    for channel, methods, label in targets:
        with channel:
            caller = Caller(channel)
            for method in methods:
                fuzzer = MessageFuzzer(random.Random(f"{SEED}/corrupt/{label}/{method.name}"))
                for index in range(2):
                    raw = fuzzer.corrupt(method.input)
                    sent = [raw] if method.client_streaming else raw
                    verdict = caller.call(method, sent, case=f"corrupt/{label}/{index}")
                    if not verdict.problem and verdict.code not in UNPARSED_CODES:
                        verdict.problem = "a request that does not parse must be INVALID_ARGUMENT"
                    run.record(verdict, raw)
    assert_fleet_whole(fleet)
    assert_fleet_whole(secure_fleet)
    run.assert_clean()


# --- schemathesis over the OpenAPI schema ----------------------------------------------------
OPERATIONS = [
    ("GET", "/v1/models", GenerationMode.POSITIVE),
    ("POST", "/v1/chat/completions", GenerationMode.POSITIVE),
    ("POST", "/v1/chat/completions", GenerationMode.NEGATIVE),
    ("POST", "/v1/responses", GenerationMode.POSITIVE),
    ("POST", "/v1/responses", GenerationMode.NEGATIVE),
]
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@pytest.fixture(scope="module")
def openapi(fleet):
    config = SchemathesisConfig.from_dict({"seed": SEED, "generation": {"deterministic": True}})
    schema = schemathesis.openapi.from_url(f"{fleet.http}/openapi.json", config=config)
    paths = {(method, path) for method, path, _ in OPERATIONS}
    served = {
        (method.upper(), path)
        for path, item in schema.raw_schema["paths"].items()
        for method in item
    }
    assert served == paths, f"the fuzzing covers {sorted(paths)}; the API serves {sorted(served)}"
    return schema


def _bounded(case, count: int) -> None:
    """Aim two of three valid requests at the real model, with replies of a few
    tokens (so the run fits on two cores); invalid requests go as generated."""
    body = case.body
    if not isinstance(body, dict):
        return
    if count % 3:
        body["model"] = MODEL
    for name in TOKEN_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 4:
            body[name] = 4
    if not any(name in body for name in TOKEN_FIELDS):
        body["max_tokens" if "messages" in body else "max_output_tokens"] = 2


def fuzz_openapi(schema, method: str, path: str, mode: GenerationMode, examples: int) -> Counter:
    """``examples`` requests to one operation; a 5xx or a reset fails at once
    (and hypothesis shrinks it). Afterwards, every 4xx must have had an
    OpenAI-style error body (what the SDKs read)."""
    operation = schema[path][method]
    statuses: Counter = Counter()
    not_openai: dict[int, str] = {}

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case):
        if mode is GenerationMode.POSITIVE:
            _bounded(case, sum(statuses.values()))
        # A reset or a hang-up raises here (requests' ConnectionError): a failure.
        reply = case.call(timeout=120)
        statuses[reply.status_code] += 1
        case.validate_response(reply, checks=[not_a_server_error])
        if reply.status_code >= 400:
            try:
                error = reply.json()["error"]
                assert error["message"] and error["type"]
            except (ValueError, KeyError, TypeError, AssertionError):
                body = case.body if not isinstance(case.body, bytes) else case.body[:200]
                not_openai.setdefault(reply.status_code, f"{body!r} -> {reply.text[:300]}")

    one()
    print(f"{method} {path} {mode.value}: {dict(statuses)}")
    assert not not_openai, f"4xx answers without an OpenAI-style error body: {not_openai}"
    return statuses


@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS)
def test_openapi_fuzz_no_5xx(openapi, method, path, mode):
    fuzz_openapi(openapi, method, path, mode, HTTP_QUICK)


def test_the_fleet_is_whole_after_the_http_fuzzing(fleet):
    assert_fleet_whole(fleet)


# --- full size (make chaos) ---------------------------------------------------------------------
@pytest.mark.chaos
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS)
def test_openapi_fuzz_full(openapi, fleet, method, path, mode):
    try:
        fuzz_openapi(openapi, method, path, mode, HTTP_FULL)
    finally:
        assert_fleet_whole(fleet)


@pytest.mark.chaos
@pytest.mark.timeout(1200)
def test_grpc_fuzz_full(fleet, secure_fleet):
    run = fuzz_insecure_fleet(fleet, FULL, "full")
    assert_fleet_whole(fleet, run.sessions, run.leases)
    secure = fuzz_secure_fleet(secure_fleet, FULL // 2, "full")
    assert_fleet_whole(secure_fleet, secure.sessions)
    run.merge(secure)
    run.assert_clean()


def test_fuzz_runs_are_reproducible():
    """The same seed gives the same requests (a failure names a case that reruns)."""

    def draw():
        out = []
        for method in methods_of(COORDINATOR_SERVICE) + methods_of(ACCESS_SERVICE):
            fuzzer = MessageFuzzer(random.Random(f"{SEED}/repro/{method.name}"))
            out.append(fuzzer.request(method.input, [], LIMIT).SerializeToString())
            out.append(fuzzer.garbage(method.input))
        return out

    assert draw() == draw()
