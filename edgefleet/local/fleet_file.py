"""``edgefleet up --config fleet.yaml``: a local fleet described in one file.

The shape (``examples/fleet.yaml`` is a commented example)::

    insecure: false                 # optional; true = `edgefleet up --insecure`
    coordinator:                    # any key of coordinator.yaml (its flags)
      grpc: 127.0.0.1:50051
      http: 127.0.0.1:8080
    coordination:
      load_balancing: scored        # placement policy: scored, least_loaded, round_robin
      failover:
        enabled: true               # false: a reply is never moved to another node
        max_failovers: 2            # moves per reply
        stall_timeout: 2            # seconds without a token before a reply moves
        first_token_timeout: 30     # seconds a node may take to its first token
        node_lease_ttl: 3           # seconds without heartbeat before a node leaves
        heartbeat_interval: 1
    nodes:                          # a list, or a count (`nodes: 3`)
      - id: shop-1                  # default node-N
        models: [smollm2-135m]      # default: `up --model`
        slots: 2                    # default: `up --slots`
        labels: {site: shop}        # carried by the node's join token
        threads: 1                  # ... any other key of node.yaml (its flags)

Keys are flag names (dashes or underscores); every value is checked against
the flag it stands for before anything starts. The addresses, certificates
and tokens that wire the fleet together are ``up``'s own (refused here).
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.config_file import ConfigError, convert, convert_all, normal_key, read

MAX_NODES = 64
MAX_LABELS = 32  # what a join token may carry
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TOP_KEYS = ("version", "insecure", "coordinator", "coordination", "nodes")
COORDINATION_KEYS = ("load-balancing", "failover")
FAILOVER_KEYS = {
    "enabled": None,
    "max-failovers": "max-failovers",
    "max-attempts": "max-failovers",
    "stall-timeout": "stall-timeout",
    "first-token-timeout": "first-token-timeout",
    "node-lease-ttl": "node-lease-ttl",
    "heartbeat-interval": "heartbeat-interval",
}
NODE_KEYS_OF_UP = {
    "coordinator": "up points every node at its coordinator",
    "join": "up makes the join tokens",
    "state-dir": "up keeps each node's identity in its own logs directory",
    "insecure": "set `insecure` at the top of the file",
    "node-id": "write `id`",
    "config": "this file is the config",
}
COORDINATOR_KEYS_OF_UP = {
    "etcd": "up runs its own etcd",
    "etcd-prefix": "up runs its own etcd",
    "state-dir": "up keeps the coordinator's state in its logs directory",
    "node-grpc": "up chooses the node port",
    "insecure": "set `insecure` at the top of the file",
    "config": "this file is the config",
}


@dataclass
class NodeSpec:
    node_id: str
    labels: dict[str, str] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)  # node.yaml keys


@dataclass
class FleetSpec:
    nodes: list[NodeSpec]
    coordinator: dict[str, object] = field(default_factory=dict)  # coordinator.yaml keys
    insecure: bool = False

    @classmethod
    def plain(cls, nodes: int) -> FleetSpec:
        return cls(nodes=[NodeSpec(f"node-{i}") for i in range(1, nodes + 1)])


def load(
    path: Path | str,
    *,
    node_options: Mapping[str, argparse.Action],
    coordinator_options: Mapping[str, argparse.Action],
) -> FleetSpec:
    """The fleet in ``path``, every key checked; a ConfigError names the first mistake."""
    data = read(path)
    source = str(path)
    top, _ = _keys(data, TOP_KEYS, source)
    if "version" in top and top["version"] != 1:
        raise ConfigError(f"{source}: version: only version 1 exists, got {top['version']!r}")
    insecure = top.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"{source}: insecure: expected true or false, got {insecure!r}")
    coordinator = _coordinator(top, coordinator_options, source)
    nodes = _nodes(top.get("nodes", 2), node_options, source)
    if insecure and any(node.labels for node in nodes):
        raise ConfigError(
            f"{source}: labels need a secure fleet (a node's labels come from its join "
            "token): remove `insecure: true` or the labels"
        )
    return FleetSpec(nodes=nodes, coordinator=coordinator, insecure=insecure)


def _keys(data: object, allowed, source: str) -> tuple[dict[str, object], dict[str, str]]:
    """``data`` (a mapping) with normalised keys, each one of ``allowed``; and
    each key as the file spells it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {data!r}")
    found: dict[str, object] = {}
    spelled: dict[str, str] = {}
    for key, value in data.items():
        name = normal_key(key) if isinstance(key, str) else None
        if name not in allowed:
            hint = difflib.get_close_matches(str(key).replace("_", "-"), allowed, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{source}: unknown key '{key}'{suggestion}")
        if name in found:
            raise ConfigError(f"{source}: '{key}' is given twice")
        found[name] = value
        spelled[name] = str(key)
    return found, spelled


def _refuse(values: Mapping[str, object], refused: Mapping[str, str], source: str) -> None:
    for name in values:
        if name in refused:
            raise ConfigError(f"{source}: {name}: set by edgefleet up ({refused[name]})")


def _coordinator(
    top: Mapping[str, object], known: Mapping[str, argparse.Action], source: str
) -> dict[str, object]:
    section = top.get("coordinator") or {}
    where = f"{source}: coordinator"
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping of coordinator keys, got {section!r}")
    values = convert_all(known, section, where)
    _refuse(values, COORDINATOR_KEYS_OF_UP, where)
    coordination = top.get("coordination") or {}
    where = f"{source}: coordination"
    parts, spelled = _keys(coordination, COORDINATION_KEYS, where)
    if "load-balancing" in parts:
        if "policy" in values:
            raise ConfigError(
                f"{where}: load_balancing and coordinator.policy both say the policy: keep one"
            )
        values["policy"] = convert(
            known["policy"], spelled["load-balancing"], parts["load-balancing"], where
        )
    failover = parts.get("failover") or {}
    where = f"{where}.failover"
    settings, spelled = _keys(failover, tuple(FAILOVER_KEYS), where)
    for name, value in settings.items():
        flag = FAILOVER_KEYS[name]
        if flag is None:
            continue
        if flag in values:
            raise ConfigError(f"{where}: {spelled[name]} is also set under coordinator: keep one")
        values[flag] = convert(known[flag], spelled[name], value, where)
    if "max-failovers" in settings and "max-attempts" in settings:
        raise ConfigError(f"{where}: max_failovers and max_attempts are one setting: keep one")
    if "enabled" in settings:
        enabled = settings["enabled"]
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}: enabled: expected true or false, got {enabled!r}")
        if not enabled:
            if values.get("max-failovers", 0) != 0:
                raise ConfigError(f"{where}: enabled is false but max_failovers is not 0")
            values["max-failovers"] = 0
    return values


