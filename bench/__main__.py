"""``python -m bench [SCENARIO ...] [--full] [scenario flags]``: run benchmarks.

With no scenario named, runs the suite (the five scenarios of the
performance issue), then writes one summary JSON and a PNG chart of the
results and prints every target with its verdict.
"""

from __future__ import annotations

import sys

from bench import (
    balancing,
    chart,
    control_plane,
    failover,
    fleet_overhead,
    fleet_placement,
    models,
    node_concurrency,
    node_single_stream,
    report,
    tracing_overhead,
)

SCENARIOS = {
    "node-single": node_single_stream.main,
    "node-concurrency": node_concurrency.main,
    "fleet-overhead": fleet_overhead.main,
    "control-plane": control_plane.main,
    "balancing": balancing.main,
    # Beyond the suite: run by name.
    "fleet-placement": fleet_placement.main,
    "failover": failover.main,
    "tracing-overhead": tracing_overhead.main,
    "models": models.main,
}
SUITE = ("node-single", "node-concurrency", "fleet-overhead", "control-plane", "balancing")


def main(argv: list[str]) -> int:
    # Leading names pick scenarios; everything from the first flag on is theirs.
    first_flag = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names, flags = argv[:first_flag], argv[first_flag:]
    selected = names or list(SUITE)
    unknown = [n for n in selected if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    results = {}
    for name in selected:
        print(f"== scenario {name}", flush=True)
        results[name] = SCENARIOS[name](flags)
    suite = {name: results[name] for name in selected if name in SUITE}
    if suite:
        png = chart.draw(suite)
        summary = report.write("suite", {"scenarios": suite, "chart": str(png)})
        print("\n== targets")
        report.print_targets([t for r in suite.values() for t in r.get("targets", [])])
        print(f"\nsummary: {summary}\nchart: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
