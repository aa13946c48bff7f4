"""The rooms of the code stay apart (README, "Architecture"): checked on the
source itself, in milliseconds. ruff bans the etcd client outside
coordinator/etcd.py (TID251); the rules ruff cannot express live here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ERROR_CLASSES = {
    "EdgefleetError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "ResourceExhausted",
    "Unavailable",
    "Aborted",
}
# Coordinator modules that speak to clients or nodes: no storage in them.
COORDINATOR_TRANSPORT = [
    "coordinator/service.py",
    "coordinator/openai_api.py",
    "coordinator/openai_common.py",
    "coordinator/responses_api.py",
    "coordinator/http_app.py",
    "coordinator/turns.py",
]


def modules(*folders: str) -> list[Path]:
    found = []
    for folder in folders:
        found += [p for p in (ROOT / folder).rglob("*.py") if "/v1/" not in p.as_posix()]
    return sorted(found)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imports_any(path: Path, *prefixes: str) -> list[str]:
    return sorted(
        name
        for name in imported(path)
        if any(name == p or name.startswith(p + ".") for p in prefixes)
    )


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("name", COORDINATOR_TRANSPORT)
def test_coordinator_transport_and_use_cases_do_not_touch_etcd(name):
    assert imports_any(ROOT / name, "coordinator.etcd", "coordinator.keys", "etcd3aio") == []


def test_the_shared_package_imports_neither_daemon():
    shared = [
        p
        for p in modules("edgefleet")
        if not rel(p).startswith(("edgefleet/cli/", "edgefleet/local/"))
        and rel(p) != "edgefleet/__main__.py"  # `python -m edgefleet`: the CLI entry point
    ]
    assert shared, "no shared modules found"
    offenders = {
        rel(p): imports_any(p, "coordinator", "node_agent", "edgefleet.cli", "edgefleet.local")
        for p in shared
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_nothing_imports_the_cli():
    offenders = [
        rel(p)
        for p in modules("edgefleet", "coordinator", "node_agent", "bench")
        if not rel(p).startswith("edgefleet/cli/")
        and rel(p) != "edgefleet/__main__.py"
        and imports_any(p, "edgefleet.cli")
    ]
    assert offenders == []


def test_the_daemons_do_not_import_each_other():
    assert [rel(p) for p in modules("coordinator") if imports_any(p, "node_agent")] == []
    assert [rel(p) for p in modules("node_agent") if imports_any(p, "coordinator")] == []


def _is_message_text(node: ast.AST) -> bool:
    """``x.message``, ``x.details()``, ``str(x)``: the words of an error."""
    if isinstance(node, ast.Attribute) and node.attr == "message":
        return True
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "details":
            return True
        if isinstance(func, ast.Name) and func.id == "str":
            return True
    if isinstance(node, ast.BoolOp):
        return any(_is_message_text(value) for value in node.values)
    return False


def test_no_decision_reads_error_message_text():
    """Decisions read named reasons; ``"..." in error.message`` is how they drift."""
    offenders = []
    for path in modules("coordinator", "node_agent", "edgefleet"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.In | ast.NotIn) for op in node.ops
            ):
                if any(_is_message_text(part) for part in node.comparators):
                    offenders.append(f"{rel(path)}:{node.lineno}")
    assert offenders == []


def test_every_error_raised_by_the_daemons_names_its_reason():
    offenders = []
    for path in modules("coordinator", "node_agent", "edgefleet"):
        if rel(path) == "edgefleet/errors.py":
            continue  # where the classes and the generic fallbacks are declared
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ERROR_CLASSES
                and not any(keyword.arg == "reason" for keyword in node.keywords)
            ):
                offenders.append(f"{rel(path)}:{node.lineno} {node.func.id}")
    assert offenders == []