def _nodes(entries: object, known: Mapping[str, argparse.Action], source: str) -> list[NodeSpec]:
    if isinstance(entries, int) and not isinstance(entries, bool):
        entries = [{} for _ in range(entries)]
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: nodes: expected a list of nodes or a count, got {entries!r}")
    if not 1 <= len(entries) <= MAX_NODES:
        raise ConfigError(f"{source}: nodes: a local fleet has 1 to {MAX_NODES} nodes")
    nodes, seen = [], set()
    for index, entry in enumerate(entries, start=1):
        where = f"{source}: nodes[{index}]"
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping (id, models, ...), got {entry!r}")
        entry = dict(entry)
        node_id = _pop(entry, "id", f"node-{index}")
        if not isinstance(node_id, (str, int)) or isinstance(node_id, bool):
            raise ConfigError(f"{where}: id: expected a name, got {node_id!r}")
        node_id = str(node_id)
        if not NODE_ID.fullmatch(node_id):
            raise ConfigError(
                f"{where}: id: 1-128 of letters, digits, '.', '_' and '-', starting with a "
                f"letter or digit; got {node_id!r}"
            )
        if node_id in seen:
            raise ConfigError(f"{where}: id: {node_id!r} is used by an earlier node")
        seen.add(node_id)
        where = f"{source}: nodes[{index}] ({node_id})"
        labels = _labels(_pop(entry, "labels", {}), where)
        settings = convert_all(known, entry, where)
        _refuse(settings, NODE_KEYS_OF_UP, where)
        nodes.append(NodeSpec(node_id=node_id, labels=labels, settings=settings))
    return nodes


def _pop(entry: dict, name: str, default: object) -> object:
    for key in list(entry):
        if isinstance(key, str) and normal_key(key) == name:
            return entry.pop(key)
    return default


def _labels(labels: object, where: str) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise ConfigError(
            f"{where}: labels: expected a mapping like {{site: shop}}, got {labels!r}"
        )
    if len(labels) > MAX_LABELS:
        raise ConfigError(f"{where}: labels: at most {MAX_LABELS}")
    found = {}
    for key, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: labels: {key}: expected text, got {value!r} (quote it)")
        if not isinstance(key, str) or not key or len(key) > 128 or len(str(value)) > 128:
            raise ConfigError(f"{where}: labels: keys and values are 1-128 characters of text")
        found[key] = str(value)
    return found
