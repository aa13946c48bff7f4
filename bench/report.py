"""Writing benchmark results: one JSON file per run and a printed table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import psutil

RESULTS_DIR = Path(os.environ.get("EDGEFLEET_BENCH_DIR", "bench-results"))


def machine() -> dict:
    return {
        "cpu": _cpu_model(),
        "cores": psutil.cpu_count(logical=True),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def write(scenario: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = RESULTS_DIR / f"{scenario}-{stamp}.json"
    document = {"scenario": scenario, "machine": machine(), **payload}
    path.write_text(json.dumps(document, indent=2))
    (RESULTS_DIR / f"{scenario}-latest.json").write_text(json.dumps(document, indent=2))
    return path


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def target(name: str, value: float, op: str, bound: float) -> dict:
    """One target from the issue, judged on a measured value."""
    met = {"<": value < bound, "<=": value <= bound, ">=": value >= bound}[op]
    return {"name": name, "value": value, "op": op, "bound": bound, "met": bool(met)}


def print_targets(targets: list[dict]) -> None:
    for t in targets:
        verdict = "met" if t["met"] else "NOT met"
        print(f"target {t['name']} {t['op']} {t['bound']:g}: {_fmt(t['value'])} -> {verdict}")
