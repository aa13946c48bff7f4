"""Failover under load: real nodes and coordinators die mid-stream.

A fleet of etcd, two coordinator replicas and three real node processes
serves many concurrent streaming chat sessions; in each round one process is
killed (kill -9) or frozen (SIGSTOP) while every session is mid-reply.
Reported per fault kind:

- sessions completed / started, and turns lost (a finished reply whose turn
  is not stored exactly once);
- replies with repeated or missing text: the part before the failure must be
  the model's own reply (a prefix of the no-failure reference at temperature
  0) and the part after it must continue rather than restart, with token
  counts adding up;
- the client-visible stall of each affected stream: the gap between its last
  chunk before the fault and its first chunk after;
- the time until the dead node left placement on every replica.

``node_kill_saturated`` is the hard case: every slot of the fleet busy (one
session per slot) with replies of several hundred tokens when a node is
killed. Its replies can only restart at once on the survivors' reserved
continuation slots (``--continuation-slots``, default 1 per model).
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from bench import report
from edgefleet.client import FleetClient
from edgefleet.local.etcd_server import EtcdCluster
from edgefleet.local.processes import free_port, start_coordinator, start_node

PROMPT = "Write a very long story."
MAX_TOKENS = 120
SATURATED_MAX_TOKENS = 400  # "replies of several hundred tokens"
STALL_TIMEOUT_S = 1.0
NODES = 3
SLOTS = 2
KINDS = ("node_kill", "node_kill_saturated", "node_sigstop", "coordinator_kill")


class Stream:
    def __init__(self, client: FleetClient, session_id: str, max_tokens: int) -> None:
        self.session_id = session_id
        self.max_tokens = max_tokens
        self.chunks: list[tuple[float, object]] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(client,), daemon=True)
        self._thread.start()

    def _run(self, client: FleetClient) -> None:
        try:
            for chunk in client.chat(
                self.session_id, PROMPT, max_tokens=self.max_tokens, temperature=0
            ):
                self.chunks.append((time.monotonic(), chunk))
        except BaseException as error:
            self.error = error
        finally:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(c.text for _, c in self.chunks)

    def parts(self) -> list[list]:
        """Text chunks split where the node changed or the turn resumed elsewhere."""
        parts: list[list] = []
        node = None
        for index, (_, chunk) in enumerate(self.chunks):
            if (index > 0 and chunk.turn_id) or (chunk.node_id and chunk.node_id != node):
                node = chunk.node_id or node
                parts.append([])
            if chunk.text:
                if not parts:
                    parts.append([])
                parts[-1].append(chunk)
        return [p for p in parts if p]

    def stall_around(self, fault_at: float) -> float | None:
        before = [t for t, c in self.chunks if c.text and t <= fault_at]
        after = [t for t, c in self.chunks if c.text and t > fault_at]
        if not before or not after or len(self.parts()) < 2:
            return None
        return after[0] - before[-1]


def check_reply(stream: Stream, reference: str) -> bool:
    """True when nothing was lost or repeated (see the module doc)."""
    parts = stream.parts()
    if not parts:
        return False
    last = stream.chunks[-1][1]
    counted = sum(c.token_count for part in parts for c in part)
    if last.usage.completion_tokens != counted:
        return False
    before = "".join(c.text for c in parts[0])
    if not reference.startswith(before):
        return False
    if len(parts) > 1:
        after = "".join(c.text for part in parts[1:] for c in part)
        if not after or after.lstrip().startswith(reference.lstrip()[:24]):
            return False
    return True


class BenchFleet:
    def __init__(self, workdir: Path, nodes: int) -> None:
        self.workdir = workdir
        self.etcd = EtcdCluster(1, base_dir=workdir / "etcd").start()
        self.coordinators = [self._coordinator(i) for i in range(2)]
        for coordinator in self.coordinators:
            coordinator.wait_serving(60)
        self.nodes = {f"node-{i}": self._node(f"node-{i}") for i in range(1, nodes + 1)}
        for node in self.nodes.values():
            node.wait_serving(120)
        self.wait_ready(nodes)

    @property
    def addresses(self) -> list[str]:
        return [c.address for c in self.coordinators if c.alive()]

    def _coordinator(self, index: int):
        return start_coordinator(
            grpc_address=f"127.0.0.1:{free_port()}",
            etcd=self.etcd.endpoints,
            extra_args=(
                "--id",
                f"coord-{index}-{int(time.time())}",
                "--stall-timeout",
                str(STALL_TIMEOUT_S),
            ),
            log_path=self.workdir / f"coordinator-{index}.log",
        )

    def _node(self, node_id: str):
        live = self.addresses
        return start_node(
            listen=f"127.0.0.1:{free_port()}",
            models="smollm2-135m",
            slots=SLOTS,
            extra_args=("--coordinator", ",".join(live), "--node-id", node_id, "--threads", "1"),
            log_path=self.workdir / f"{node_id}.log",
            name=node_id,
        )

    def ready_nodes(self, address: str) -> set[str]:
        with FleetClient([address], timeout_s=5) as client:
            return {n.node_id for n in client.status().nodes if n.state == 2}

    def wait_ready(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(len(self.ready_nodes(a)) == count for a in self.addresses):
                return
            time.sleep(0.1)
        raise TimeoutError(f"fleet did not reach {count} ready nodes")

    def replace_node(self, node_id: str) -> None:
        old = self.nodes[node_id]
        if old.alive():
            old.kill()
        self.nodes[node_id] = self._node(node_id)
        self.nodes[node_id].wait_serving(120)

    def replace_coordinator(self, index: int) -> None:
        self.coordinators[index].kill()
        self.coordinators[index] = self._coordinator(index)
        self.coordinators[index].wait_serving(60)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.terminate(10)
        for coordinator in self.coordinators:
            coordinator.terminate(10)
        self.etcd.stop()


def run_round(fleet: BenchFleet, kind: str, sessions: int, reference: str, max_tokens: int) -> dict:
    client = FleetClient(fleet.addresses)
    ids = [client.create_session("smollm2-135m").session_id for _ in range(sessions)]
    streams = [Stream(client, sid, max_tokens) for sid in ids]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
        len(s.text) > 30 or s.done.is_set() for s in streams
    ):
        time.sleep(0.01)
    serving: dict[str, int] = {}
    for stream in streams:
        nodes = [c.node_id for _, c in stream.chunks if c.node_id]
        if nodes and not stream.done.is_set():
            serving[nodes[-1]] = serving.get(nodes[-1], 0) + 1
    left_placement_s = None
    victim_id = ""
    if kind == "coordinator_kill":
        victim = fleet.coordinators[0]
        fault_at = time.monotonic()
        victim.kill()
    else:
        victim_id = max(serving, key=serving.get)
        victim = fleet.nodes[victim_id]
        fault_at = time.monotonic()
        if kind.startswith("node_kill"):
            victim.kill()
        else:
            os.kill(victim.pid, signal.SIGSTOP)
        watchers = [c.address for c in fleet.coordinators]
        while time.monotonic() - fault_at < 30:
            if all(victim_id not in fleet.ready_nodes(a) for a in watchers):
                left_placement_s = time.monotonic() - fault_at
                break
            time.sleep(0.02)
    for stream in streams:
        stream.done.wait(300)
    if kind == "node_sigstop":
        os.kill(victim.pid, signal.SIGCONT)
    completed = [
        s
        for s in streams
        if s.error is None
        and s.chunks
        and s.chunks[-1][1].finish_reason
        and s.chunks[-1][1].usage.completion_tokens == max_tokens
    ]
    stored_once = 0
    for stream in completed:
        session = client.get_session(stream.session_id)
        if [(m.role, m.content) for m in session.messages] == [
            ("user", PROMPT),
            ("assistant", stream.text),
        ]:
            stored_once += 1
    stalls = [x for s in completed if (x := s.stall_around(fault_at)) is not None]
    client.close()
    return {
        "kind": kind,
        "victim": victim_id,
        "started": len(streams),
        "busy_slots": sum(serving.values()),
        "completed": len(completed),
        "turns_lost": len(completed) - stored_once + (len(streams) - len(completed)),
        "bad_replies": sum(not check_reply(s, reference) for s in completed),
        "affected_streams": len(stalls),
        "stalls_s": stalls,
        "left_placement_s": left_placement_s,
        "errors": [repr(s.error) for s in streams if s.error is not None],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per fault kind")
    # Default load: 4 sessions on 3 nodes x 2 slots, the fleet sized N+1 so the
    # survivors of one node have room; node_kill_saturated always fills every slot.
    parser.add_argument("--sessions", type=int, default=4, help="concurrent sessions per round")
    parser.add_argument("--full", action="store_true", help="5 rounds per fault kind")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"fault kinds to run, of {','.join(KINDS)}"
    )
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    if args.full:
        args.rounds = 5
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-failover-"))
    fleet = BenchFleet(workdir, nodes=NODES)
    rounds: list[dict] = []
    try:
        with FleetClient(fleet.addresses) as client:
            references = {
                tokens: "".join(
                    c.text
                    for c in client.complete(
                        "smollm2-135m", [("user", PROMPT)], max_tokens=tokens, temperature=0
                    )
                )
                for tokens in (MAX_TOKENS, SATURATED_MAX_TOKENS)
            }
        for kind in kinds:
            saturated = kind == "node_kill_saturated"
            sessions = NODES * SLOTS if saturated else args.sessions
            max_tokens = SATURATED_MAX_TOKENS if saturated else MAX_TOKENS
            for number in range(args.rounds):
                result = run_round(fleet, kind, sessions, references[max_tokens], max_tokens)
                rounds.append(result)
                print(
                    f"{kind} round {number + 1}: {result['completed']}/{result['started']} "
                    f"completed, {result['affected_streams']} failed over, stall max "
                    f"{max(result['stalls_s'], default=0):.2f}s, left placement "
                    f"{result['left_placement_s']}",
                    flush=True,
                )
                # A clean fleet for the next round: replace what the fault hit.
                if kind == "coordinator_kill":
                    fleet.replace_coordinator(0)
                else:
                    fleet.replace_node(result["victim"])
                fleet.wait_ready(len(fleet.nodes))
    finally:
        fleet.stop()
    summary = {}
    for kind in kinds:
        mine = [r for r in rounds if r["kind"] == kind]
        stalls = [s for r in mine for s in r["stalls_s"]]
        left = [r["left_placement_s"] for r in mine if r["left_placement_s"] is not None]
        summary[kind] = {
            "sessions_completed": sum(r["completed"] for r in mine),
            "sessions_started": sum(r["started"] for r in mine),
            "turns_lost": sum(r["turns_lost"] for r in mine),
            "bad_replies": sum(r["bad_replies"] for r in mine),
            "failed_over_streams": len(stalls),
            "stall_p50_s": report.percentile(stalls, 50),
            "stall_p99_s": report.percentile(stalls, 99),
            "left_placement_max_s": max(left) if left else None,
        }
    result = {
        "settings": {
            **vars(args),
            "max_tokens": MAX_TOKENS,
            "saturated_max_tokens": SATURATED_MAX_TOKENS,
            "saturated_sessions": NODES * SLOTS,
            "stall_timeout_s": STALL_TIMEOUT_S,
            "nodes": NODES,
            "slots_per_node": SLOTS,
            "coordinators": 2,
        },
        "summary": summary,
        "rounds": rounds,
    }
    out = report.write("failover", result)
    print(
        report.table(
            [
                "fault",
                "completed",
                "turns lost",
                "bad replies",
                "failed over",
                "stall p50 s",
                "stall p99 s",
                "left placement s (max)",
            ],
            [
                [
                    kind,
                    f"{s['sessions_completed']}/{s['sessions_started']}",
                    s["turns_lost"],
                    s["bad_replies"],
                    s["failed_over_streams"],
                    s["stall_p50_s"],
                    s["stall_p99_s"],
                    "n/a" if s["left_placement_max_s"] is None else s["left_placement_max_s"],
                ]
                for kind, s in summary.items()
            ],
        )
    )
    print(
        "targets: 100% completed, 0 turns lost, 0 bad replies, node_kill and "
        "node_kill_saturated stall p99 < 1 s, left placement < 3 s"
    )
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
