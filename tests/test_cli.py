"""The README's main job, end to end through the CLI."""

import subprocess

from edgefleet.processes import edgefleet_command


def test_demo_starts_a_node_streams_an_answer_and_stops_it(default_model_path):
    result = subprocess.run(
        edgefleet_command("demo", "Name a fruit.", "--max-tokens", "24"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    answer = lines[lines.index(next(line for line in lines if line.startswith("node ready"))) + 2]
    assert answer.strip(), result.stdout
    assert "completion=" in result.stderr
    assert "node stopped (exit code 0)" in result.stdout
