"""``python -m bench [SCENARIO] [--full]``: run benchmark scenarios."""

from __future__ import annotations

import sys

from bench import (
    balancing,
    control_plane,
    failover,
    fleet_placement,
    node_single_stream,
    tracing_overhead,
)

SCENARIOS = {
    "node-single": node_single_stream.main,
    "fleet-placement": fleet_placement.main,
    "failover": failover.main,
    "tracing-overhead": tracing_overhead.main,
    "control-plane": control_plane.main,
    "balancing": balancing.main,
}


def main(argv: list[str]) -> int:
    # Leading names pick scenarios; everything from the first flag on is theirs.
    first_flag = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names, flags = argv[:first_flag], argv[first_flag:]
    selected = names or list(SCENARIOS)
    unknown = [n for n in selected if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    for name in selected:
        print(f"== scenario {name}", flush=True)
        SCENARIOS[name](flags)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
