"""Install (or upgrade) an edgefleet node from an offline bundle.

Run through the bundle's ``install.sh`` (which picks a Python matching the
manifest); standard library only, no network: every wheel is installed with
``pip --no-index`` from the bundle itself.

    sudo ./install.sh --join TOKEN --coordinator HOST:PORT
    ./install.sh --join TOKEN --coordinator HOST:PORT --prefix ~/ef --state-dir ~/ef/state \
        --no-systemd

Every input is checked before anything is touched (arch, Python, the sha256
of every file, root, the token's shape, the coordinator answering on TCP, the
directories being writable); a bad one stops the install with one line
``error: ...`` and exit 1. The Python environment is built in a new release
folder (``PREFIX/releases/VERSION-TIME``) and goes live by swapping the
``PREFIX/venv`` symlink; a failure removes everything this run created.

Run again on an installed node it upgrades: the new release is built while
the node still serves, then the node is stopped (SIGTERM: it leaves the
fleet at once, so the coordinator places nothing new on it; in-flight streams
get its shutdown grace to finish, the rest are failed over by the
coordinator with the text already sent), the symlink swapped, the node
started again (it registers afresh, not draining) and the old release
removed. If the new node does not come up, the old release is put back.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MANIFEST = "manifest.json"
UNIT_NAME = "edgefleet-node.service"
DEFAULT_PREFIX = "/opt/edgefleet"
DEFAULT_STATE_DIR = "/var/lib/edgefleet"
DEFAULT_CONFIG = "/etc/edgefleet/node.yaml"
DEFAULT_ENV_FILE = "/etc/edgefleet/node.env"
DEFAULT_LISTEN = "0.0.0.0:50061"
DEFAULT_USER = "edgefleet"
INSTALL_RECORD = "install.json"
IDENTITY_FILE = "identity.json"  # node_agent.identity: a node that has joined
READY_LINE = "edgefleet node ready"
OWN_STATE = {"node", "models", "node.log", "node.pid"}
TOKEN = re.compile(r"EF1\.[0-9a-f]{32}\.[A-Za-z0-9]+\.[A-Za-z0-9_\-]+")
ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}
LIBRARY_PACKAGES = {"libgomp.so.1": "libgomp1", "libstdc++.so.6": "libstdc++6"}
CHUNK = 1 << 20


class Refused(Exception):
    """A bad input or a failed step: one line for the operator, exit 1."""


def say(message: str) -> None:
    print(f"[install] {message}", flush=True)


# --- inputs ---------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="install.sh",
        description="Install or upgrade an edgefleet node from this offline bundle.",
    )
    p.add_argument("--join", default="", metavar="TOKEN", help="join token (a new node)")
    p.add_argument(
        "--coordinator", default="", help="coordinator client address(es) host:port[,...]"
    )
    p.add_argument("--prefix", default="", help=f"install here (default {DEFAULT_PREFIX})")
    p.add_argument(
        "--state-dir",
        default="",
        help=f"node identity and model store (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument(
        "--config",
        default="",
        help=f"node config file to write (default {DEFAULT_CONFIG}; PREFIX/etc/node.yaml "
        "with --prefix)",
    )
    p.add_argument("--models", default="", help="aliases to serve (default: all in the bundle)")
    p.add_argument("--listen", default="", help=f"node gRPC address (default {DEFAULT_LISTEN})")
    p.add_argument(
        "--advertise",
        default="",
        help="address coordinators reach the node at (default: this device's address "
        "towards the coordinator, with the --listen port)",
    )
    p.add_argument("--node-id", default="", help="the node's name (default hostname-port)")
    p.add_argument(
        "--user", default="", help=f"system user the node runs as (root: {DEFAULT_USER})"
    )
    p.add_argument(
        "--no-systemd",
        action="store_true",
        help="install no service (then no root is needed); prints how to start the node",
    )
    p.add_argument(
        "--no-probe",
        action="store_true",
        help="do not check that the coordinator answers (pre-loading a device offline)",
    )
    p.add_argument(
        "--check", action="store_true", help="check the bundle and the inputs; change nothing"
    )
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=90.0,
        help="upgrade: seconds the old node gets to drain and stop",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=180.0,
        help="seconds the (re)started node gets to report ready",
    )
    p.add_argument("--python", default="", help=argparse.SUPPRESS)  # install.sh's
    return p.parse_args(argv)


def machine_arch() -> str:
    arch = platform.machine().lower()
    return ARCH_ALIASES.get(arch, arch)


def host_port(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Refused(f"{flag}: expected host:port, got {value!r}")
    return host, int(port)


def writable(path: Path) -> bool:
    """Whether this process can create or write ``path`` (a folder)."""
    probe = path
    while not os.path.lexists(probe):  # os.path: False, not an error, where access is denied
        if probe.parent == probe:
            return False
        probe = probe.parent
    return os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class Plan:
    """Everything the install needs, checked; nothing on disk is changed yet."""

    def __init__(self, args: argparse.Namespace, bundle: Path) -> None:
        self.args = args
        self.bundle = bundle
        self.manifest = self._manifest()
        self.version = self.manifest["version"]
        self.root = os.geteuid() == 0
        self.prefix = Path(args.prefix or DEFAULT_PREFIX).expanduser().absolute()
        self.previous = self._previous()
        prev = self.previous.get("settings", {})
        self.upgrade = bool(self.previous)
        # An upgrade keeps the first install's choice unless told --no-systemd now.
        self.systemd = not args.no_systemd and bool(prev.get("systemd", True))
        self.state_dir = Path(
            args.state_dir or prev.get("state_dir") or DEFAULT_STATE_DIR
        ).absolute()
        default_config = str(self.prefix / "etc" / "node.yaml") if args.prefix else DEFAULT_CONFIG
        self.config = Path(args.config or prev.get("config") or default_config).absolute()
        self.env_file = self.config.with_name("node.env")
        self.node_state = self.state_dir / "node"
        self.model_dir = self.state_dir / "models"
        self.listen = args.listen or prev.get("listen") or DEFAULT_LISTEN
        self.coordinator = args.coordinator or prev.get("coordinator", "")
        self.token = args.join.strip()
        self.node_id = args.node_id or prev.get("node_id", "")
        self.advertise = args.advertise or prev.get("advertise", "")
        self.user = (
            args.user
            or prev.get("user")
            or (DEFAULT_USER if self.root else pwd.getpwuid(os.geteuid()).pw_name)
        )
        self.joined = os.path.isfile(self.node_state / IDENTITY_FILE)
        bundled = [m["alias"] for m in self.manifest.get("models", [])]
        wanted = args.models or prev.get("models") or ",".join(bundled)
        self.models = [m.strip() for m in wanted.split(",") if m.strip()]
        self.model_files = {m["alias"]: m for m in self.manifest.get("models", [])}

    # Each check raises Refused with the one line the operator sees.
    def check(self) -> None:
        self._check_platform()
        self._check_files()
        self._check_libraries()
        self._check_privileges()
        self._check_token_and_coordinator()
        self._check_models_and_addresses()

    def _manifest(self) -> dict:
        try:
            manifest = json.loads((self.bundle / MANIFEST).read_text())
        except (OSError, ValueError) as error:
            raise Refused(f"cannot read {self.bundle / MANIFEST}: {error}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != 1:
            raise Refused(f"{self.bundle / MANIFEST} is not a format-1 edgefleet bundle manifest")
        return manifest

    def _previous(self) -> dict:
        record = self.prefix / INSTALL_RECORD
        if not os.path.isfile(record):
            return {}
        try:
            return json.loads(record.read_text())
        except (OSError, ValueError) as error:
            raise Refused(f"cannot read the previous install's record {record}: {error}") from None

    def _check_platform(self) -> None:
        want, have = self.manifest["arch"], machine_arch()
        if want != have:
            raise Refused(
                f"this bundle is for {want}, this machine is {have}: build one with "
                f"`edgefleet bundle --arch {have}`"
            )
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        if self.manifest["python"] != version:
            raise Refused(
                f"this bundle is for Python {self.manifest['python']}, this Python "
                f"({sys.executable}) is {version}: build one on a machine with Python {version}"
            )

    def _check_files(self) -> None:
        files = self.manifest["files"]
        total = sum(f["size"] for f in files.values())
        say(f"verifying {len(files)} files ({total / 1e6:.0f} MB) against the manifest")
        for name, expected in sorted(files.items()):
            path = self.bundle / name
            if ".." in Path(name).parts or not path.is_file():
                raise Refused(f"bundle file missing: {name} (copy the whole bundle again)")
            if path.stat().st_size != expected["size"] or sha256_of(path) != expected["sha256"]:
                raise Refused(
                    f"bundle file corrupt: {name} does not match its sha256 in the manifest "
                    "(copy the bundle again)"
                )

    def _check_libraries(self) -> None:
        need = self.manifest.get("glibc", "")
        if need:
            try:
                have = (os.confstr("CS_GNU_LIBC_VERSION") or "").split()[-1]
            except (ValueError, OSError, IndexError):
                have = ""
            if not have:
                raise Refused(f"this bundle needs glibc {need} or newer; this system has no glibc")
            if tuple(map(int, have.split(".")[:2])) < tuple(map(int, need.split("."))):
                raise Refused(
                    f"this bundle needs glibc {need} or newer; this system has {have}: build "
                    "the bundle on a machine with an older system (its wheels ask for less)"
                )
        for library in self.manifest.get("system_libraries", []):
            try:
                ctypes.CDLL(library)
            except OSError:
                package = LIBRARY_PACKAGES.get(library)
                hint = f" (e.g. apt-get install {package})" if package else ""
                raise Refused(
                    f"the system library {library} is missing; llama.cpp needs it: install it{hint}"
                ) from None

    def _check_privileges(self) -> None:
        if self.systemd:
            if not self.root:
                raise Refused(
                    "installing the systemd service needs root: run it with sudo, or pass "
                    "--no-systemd (with a --prefix and --state-dir you can write)"
                )
            if not Path("/run/systemd/system").is_dir() or not shutil.which("systemctl"):
                raise Refused(
                    "systemd is not running on this machine: pass --no-systemd and start "
                    "the node yourself (install.sh prints how)"
                )
        places = [
            (self.prefix, "--prefix"),
            (self.state_dir, "--state-dir"),
            (self.config.parent, "--config"),
        ]
        for path, flag in places:
            if os.path.lexists(path) and not os.path.isdir(path):
                raise Refused(f"{flag} {path} exists and is not a folder")
            if not writable(path):
                if flag == "--state-dir":
                    what = f"state dir {path} is not writable"
                else:
                    what = f"cannot write to {path}"
                how = "run it with sudo" if not self.root else "check the file system"
                raise Refused(f"{what} (uid {os.geteuid()}): {how}, or choose another {flag}")
        for path in (self.node_state, self.model_dir):
            if os.path.lexists(path) and not os.access(path, os.W_OK | os.X_OK):
                raise Refused(f"state dir {path} is not writable (uid {os.geteuid()})")
        if self.root and not _user_exists(self.user):
            if not (shutil.which("useradd") or shutil.which("adduser")):
                raise Refused(f"user {self.user} does not exist and there is no useradd to make it")
        if not self.root and self.user != pwd.getpwuid(os.geteuid()).pw_name:
            raise Refused(f"--user {self.user}: only root can run the node as another user")

    def _check_token_and_coordinator(self) -> None:
        if self.token and (len(self.token) > 256 or not TOKEN.fullmatch(self.token)):
            raise Refused("--join: that is not a join token (EF1.<32 hex>.<id>.<secret>)")
        if not self.joined and not self.token:
            raise Refused(
                "--join TOKEN is required: this device has no fleet identity yet "
                "(make a token with `edgefleet token create`)"
            )
        if not self.coordinator:
            raise Refused("--coordinator HOST:PORT is required (the coordinator's client port)")
        targets = [host_port(a, "--coordinator") for a in self.coordinator.split(",") if a.strip()]
        if not targets:
            raise Refused("--coordinator HOST:PORT is required (the coordinator's client port)")
        self.local_address = ""
        if self.args.no_probe:
            with (
                contextlib.suppress(OSError),
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
            ):
                u.connect(targets[0])  # picks the route; sends nothing
                self.local_address = u.getsockname()[0]
            return
        problems = []
        for host, port in targets:
            try:
                with socket.create_connection((host, port), timeout=5) as probe:
                    self.local_address = probe.getsockname()[0]
                    return
            except OSError as error:
                problems.append(f"{host}:{port} ({error.strerror or error})")
        raise Refused(
            f"cannot reach the coordinator at {', '.join(problems)}: check the address and "
            "the network, or pass --no-probe to install now and join later"
        )

    def _check_models_and_addresses(self) -> None:
        missing = [m for m in self.models if m not in self.model_files]
        if missing:
            have = ", ".join(self.model_files) or "none"
            raise Refused(f"--models: {', '.join(missing)} not in this bundle (it has: {have})")
        if not self.models:
            raise Refused("no models to serve: this bundle has none and --models names none")
        host_port(self.listen, "--listen")
        if self.advertise:
            host_port(self.advertise, "--advertise")
        for value in (self.token, self.coordinator, self.listen, self.advertise, self.node_id):
            if any(c.isspace() or c in "\"'\\$`" for c in value):
                raise Refused(f"{value!r}: no spaces, quotes or shell characters, please")

    def advertised(self) -> str:
        if self.advertise:
            return self.advertise
        host, port = host_port(self.listen, "--listen")
        if host not in ("0.0.0.0", "::") or not self.local_address:
            return ""  # the node advertises its --listen address itself
        return f"{self.local_address}:{port}"


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


# --- the install ------------------------------------------------------------------------------
class Install:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.undo: list = []  # callables, run in reverse when a step fails
        self.stopped: list[dict] = []  # node processes stopped for an upgrade (no systemd)
        self.started_at = time.monotonic()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.release = plan.prefix / "releases" / f"{plan.version}-{stamp}-{os.getpid()}"
        self.venv = plan.prefix / "venv"
        self.old_release: Path | None = None
        # Upgrade: how to bring the old node back when a later step fails.
        self.restart_old = None
        if self.venv.is_symlink():
            self.old_release = (plan.prefix / os.readlink(self.venv)).resolve()

    def run(self) -> None:
        try:
            self._run()
        except BaseException:
            self._rollback()
            raise

    def _run(self) -> None:
        plan = self.plan
        what = "upgrading" if plan.upgrade else "installing"
        say(
            f"{what} edgefleet {plan.version} ({plan.manifest['arch']}, Python "
            f"{plan.manifest['python']}) into {plan.prefix}"
        )
        self._make_dir(plan.prefix, mode=0o755)
        self._make_dir(self.release.parent, mode=0o755)
        self._build_release()
        config_support = self._smoke_test()
        if plan.root:
            self._ensure_user()
        self._state_dirs()
        self._copy_models()
        self._write_config(config_support)
        unit = self._write_unit(config_support)
        if plan.upgrade:
            self._stop_node()
        self._switch(self.release)
        self._record()
        if plan.systemd:
            self._start_service()
        elif self.stopped:
            self._relaunch()
        if self.old_release and self.old_release != self.release and self.old_release.is_dir():
            shutil.rmtree(self.old_release, ignore_errors=True)
        self.undo.clear()
        took = time.monotonic() - self.started_at
        say(f"done in {took:.1f} s: edgefleet {plan.version} at {self.venv}")
        if not plan.systemd and not self.stopped:
            exec_start = _unit_value(unit, "ExecStart")
            say("no service installed (--no-systemd); start the node with:")
            print(f"  {exec_start}", flush=True)
            print(f"  (environment: {plan.env_file}; unit: {plan.prefix / 'systemd' / UNIT_NAME})")

    # -- steps ---------------------------------------------------------------------------------
    def _make_dir(self, path: Path, mode: int = 0o755) -> None:
        """Create ``path`` (and parents); what this run created is removed on failure."""
        missing = []
        probe = path
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for created in reversed(missing):
            created.mkdir(mode=mode)
            self.undo.append(lambda p=created: shutil.rmtree(p, ignore_errors=True))

    def _build_release(self) -> None:
        plan = self.plan
        self.release.mkdir(mode=0o755)
        self.undo.append(lambda: shutil.rmtree(self.release, ignore_errors=True))
        say("creating the Python environment")
        # The system's interpreter, even when install.sh found python3 in some virtualenv.
        python = getattr(sys, "_base_executable", "") or sys.executable
        _run([python, "-m", "venv", "--without-pip", str(self.release)], "python -m venv")
        wheels = sorted((plan.bundle / "wheels").glob("*.whl"))
        pip = next((w for w in wheels if w.name.startswith("pip-")), None)
        if pip is None:
            raise Refused("the bundle has no pip wheel (wheels/pip-*.whl)")
        size = sum(w.stat().st_size for w in wheels)
        say(f"installing {len(wheels)} wheels ({size / 1e6:.0f} MB) with pip --no-index")
        started = time.monotonic()
        env = dict(os.environ)
        env.update(
            PIP_NO_INDEX="1",
            PIP_CONFIG_FILE=os.devnull,
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            PIP_NO_CACHE_DIR="1",
            PYTHONNOUSERSITE="1",
        )
        _run(
            [
                str(self.release / "bin" / "python"),
                str(pip / "pip"),
                "install",
                "--no-index",
                "--no-deps",
                "--quiet",
                "--no-warn-script-location",
                *map(str, wheels),
            ],
            "pip install --no-index",
            env=env,
        )
        say(f"installed the wheels in {time.monotonic() - started:.1f} s")

    def _smoke_test(self) -> bool:
        """The new release imports what the node runs; whether it reads --config."""
        python = str(self.release / "bin" / "python")
        _run(
            [python, "-c", "import llama_cpp, grpc, node_agent.daemon"],
            "the new install cannot load the node",
        )
        out = _run([str(self.release / "bin" / "edgefleet"), "node", "--help"], "edgefleet node")
        return "--config" in out

    def _ensure_user(self) -> None:
        plan = self.plan
        if _user_exists(plan.user):
            return
        say(f"creating the system user {plan.user}")
        if shutil.which("useradd"):
            command = [
                "useradd", "--system", "--user-group", "--no-create-home",
                "--home-dir", str(plan.state_dir), "--shell", "/usr/sbin/nologin", plan.user,
            ]  # fmt: skip
        else:
            command = [
                "adduser", "--system", "--group", "--no-create-home",
                "--home", str(plan.state_dir), plan.user,
            ]  # fmt: skip
        _run(command, f"creating user {plan.user}")
        if shutil.which("userdel"):
            self.undo.append(lambda: subprocess.run(["userdel", plan.user], check=False))

    def _owner(self) -> tuple[int, int]:
        entry = pwd.getpwnam(self.plan.user)
        return entry.pw_uid, entry.pw_gid

    def _chown(self, path: Path) -> None:
        if self.plan.root:
            os.chown(path, *self._owner())

    def _state_dirs(self) -> None:
        plan = self.plan
        existed = plan.state_dir.exists()
        self._make_dir(plan.state_dir, mode=0o750)
        # The node owns its state dir: one this run made, or one holding only the node's.
        if not existed or set(os.listdir(plan.state_dir)) <= OWN_STATE:
            self._chown(plan.state_dir)
        for path in (plan.node_state, plan.model_dir):
            self._make_dir(path, mode=0o700 if path == plan.node_state else 0o750)
            self._chown(path)

    def _copy_models(self) -> None:
        plan = self.plan
        for alias in plan.models:
            entry = plan.model_files[alias]
            source = plan.bundle / entry["file"]
            target = plan.model_dir / alias / Path(entry["file"]).name
            if target.is_file() and sha256_of(target) == entry["sha256"]:
                say(f"model {alias}: already in the store")
                continue
            self._make_dir(target.parent, mode=0o750)
            self._chown(target.parent)
            say(f"model {alias}: copying {entry['size'] / 1e6:.0f} MB into {plan.model_dir}")
            partial = target.with_name(target.name + ".partial")
            shutil.copyfile(source, partial)
            self.undo.append(lambda p=partial: p.unlink(missing_ok=True))
            if sha256_of(partial) != entry["sha256"]:
                raise Refused(f"model {alias}: the copy in {partial} does not match its sha256")
            self._chown(partial)
            os.chmod(partial, 0o640)
            os.replace(partial, target)
            self.undo.append(lambda p=target: p.unlink(missing_ok=True))

    def _write_file(self, path: Path, text: str, mode: int, group_readable: bool) -> None:
        """Write ``path`` atomically; on failure the previous content comes back."""
        self._make_dir(path.parent, mode=0o755)
        old = path.read_bytes() if path.is_file() else None
        temporary = path.with_name(f".{path.name}.new")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        if self.plan.root and group_readable:
            os.chown(temporary, 0, self._owner()[1])
        os.chmod(temporary, mode)
        os.replace(temporary, path)
        if old is None:
            self.undo.append(lambda: path.unlink(missing_ok=True))
        else:
            self.undo.append(lambda: path.write_bytes(old))

    def _settings(self) -> dict[str, str]:
        """The node's flags (config-file keys) this install sets, but the token."""
        plan = self.plan
        values = {
            "coordinator": plan.coordinator,
            "state-dir": str(plan.node_state),
            "models": ",".join(plan.models),
            "listen": plan.listen,
        }
        if advertise := plan.advertised():
            values["advertise"] = advertise
        if plan.node_id:
            values["node-id"] = plan.node_id
        return values

    def _write_config(self, config_support: bool) -> None:
        """``node.yaml`` (keys = the node's flags) and ``node.env`` beside it: the
        join token (a secret: mode 0600, read by systemd as root) and the model store."""
        plan = self.plan
        token = plan.token
        if not token and os.path.isfile(plan.env_file):
            # An upgrade keeps the token the first install wrote (harmless once joined).
            match = re.search(r"^EDGEFLEET_JOIN_TOKEN=(\S+)$", plan.env_file.read_text(), re.M)
            token = match.group(1) if match else ""
        env = {"EDGEFLEET_MODEL_DIR": str(plan.model_dir)}
        if token:
            env["EDGEFLEET_JOIN_TOKEN"] = token
        settings = self._settings()
        if config_support:
            lines = [f"# edgefleet node, written by the bundle installer ({plan.version})."]
            lines.append(f"# The join token is in {plan.env_file.name} (EDGEFLEET_JOIN_TOKEN).")
            lines += [f"{key}: {json.dumps(value)}" for key, value in settings.items()]
            say(f"writing {plan.config} and {plan.env_file.name}")
            self._write_file(plan.config, "\n".join(lines) + "\n", 0o640, group_readable=True)
        else:
            # This edgefleet reads no config file: the same settings as EDGEFLEET_* variables.
            names = {
                "coordinator": "COORDINATOR",
                "state-dir": "STATE_DIR",
                "models": "NODE_MODELS",
                "listen": "NODE_LISTEN",
                "advertise": "NODE_ADVERTISE",
                "node-id": "NODE_ID",
            }
            env.update({f"EDGEFLEET_{names[k]}": v for k, v in settings.items()})
            say(f"writing {plan.env_file} (this edgefleet reads no config file)")
        text = "".join(f"{key}={value}\n" for key, value in env.items())
        # systemd reads it as root before dropping privileges: the owner alone.
        self._write_file(plan.env_file, text, 0o600, group_readable=False)

    def _write_unit(self, config_support: bool) -> str:
        plan = self.plan
        unit = (plan.bundle / "systemd" / UNIT_NAME).read_text()
        replacements = [
            (DEFAULT_CONFIG, str(plan.config)),
            (DEFAULT_ENV_FILE, str(plan.env_file)),
            (DEFAULT_PREFIX, str(plan.prefix)),
            (DEFAULT_STATE_DIR, str(plan.state_dir)),
        ]
        for old, new in replacements:
            unit = unit.replace(old, new)
        lines = unit.splitlines()
        out = []
        section = ""
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("["):
                section = stripped
            key = stripped.partition("=")[0].strip()
            if section == "[Service]" and key in ("User", "Group"):
                group = self.plan.user if key == "User" else _group_of(self.plan.user)
                line = f"{key}={group}"
            if section == "[Service]" and key == "ExecStart":
                if config_support and "--config" not in line:
                    line += f" --config {plan.config}"
            out.append(line)
        unit = "\n".join(out) + "\n"
        if f"EnvironmentFile=-{plan.env_file}" not in unit and (
            f"EnvironmentFile={plan.env_file}" not in unit
        ):
            unit = unit.replace("[Service]\n", f"[Service]\nEnvironmentFile=-{plan.env_file}\n", 1)
        self._write_file(plan.prefix / "systemd" / UNIT_NAME, unit, 0o644, group_readable=False)
        if plan.systemd:
            self.undo.append(lambda: subprocess.run(["systemctl", "daemon-reload"], check=False))
            self._write_file(Path("/etc/systemd/system") / UNIT_NAME, unit, 0o644, False)
        return unit

    # -- upgrade: drain, replace, restart --------------------------------------------------------
    def _stop_node(self) -> None:
        """Stop the running node: SIGTERM drains it (it leaves the fleet, in-flight
        streams finish within its grace or fail over), and wait for it to exit."""
        plan = self.plan
        if plan.systemd:
            state = subprocess.run(
                ["systemctl", "is-active", UNIT_NAME], capture_output=True, text=True
            ).stdout.strip()
            if state in ("active", "activating", "reloading"):
                say(
                    "draining the node: systemctl stop (it leaves the fleet; its streams "
                    "finish or move)"
                )
                self.restart_old = self._restart_old_service
                _run(
                    ["systemctl", "stop", UNIT_NAME],
                    "systemctl stop",
                    timeout=plan.args.stop_timeout,
                )
            return
        for process in _node_processes(plan.prefix):
            say(
                f"draining the node (pid {process['pid']}): SIGTERM; it leaves the fleet and "
                "its streams finish or move to other nodes"
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(process["pid"], signal.SIGTERM)
            self.stopped.append(process)
            self.restart_old = self._relaunch_old
        deadline = time.monotonic() + plan.args.stop_timeout
        for process in self.stopped:
            while _alive(process["pid"]):
                if time.monotonic() > deadline:
                    raise Refused(
                        f"the node (pid {process['pid']}) did not stop within "
                        f"{plan.args.stop_timeout:g} s; nothing was replaced"
                    )
                time.sleep(0.2)

    @staticmethod
    def _restart_old_service() -> None:
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        subprocess.run(["systemctl", "restart", UNIT_NAME], check=False)

    def _switch(self, release: Path) -> None:
        link = self.plan.prefix / ".venv.new"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(Path("releases") / release.name)
        os.replace(link, self.venv)
        old = self.old_release
        if old is not None:
            self.undo.append(lambda: self._point_back(old))
        else:
            self.undo.append(lambda: self.venv.unlink(missing_ok=True))

    def _point_back(self, old: Path) -> None:
        link = self.plan.prefix / ".venv.new"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(Path("releases") / old.name)
        os.replace(link, self.venv)

    def _record(self) -> None:
        plan = self.plan
        record = {
            "version": plan.version,
            "arch": plan.manifest["arch"],
            "python": plan.manifest["python"],
            "release": self.release.name,
            "installed_at": time.time(),
            "settings": {
                "state_dir": str(plan.state_dir),
                "config": str(plan.config),
                "coordinator": plan.coordinator,
                "models": ",".join(plan.models),
                "listen": plan.listen,
                "advertise": plan.advertise,
                "node_id": plan.node_id,
                "user": plan.user,
                "systemd": plan.systemd,
            },
        }
        self._write_file(
            plan.prefix / INSTALL_RECORD, json.dumps(record, indent=2) + "\n", 0o644, False
        )

    def _start_service(self) -> None:
        plan = self.plan
        _run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        if plan.upgrade:
            say("starting the upgraded node")
            _run(["systemctl", "enable", UNIT_NAME], "systemctl enable")
            _run(["systemctl", "restart", UNIT_NAME], "systemctl restart")
        else:
            say("enabling and starting edgefleet-node.service")
            _run(["systemctl", "enable", "--now", UNIT_NAME], "systemctl enable --now")
            self.undo.append(
                lambda: subprocess.run(["systemctl", "disable", "--now", UNIT_NAME], check=False)
            )
        self._wait_ready(lambda: _journal_since(since))

    def _relaunch(self) -> None:
        """No systemd: start the stopped node again, its command line and environment
        (updated from node.env) on whatever ``PREFIX/venv`` points at."""
        self._relaunch_processes(wait=True)

    def _relaunch_old(self) -> None:
        self._relaunch_processes(wait=False)

    def _relaunch_processes(self, *, wait: bool) -> None:
        plan = self.plan
        log_path = plan.state_dir / "node.log"
        written = {}
        if os.path.isfile(plan.env_file):
            lines = plan.env_file.read_text().splitlines()
            written = dict(line.partition("=")[::2] for line in lines if "=" in line)
        for process in self.stopped:
            argv = [_moved(arg, plan.prefix) for arg in process["argv"]]
            offset = log_path.stat().st_size if log_path.exists() else 0
            with log_path.open("ab") as log:
                started = subprocess.Popen(
                    argv,
                    env={**process["env"], **written},
                    cwd=process["cwd"] if os.path.isdir(process["cwd"]) else "/",
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    user=process["uid"] if plan.root else None,
                    group=process["gid"] if plan.root else None,
                )
            (plan.state_dir / "node.pid").write_text(f"{started.pid}\n")
            if wait:
                self.undo.append(lambda p=started: _terminate(p))
            say(f"restarted the node (pid {started.pid}, log {log_path})")
            if wait:

                def tail(path=log_path, start=offset) -> str:
                    with path.open("rb") as handle:
                        handle.seek(start)
                        return handle.read().decode(errors="replace")

                self._wait_ready(tail, process=started)

    def _wait_ready(self, read_log, process: subprocess.Popen | None = None) -> None:
        timeout = self.plan.args.start_timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in read_log():
                say("the node is ready and joins the fleet")
                return
            if process is not None and process.poll() is not None:
                lines = read_log().strip().splitlines()
                raise Refused(
                    f"the node exited ({process.returncode}) before it was ready: "
                    f"{lines[-1] if lines else 'no output'}"
                )
            if self.plan.systemd and _unit_failed():
                lines = read_log().strip().splitlines()
                raise Refused(
                    f"edgefleet-node.service failed: {lines[-1] if lines else 'see journalctl'}"
                )
            time.sleep(0.5)
        raise Refused(f"the node did not report ready within {timeout:g} s")

    def _rollback(self) -> None:
        for step in reversed(self.undo):
            with contextlib.suppress(Exception):
                step()
        self.undo.clear()
        if self.restart_old is not None:  # everything is back as it was: the old node too
            say("putting the previous release back and starting it again")
            with contextlib.suppress(Exception):
                self.restart_old()


def _terminate(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def _group_of(user: str) -> str:
    import grp

    try:
        return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except KeyError:
        return user


def _unit_value(unit: str, key: str) -> str:
    for line in unit.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            return value.strip()
    return ""


def _unit_failed() -> bool:
    state = subprocess.run(
        ["systemctl", "is-failed", UNIT_NAME], capture_output=True, text=True
    ).stdout.strip()
    return state == "failed"


def _journal_since(since: str) -> str:
    if not shutil.which("journalctl"):
        return READY_LINE  # nothing to read: the unit being active has to do
    result = subprocess.run(
        ["journalctl", "-u", UNIT_NAME, "--since", since, "-o", "cat", "--no-pager"],
        capture_output=True,
        text=True,
    )
    return result.stdout


def _moved(arg: str, prefix: Path) -> str:
    """A path into an old release, pointed at ``PREFIX/venv`` instead."""
    releases = str(prefix / "releases") + "/"
    if arg.startswith(releases):
        rest = arg[len(releases) :].partition("/")[2]
        return str(prefix / "venv" / rest)
    return arg


def _node_processes(prefix: Path) -> list[dict]:
    """Node agents running from this prefix: their argv, environment and cwd."""
    entry_points = {str(prefix / "venv" / "bin" / "edgefleet")}
    releases = str(prefix / "releases") + "/"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
            ours = [
                i
                for i, a in enumerate(argv[:3])
                if a in entry_points or (a.startswith(releases) and a.endswith("/bin/edgefleet"))
            ]
            if not ours or "node" not in argv[ours[0] + 1 : ours[0] + 2]:
                continue
            if _state(int(proc.name)) == "Z":
                continue
            raw = (proc / "environ").read_bytes().split(b"\0")
            env = dict(item.decode().partition("=")[::2] for item in raw if b"=" in item)
            status = (proc / "status").read_text()
            uid = int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))
            gid = int(re.search(r"^Gid:\s+(\d+)", status, re.MULTILINE).group(1))
            found.append(
                {
                    "pid": int(proc.name),
                    "argv": argv,
                    "env": env,
                    "cwd": os.readlink(proc / "cwd"),
                    "uid": uid,
                    "gid": gid,
                }
            )
        except (OSError, ValueError, AttributeError):
            continue
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


def _alive(pid: int) -> bool:
    state = _state(pid)
    return bool(state) and state != "Z"


def _run(command: list[str], what: str, *, env=None, timeout: float | None = None) -> str:
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Refused(f"{what}: {error}") from None
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).strip().splitlines() if line]
        raise Refused(f"{what} failed: {lines[-1] if lines else f'exit {result.returncode}'}")
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    # What is installed must be readable by the node's user, whatever the caller's
    # umask (sudo may keep 077); secrets get their modes explicitly.
    os.umask(0o022)
    bundle = Path(__file__).resolve().parent
    try:
        plan = Plan(args, bundle)
        plan.check()
        if args.check:
            say(
                f"bundle and inputs ok: edgefleet {plan.version} for {plan.manifest['arch']}, "
                f"Python {plan.manifest['python']}; nothing was changed (--check)"
            )
            return 0
        Install(plan).run()
    except Refused as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except OSError as error:  # unforeseen: still one line (everything made was removed)
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was left half-installed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
