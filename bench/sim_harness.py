"""A real control plane over SIMULATED nodes: etcd, a coordinator process,
and ``bench.sim_fleet`` processes hosting the simulated node agents.

Shared by the control-plane-at-scale and balancing scenarios. Everything but
the token source is the real thing; the token source is the simulator.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from edgefleet.local.etcd_server import EtcdCluster
from edgefleet.local.processes import DaemonProcess, free_port, start_coordinator
from edgefleet.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)

MODEL = "smollm2-135m"


@dataclass(frozen=True)
class NodeGroup:
    """``count`` simulated nodes alike: one sim_fleet process."""

    count: int
    tokens_per_s: float
    prefix: str
    cold_start_s: float = 0.0
    slots: int = 4
    queue: int = 16


@dataclass
class SimulatedFleet:
    workdir: Path
    groups: list[NodeGroup]
    policy: str = "scored"
    coordinator_args: tuple[str, ...] = ()
    etcd: EtcdCluster | None = None
    coordinator: DaemonProcess | None = None
    hosts: list[subprocess.Popen] = field(default_factory=list)

    def __enter__(self) -> SimulatedFleet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.etcd = EtcdCluster(1, base_dir=self.workdir / "etcd").start()
        self.coordinator = start_coordinator(
            grpc_address=f"127.0.0.1:{free_port()}",
            etcd=self.etcd.endpoints,
            extra_args=("--policy", self.policy, *self.coordinator_args),
            log_path=self.workdir / f"coordinator-{self.policy}.log",
        )
        self.coordinator.wait_serving(60)
        for group in self.groups:
            log = open(self.workdir / f"sim-{group.prefix}.log", "w")
            self.hosts.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.sim_fleet",
                        "--coordinator",
                        self.coordinator.address,
                        "--count",
                        str(group.count),
                        "--prefix",
                        group.prefix,
                        "--tokens-per-s",
                        str(group.tokens_per_s),
                        "--cold-start-s",
                        str(group.cold_start_s),
                        "--slots",
                        str(group.slots),
                        "--queue",
                        str(group.queue),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        return self

    def __exit__(self, *exc) -> None:
        for host in self.hosts:
            host.terminate()
        for host in self.hosts:
            try:
                host.wait(20)
            except subprocess.TimeoutExpired:
                host.kill()
        if self.coordinator is not None:
            self.coordinator.terminate()
        if self.etcd is not None:
            self.etcd.stop()

    @property
    def size(self) -> int:
        return sum(g.count for g in self.groups)

    def status(self, timeout_s: float = 30.0) -> coordinator_pb2.FleetStatusResponse:
        with grpc.insecure_channel(self.coordinator.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            return stub.FleetStatus(coordinator_pb2.FleetStatusRequest(), timeout=timeout_s)

    def wait_ready(self, timeout_s: float = 300.0, say=print) -> float:
        """Seconds until every simulated node is registered and ready."""
        started = time.monotonic()
        last_report = 0.0
        while True:
            for host in self.hosts:
                if host.poll() is not None:
                    raise RuntimeError(f"a sim_fleet process exited ({host.returncode})")
            ready = sum(1 for n in self.status().nodes if n.state == common_pb2.NODE_STATE_READY)
            elapsed = time.monotonic() - started
            if ready >= self.size:
                return elapsed
            if elapsed - last_report > 5:
                say(f"  {ready}/{self.size} simulated nodes ready ({elapsed:.0f}s)")
                last_report = elapsed
            if elapsed > timeout_s:
                raise TimeoutError(f"only {ready}/{self.size} nodes ready after {timeout_s}s")
            time.sleep(0.5)

    def etcd_proposals(self) -> float:
        """etcd's committed raft proposals so far (every write is one)."""
        url = f"http://{self.etcd.endpoints[0]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("etcd_server_proposals_committed_total "):
                    return float(line.split()[1])
        return float("nan")


@dataclass
class StreamResult:
    ok: bool
    error: str = ""
    tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    placement_us: float | None = None
    # Per token: client receive time minus the simulator's emit time (ns).
    token_latency_ns: list[int] = field(default_factory=list)


def _token_latencies(text: str, received_ns: int) -> list[int]:
    return [received_ns - int(stamp) for stamp in text.split()]


async def read_stream(call, started: float) -> StreamResult:
    result = StreamResult(ok=True)
    try:
        async for chunk in call:
            now_ns = time.monotonic_ns()
            if chunk.text:
                if not result.tokens:
                    result.ttft_s = time.perf_counter() - started
                result.tokens += chunk.token_count or len(chunk.text.split())
                result.token_latency_ns.extend(_token_latencies(chunk.text, now_ns))
        for key, value in await call.trailing_metadata() or ():
            if key == "edgefleet-placement-us":
                result.placement_us = float(value)
    except grpc.aio.AioRpcError as error:
        result.ok = False
        result.error = error.code().name
    result.total_s = time.perf_counter() - started
    return result


async def complete_via_coordinator(stub, max_tokens: int, prompt: str = "hello") -> StreamResult:
    started = time.perf_counter()
    call = stub.Complete(
        coordinator_pb2.CompleteRequest(
            model=MODEL,
            messages=[common_pb2.ChatMessage(role="user", content=prompt)],
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
        )
    )
    return await read_stream(call, started)


async def chat_via_coordinator(stub, session_id: str, max_tokens: int) -> StreamResult:
    started = time.perf_counter()
    call = stub.Chat(
        coordinator_pb2.ChatRequest(
            session_id=session_id,
            content="hello",
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
        )
    )
    return await read_stream(call, started)


async def generate_direct(address: str, max_tokens: int) -> StreamResult:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        started = time.perf_counter()
        call = stub.Generate(
            node_pb2.GenerateRequest(
                model=MODEL,
                messages=[common_pb2.ChatMessage(role="user", content="hello")],
                sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
            )
        )
        return await read_stream(call, started)


class ProcessSampler:
    """CPU (cores busy) and peak RSS of one process over a window."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._peak_rss = 0
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> ProcessSampler:
        self._t0 = time.monotonic()
        self._cpu0 = sum(self._process.cpu_times()[:2])
        self._task = asyncio.create_task(self._watch())
        return self

    async def _watch(self) -> None:
        while True:
            self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
            await asyncio.sleep(0.5)

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        self.cores = (sum(self._process.cpu_times()[:2]) - self._cpu0) / (
            time.monotonic() - self._t0
        )
        self.peak_rss_mib = self._peak_rss / 2**20
