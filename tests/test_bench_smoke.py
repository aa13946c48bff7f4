"""The benchmark suite runs end to end (tiny size) and writes its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SUITE = ("node-single", "node-concurrency", "fleet-overhead", "control-plane", "balancing")


@pytest.mark.timeout(900)
def test_bench_suite_smoke_writes_json_chart_and_table(tmp_path, default_model_path):
    env = {**os.environ, "EDGEFLEET_BENCH_DIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for scenario in SUITE:
        document = json.loads((tmp_path / f"{scenario}-latest.json").read_text())
        assert document["machine"]["cores"] >= 1
        assert document["targets"], f"{scenario} judged no target"
        assert all(isinstance(t["met"], bool) for t in document["targets"])
    summary = json.loads((tmp_path / "suite-latest.json").read_text())
    assert set(summary["scenarios"]) == set(SUITE)
    chart = tmp_path / os.path.basename(summary["chart"])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The simulated scenarios say so, in their results and on screen.
    assert (
        json.loads((tmp_path / "control-plane-latest.json").read_text())["runtime"] == "simulated"
    )
    assert "SIMULATED" in run.stdout
    assert "== targets" in run.stdout
