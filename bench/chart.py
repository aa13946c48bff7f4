"""One PNG with a panel per suite scenario (matplotlib, no display needed)."""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench import report


def draw(results: dict[str, dict]) -> Path:
    panels = [(name, DRAW[name]) for name in results if name in DRAW]
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4))
    axes = axes if len(panels) > 1 else [axes]
    for axis, (name, draw_panel) in zip(axes, panels, strict=False):
        draw_panel(axis, results[name])
        axis.set_title(name)
        axis.grid(alpha=0.3)
    figure.suptitle(f"edgefleet benchmarks — {report.machine()['cpu']}", fontsize=9)
    figure.tight_layout()
    report.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = report.RESULTS_DIR / f"suite-{time.strftime('%Y%m%dT%H%M%S')}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _node_single(axis, result):
    sides = list(result["summary"])
    axis.bar(sides, [result["summary"][s]["tokens_per_s"] for s in sides], color=["C0", "C1"])
    axis.set_ylabel("tokens/s (one stream)")


def _node_concurrency(axis, result):
    for name, by_level in result["summary"].items():
        levels = sorted(by_level, key=int)
        axis.plot(
            [int(lv) for lv in levels],
            [by_level[lv]["tokens_per_s"] for lv in levels],
            marker="o",
            label=name,
        )
    axis.set_xlabel("concurrent streams")
    axis.set_ylabel("aggregate tokens/s")
    axis.legend(fontsize=7)


def _fleet_overhead(axis, result):
    paths = list(result["summary"])
    p50 = [result["summary"][p]["ttft_ms_p50"] for p in paths]
    p99 = [result["summary"][p]["ttft_ms_p99"] for p in paths]
    xs = range(len(paths))
    axis.bar([x - 0.2 for x in xs], p50, width=0.4, label="TTFT p50")
    axis.bar([x + 0.2 for x in xs], p99, width=0.4, label="TTFT p99")
    axis.set_xticks(list(xs), [p.replace("coordinator ", "coord. ") for p in paths], fontsize=8)
    axis.set_ylabel("ms")
    axis.legend(fontsize=7)


def _control_plane(axis, result):
    labels = ["placement p50", "placement p99"]
    values = [result["placement_us"]["p50"], result["placement_us"]["p99"]]
    axis.bar(labels, values, color="C2")
    axis.set_ylabel("µs (SIMULATED nodes)")
    settings = result["settings"]
    axis.set_xlabel(f"{settings['nodes']} nodes, {settings['streams']} streams")


def _balancing(axis, result):
    policies = list(result["policies"])
    p50 = [result["policies"][p]["completion_s"]["p50"] for p in policies]
    p95 = [result["policies"][p]["completion_s"]["p95"] for p in policies]
    xs = range(len(policies))
    axis.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
    axis.bar([x + 0.2 for x in xs], p95, width=0.4, label="p95")
    axis.set_xticks(list(xs), policies, fontsize=8)
    axis.set_ylabel("completion s (SIMULATED nodes)")
    axis.legend(fontsize=7)


DRAW = {
    "node-single": _node_single,
    "node-concurrency": _node_concurrency,
    "fleet-overhead": _fleet_overhead,
    "control-plane": _control_plane,
    "balancing": _balancing,
}
