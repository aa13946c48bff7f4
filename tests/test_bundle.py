"""Deploying nodes (README: Deploy): the offline bundle, its installer, the
coordinator's one-line install, and upgrades in place.

Fast (the default run): a small bundle (the real installer, templates and
manifest; a stand-in payload) served by a real secure coordinator
(``--tls-auto --bundle-dir``): downloads need a join token (401 without) and
do not spend it, resume with HTTP Range, the line ``edgefleet token create
--join-line`` prints runs end to end (bootstrap, sha256, ``install.sh
--check``), and every bad input stops the installer with one line and leaves
nothing behind.

Slow (``make bundle-test``, marker ``bundle``): the real bundle (real wheels,
the real SmolLM2 model) installed by an unprivileged user with pip's network
off (``--no-index``, and ``unshare -n`` where permitted), the node started
exactly as the installed unit's ExecStart says (its Environment too), joined
to the secure coordinator and serving a chat; then the install run again as
an upgrade under a live stream: drained, replaced, restarted, no stream lost.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from edgefleet import bundle as layout
from edgefleet.cli.bundle import assemble, host_arch
from edgefleet.local.etcd_server import EtcdCluster
from edgefleet.local.processes import (
    DaemonProcess,
    admin_client,
    edgefleet_command,
    free_port,
    join_token,
    start_coordinator,
    start_node,
)
from edgefleet.model_store import sha256_of
from edgefleet.profile import Profile
from edgefleet.v1 import access_pb2, common_pb2
from tests.helpers import wait_until
from tests.test_chaos import LONG, Reader

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
# What a device's shell finds: the system Python, not this test's virtualenv.
DEVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def device_python() -> str:
    """The X.Y of the python3 a device's shell finds (install.sh looks for it)."""
    found = subprocess.run(
        ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        env={"PATH": DEVICE_PATH},
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        pytest.skip("no python3 on the system PATH to run the installer with")
    return found.stdout.strip()


def unprivileged() -> list[str]:
    """The prefix that runs a command as nobody when the tests run as root."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv (util-linux) to run the installer as a non-root user")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]


def open_dir(name: str) -> Path:
    """A folder the unprivileged installer may read and write (pytest's are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix=f"edgefleet-{name}-"))
    path.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
    return path


def no_network() -> tuple[list[str], str]:
    """(prefix, why not) for running a command without a network: ``unshare -n``."""
    command = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-n", "--map-current-user"]
    if not shutil.which("unshare"):
        return [], "unshare is not installed"
    probe = subprocess.run([*command, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return [], f"unshare -n is not permitted here: {probe.stderr.strip()}"
    return command, ""


def run_installer(bundle_dir: Path, *args: str, wrap=(), user: bool = True, timeout: float = 600):
    command = [*wrap, *(unprivileged() if user else []), "sh", str(bundle_dir / "install.sh")]
    return subprocess.run(
        [*command, *args],
        env={"PATH": DEVICE_PATH, "HOME": "/tmp", "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def leftovers(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    folder = into / archive.name[: -len(layout.SUFFIX)]
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or path.name == "install.sh" else 0o644)
    return folder


def pip_wheel() -> Path:
    import ensurepip

    found = sorted((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl"))
    if not found:
        pytest.skip("this Python has no bundled pip wheel to build a stand-in bundle with")
    return found[-1]


def stand_in_bundle(directory: Path, *, arch: str = "", python: str = "") -> Path:
    """A bundle with the real installer, unit and manifest around a stand-in payload:
    pip, a wheel that is not one (any real install of it fails), a fake model."""
    work = Path(tempfile.mkdtemp(prefix="edgefleet-standin-"))
    model = work / "model.gguf"
    model.write_bytes(b"GGUF" + os.urandom(300_000))
    bogus = work / "bogus-1.0-py3-none-any.whl"
    bogus.write_bytes(b"not a wheel")
    pip = pip_wheel()
    files = {
        f"wheels/{pip.name}": pip,
        f"wheels/{bogus.name}": bogus,
        "models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf": model,
    }
    manifest = {
        "version": "0.1.0",
        "arch": arch or host_arch(),
        "python": python or device_python(),
        "system_libraries": [],
        "glibc": "",
        "unit_source": "deploy/systemd/edgefleet-node.service",
        "models": [
            {
                "alias": "smollm2-135m",
                "file": "models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
                "sha256": sha256_of(model),
                "size": model.stat().st_size,
            }
        ],
    }
    unit = (ROOT / "deploy" / "systemd" / "edgefleet-node.service").read_text()
    output = directory / f"{layout.bundle_name('0.1.0', manifest['arch'])}{layout.SUFFIX}"
    assemble(output, files, manifest, unit=unit, work=work)
    shutil.rmtree(work)
    output.chmod(0o644)
    return output


class Fleet:
    """etcd and a secure coordinator serving HTTPS from the fleet CA and the bundles."""

    def __init__(self, base: Path, bundle_dir: Path) -> None:
        self.base = base
        self.bundle_dir = bundle_dir
        self.etcd = EtcdCluster(1, base_dir=base / "etcd").start()
        self.coordinator = start_coordinator(
            grpc_address=f"127.0.0.1:{free_port()}",
            etcd=self.etcd.endpoints,
            # Every node of these tests shares two cores with an install (pip, a model
            # load): a node starved for 2 s is not the failure the tests are about.
            extra_args=(
                "--id",
                "coord-b",
                "--tls-auto",
                "--bundle-dir",
                str(bundle_dir),
                "--stall-timeout",
                "15",
            ),
            log_path=base / "coordinator.log",
            state_dir=base / "coordinator",
        )
        self.coordinator.wait_serving(60)
        self.profile_path = self.coordinator.extra["profile"]
        self.profile = Profile.load(self.profile_path)
        self.url = self.profile.http  # https://127.0.0.1:PORT
        self.ca = ssl.create_default_context(cadata=self.profile.ca_pem)

    def token(self, **kwargs) -> str:
        return join_token(self.coordinator, **kwargs)

    def get(self, path: str, token: str | None = None, **headers) -> httpx.Response:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.get(f"{self.url}{path}", headers=headers, verify=self.ca, timeout=30)

    def stop(self) -> None:
        self.coordinator.terminate(timeout_s=15)
        self.etcd.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    bundles = open_dir("bundles")
    archive = stand_in_bundle(bundles)
    fleet = Fleet(tmp_path_factory.mktemp("deploy"), bundles)
    fleet.archive = archive
    try:
        yield fleet
    finally:
        fleet.stop()
        shutil.rmtree(bundles, ignore_errors=True)


# --- the coordinator's downloads ---------------------------------------------------------------
def test_downloads_need_a_valid_join_token_and_do_not_spend_it(fleet):
    name = fleet.archive.name
    for path in ("/install.sh", f"/bundle/{name}"):
        refused = fleet.get(path)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "join_token_required"
        wrong = fleet.get(path, "EF1." + "0" * 32 + ".abc.def")
        assert wrong.status_code == 401
        assert fleet.get(path, "not-a-token").status_code == 401

    token = fleet.token(uses=1)
    script = fleet.get("/install.sh", token)
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/x-shellscript")
    text = script.text
    digest = sha256_of(fleet.archive)
    assert f"{host_arch()} {device_python()} {name} {digest} {fleet.archive.stat().st_size}" in text
    port = fleet.url.rsplit(":", 1)[1]
    assert f"BASE_URL=https://coordinator.edgefleet:{port}" in text
    assert f"CONNECT_TO=coordinator.edgefleet:{port}:127.0.0.1:{port}" in text
    assert f"COORDINATOR={fleet.coordinator.address}" in text
    assert "BEGIN CERTIFICATE" in text  # the fleet CA its downloads trust
    subprocess.run(["sh", "-n"], input=text, text=True, check=True)

    for _ in range(3):
        got = fleet.get(f"/bundle/{name}", token)
        assert got.status_code == 200
        assert got.content == fleet.archive.read_bytes()
    with admin_client(fleet.coordinator) as admin:
        tokens = admin.access("ListJoinTokens", access_pb2.ListJoinTokensRequest()).tokens
    assert next(t for t in tokens if token.split(".")[2] == t.token_id).uses_left == 1

    assert fleet.get("/bundle/nothing-here.tar.gz", token).status_code == 404
    assert fleet.get("/bundle/..%2Fcoordinator.log", token).status_code == 404
    assert fleet.get("/bundle/.hidden", token).status_code == 404

    expiring = fleet.token(ttl_s=1)
    assert fleet.get("/install.sh", expiring).status_code == 200
    time.sleep(1.5)
    assert fleet.get("/install.sh", expiring).status_code == 401


def test_a_download_resumes_with_range(fleet):
    token = fleet.token()
    whole = fleet.archive.read_bytes()
    cut = len(whole) // 3
    first = fleet.get(f"/bundle/{fleet.archive.name}", token, Range=f"bytes=0-{cut - 1}")
    assert first.status_code == 206
    assert first.content == whole[:cut]
    rest = fleet.get(f"/bundle/{fleet.archive.name}", token, Range=f"bytes={cut}-")
    assert rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes {cut}-{len(whole) - 1}/{len(whole)}"
    assert first.content + rest.content == whole
    assert fleet.get(f"/bundle/{fleet.archive.name}", None, Range="bytes=0-9").status_code == 401


def test_the_join_line_installs_from_the_coordinator(fleet, tmp_path):
    if not shutil.which("bash") or not shutil.which("curl"):
        pytest.skip("the join line needs bash and curl")
    made = subprocess.run(
        edgefleet_command(
            "token",
            "create",
            "--uses",
            "1",
            "--approve",
            "--join-line",
            "--profile",
            str(fleet.profile_path),
            "--coordinator",
            fleet.coordinator.address,
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    line = made.stdout.strip()
    # Without --join-line: the token alone on stdout (scripts read it), the line on stderr.
    plain = subprocess.run(
        edgefleet_command(
            "token",
            "create",
            "--profile",
            str(fleet.profile_path),
            "--coordinator",
            fleet.coordinator.address,
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.returncode == 0, plain.stderr
    assert re.fullmatch(r"EF1\.[0-9a-f]{32}\.\w+\.\S+\n", plain.stdout)
    assert "# or in one line (bash): T=EF1." in plain.stderr
    assert line.startswith("T=EF1.") and '| sudo sh -s -- --join "$T"' in line
    assert "--cacert <(printf" in line and "--connect-to coordinator.edgefleet:" in line

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    # A download cut off half way: the bootstrap resumes it.
    half = fleet.archive.read_bytes()[: fleet.archive.stat().st_size // 2]
    (downloads / (fleet.archive.name + ".part")).write_bytes(half)
    prefix, state = tmp_path / "prefix", tmp_path / "state"
    device = line.replace("| sudo sh", "| sh")  # the tests are root or need no root (--check)
    device += f" --check --no-systemd --prefix {prefix} --state-dir {state}"
    result = subprocess.run(
        ["bash", "-c", device],
        env={"PATH": DEVICE_PATH, "HOME": str(tmp_path), "EDGEFLEET_DOWNLOAD_DIR": str(downloads)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming {fleet.archive.name} at {len(half)}" in result.stdout
    assert "sha256 ok" in result.stdout
    assert "bundle and inputs ok" in result.stdout
    assert not prefix.exists() and not state.exists()  # --check changes nothing

    # Without a token the same line gets nowhere: curl -f fails, sh gets no script.
    bare = re.sub(r"^T=\S+;", "T=;", line).replace("| sudo sh", "| sh")
    refused = subprocess.run(
        ["bash", "-o", "pipefail", "-c", bare],
        env={"PATH": DEVICE_PATH},
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0
    assert "401" in refused.stderr and refused.stdout == ""


# --- the installer's bad inputs ---------------------------------------------------------------
@pytest.fixture
def unpacked(fleet):
    base = open_dir("unpacked")
    folder = unpack(fleet.archive, base)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(base)], check=os.geteuid() == 0)
    target = open_dir("target")
    yield folder, target
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)


def _manifest_edit(folder: Path, **changes) -> None:
    path = folder / layout.MANIFEST
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _corrupt(folder: Path, _fleet) -> str:
    model = next((folder / "models").rglob("*.gguf"))
    with model.open("r+b") as handle:
        handle.seek(1000)
        handle.write(b"\xff" * 16)
    return "bundle file corrupt: models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"


def _wrong_arch(folder: Path, _fleet) -> str:
    other = "aarch64" if host_arch() != "aarch64" else "x86_64"
    _manifest_edit(folder, arch=other)
    return f"error: this bundle is for {other}, this machine is {host_arch()}"


def _wrong_python(folder: Path, _fleet) -> str:
    _manifest_edit(folder, python="3.99")
    return "error: this bundle is for Python 3.99"


def _old_glibc(folder: Path, _fleet) -> str:
    _manifest_edit(folder, glibc="9.99")
    return "error: this bundle needs glibc 9.99 or newer"


CASES = {
    "corrupt file": (_corrupt, ["--join", "{token}", "--coordinator", "{coordinator}"]),
    "wrong arch": (_wrong_arch, ["--join", "{token}", "--coordinator", "{coordinator}"]),
    "wrong python": (_wrong_python, ["--join", "{token}", "--coordinator", "{coordinator}"]),
    "old glibc": (_old_glibc, ["--join", "{token}", "--coordinator", "{coordinator}"]),
    "missing token": (None, ["--coordinator", "{coordinator}"]),
    "malformed token": (None, ["--join", "EF1.nothex", "--coordinator", "{coordinator}"]),
    "unreachable coordinator": (None, ["--join", "{token}", "--coordinator", "127.0.0.1:{dead}"]),
    "no coordinator": (None, ["--join", "{token}"]),
}
EXPECTED = {
    "missing token": "error: --join TOKEN is required: this device has no fleet identity yet",
    "malformed token": "error: --join: that is not a join token",
    "unreachable coordinator": "error: cannot reach the coordinator at 127.0.0.1:",
    "no coordinator": "error: --coordinator HOST:PORT is required",
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_stops_the_install_with_one_line(fleet, unpacked, case):
    folder, target = unpacked
    change, template = CASES[case]
    expected = change(folder, fleet) if change else EXPECTED[case]
    values = {"token": fleet.token(), "coordinator": fleet.coordinator.address, "dead": free_port()}
    args = [arg.format(**values) for arg in template]
    prefix, state = target / "prefix", target / "state"
    result = run_installer(
        folder, *args, "--no-systemd", "--prefix", str(prefix), "--state-dir", str(state)
    )
    assert result.returncode == 1, result.stdout + result.stderr
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(expected) or expected in errors[0], errors
    assert leftovers(target) == []


def test_root_and_writable_folders_are_checked_first(fleet, unpacked):
    folder, target = unpacked
    args = ["--join", fleet.token(), "--coordinator", fleet.coordinator.address]
    if os.geteuid() == 0:
        # The service needs root: an unprivileged user is told so.
        result = run_installer(folder, *args, "--prefix", str(target / "p"))
        assert result.returncode == 1
        assert error_lines(result) == [
            "error: installing the systemd service needs root: run it with sudo, or pass "
            "--no-systemd (with a --prefix and --state-dir you can write)"
        ]
    locked = Path(tempfile.mkdtemp(prefix="edgefleet-locked-"))  # 0700, root's (or ours: 0500)
    locked.chmod(0o500 if os.geteuid() != 0 else 0o700)
    try:
        result = run_installer(
            folder,
            *args,
            "--no-systemd",
            "--prefix",
            str(target / "p"),
            "--state-dir",
            str(locked / "state"),
        )
        assert result.returncode == 1
        assert error_lines(result)[0].startswith(
            f"error: state dir {locked / 'state'} is not writable"
        )
        assert len(error_lines(result)) == 1
    finally:
        locked.chmod(0o700)
        shutil.rmtree(locked)
    assert leftovers(target) == []


def test_a_failed_step_leaves_nothing_half_installed(fleet, unpacked):
    """Every input is fine, then pip cannot install a wheel: everything made goes."""
    folder, target = unpacked
    prefix, state = target / "prefix", target / "state"
    result = run_installer(
        folder,
        "--join",
        fleet.token(),
        "--coordinator",
        fleet.coordinator.address,
        "--no-systemd",
        "--prefix",
        str(prefix),
        "--state-dir",
        str(state),
    )
    assert result.returncode == 1
    assert "creating the Python environment" in result.stdout  # it got that far
    errors = error_lines(result)
    assert len(errors) == 1 and errors[0].startswith("error: pip install --no-index failed")
    assert leftovers(target) == []


def test_the_bundle_command_refuses_unknown_models(tmp_path):
    result = subprocess.run(
        edgefleet_command("bundle", "--models", "nope", "-o", str(tmp_path / "x.tar.gz")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --models: unknown alias nope")
    assert list(tmp_path.iterdir()) == []


def test_the_download_routes_do_not_touch_etcd():
    from tests.test_architecture import imports_any

    path = ROOT / "coordinator" / "deploy_routes.py"
    assert imports_any(path, "coordinator.etcd", "coordinator.keys", "etcd3aio") == []


# --- the real bundle, offline -------------------------------------------------------------------
def parse_unit(path: Path) -> dict:
    """ExecStart, Environment and EnvironmentFile of a unit's [Service] section."""
    found = {"exec_start": "", "environment": {}, "env_files": []}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]" or "=" not in line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        if key == "ExecStart":
            found["exec_start"] = value
        elif key == "Environment":
            for item in shlex.split(value):
                name, _, setting = item.partition("=")
                found["environment"][name] = setting
        elif key == "EnvironmentFile":
            found["env_files"].append(value)
    return found


def unit_environment(unit: dict) -> dict[str, str]:
    env = {"PATH": DEVICE_PATH, "LANG": "C.UTF-8", **unit["environment"]}
    for name in unit["env_files"]:
        optional = name.startswith("-")
        path = Path(name.lstrip("-"))
        if not path.exists() and optional:
            continue
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip().strip('"')
    return env


class Installed:
    """The real bundle, built once and installed by an unprivileged user, offline."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.work = open_dir("real")
        self.archive = self.work / f"{layout.bundle_name('0.1.0', host_arch())}{layout.SUFFIX}"
        started = time.monotonic()
        built = subprocess.run(
            edgefleet_command("bundle", "--models", "smollm2-135m", "-o", str(self.archive)),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert built.returncode == 0, built.stderr[-3000:]
        self.build_s = time.monotonic() - started
        self.archive.chmod(0o644)
        unpacked = open_dir("real-unpacked")
        self.folder = unpack(self.archive, unpacked)
        manifest = json.loads((self.folder / layout.MANIFEST).read_text())
        if manifest["python"] != device_python():
            pytest.skip(
                f"the bundle is for Python {manifest['python']}, the system python3 is "
                f"{device_python()}: no device Python to install it with here"
            )
        self.target = open_dir("real-target")
        self.prefix = self.target / "prefix"
        self.state = self.target / "state"
        self.listen = f"127.0.0.1:{free_port()}"
        self.process: DaemonProcess | None = None
        self.helper: DaemonProcess | None = None

    def install(self, *extra: str, wrap=()) -> subprocess.CompletedProcess:
        return run_installer(
            self.folder,
            "--coordinator",
            self.fleet.coordinator.address,
            "--no-systemd",
            "--prefix",
            str(self.prefix),
            "--state-dir",
            str(self.state),
            "--listen",
            self.listen,
            "--node-id",
            "bundled",
            *extra,
            wrap=wrap,
        )

    def start_from_unit(self) -> DaemonProcess:
        unit = parse_unit(self.prefix / "systemd" / layout.UNIT_NAME)
        argv = shlex.split(unit["exec_start"].replace(layout.DEFAULT_PREFIX, str(self.prefix)))
        assert argv[:2] == [str(self.prefix / "venv" / "bin" / "edgefleet"), "node"], argv
        log = self.target / "node-from-unit.log"
        as_user = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                env=unit_environment(unit),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **(as_user if os.geteuid() == 0 else {}),
            )
        daemon = DaemonProcess("bundled", self.listen, process, log, {"ready_line": "node ready"})
        self.process = daemon
        return daemon

    def relaunched_pid(self) -> int:
        return int((self.state / "node.pid").read_text())

    def stop(self) -> None:
        for daemon in (self.process, self.helper):
            if daemon is not None:
                daemon.terminate(timeout_s=20)
        pid_file = self.state / "node.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            subprocess.run(["kill", "-TERM", str(pid)], check=False)
            wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, what="the node to stop")
        for path in (self.work, self.folder.parent, self.target):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(request, fleet, default_model_path):
    selected = "bundle" in (request.config.option.markexpr or "")
    if not selected and not os.environ.get("EDGEFLEET_BUNDLE_TESTS"):
        pytest.skip("the real bundle's build and install take minutes: make bundle-test")
    setup = Installed(fleet)
    try:
        yield setup
    finally:
        setup.stop()


def ready_nodes(fleet: Fleet) -> list[str]:
    with admin_client(fleet.coordinator) as admin:
        return sorted(
            n.node_id for n in admin.status().nodes if n.state == common_pb2.NODE_STATE_READY
        )


@pytest.mark.bundle
def test_the_real_bundle_installs_offline_joins_and_serves(fleet, installed, default_model_path):
    size_mb = installed.archive.stat().st_size / 1e6
    offline, why = no_network()
    started = time.monotonic()
    result = installed.install("--join", fleet.token(uses=1), "--no-probe", wrap=offline)
    took = time.monotonic() - started
    print(
        f"\nbundle {size_mb:.0f} MB built in {installed.build_s:.0f} s; installed in {took:.1f} s "
        f"with pip --no-index{' inside unshare -n' if offline else f' (no unshare -n: {why})'}"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (installed.prefix / "venv").is_symlink()
    model = installed.state / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sha256_of(model) == sha256_of(default_model_path)
    if os.geteuid() == 0:
        assert model.stat().st_uid == NOBODY  # installed by, and for, the unprivileged user

    node = installed.start_from_unit()
    node.wait_serving(180)
    wait_until(lambda: "bundled" in ready_nodes(fleet), 60, what="the installed node to join")
    with admin_client(fleet.coordinator) as admin:
        reply = list(admin.complete("smollm2-135m", [("user", "Say hello.")], max_tokens=12))
    assert "".join(c.text for c in reply).strip()
    assert {c.node_id for c in reply if c.node_id} == {"bundled"}
    # Built from a portable llama-cpp-python (make portable): the node picked
    # the CPU variant for this machine at start and says which.
    manifest = json.loads((installed.folder / layout.MANIFEST).read_text())
    if manifest["llama_cpp_python"]["portable"]:
        assert "(portable build, of" in node.log_path.read_text()


@pytest.mark.bundle
def test_an_upgrade_in_place_drains_replaces_restarts_and_loses_no_stream(fleet, installed):
    if installed.process is None or not installed.process.alive():
        pytest.skip("needs the node the previous test installed")
    state = installed.target / "helper"
    installed.helper = start_node(
        listen=f"127.0.0.1:{free_port()}",
        models="smollm2-135m",
        slots=2,
        extra_args=(
            "--coordinator",
            fleet.coordinator.address,
            "--node-id",
            "helper",
            "--threads",
            "1",
        ),
        log_path=installed.target / "helper.log",
        name="helper",
        join=(fleet.token(), state),
    )
    installed.helper.wait_serving(180)
    wait_until(lambda: ready_nodes(fleet) == ["bundled", "helper"], 60, what="two nodes")
    release_before = os.readlink(installed.prefix / "venv")
    with admin_client(fleet.coordinator) as admin:
        admin.drain("helper")  # the stream starts on the installed node
        reply = Reader(
            admin.complete("smollm2-135m", [("user", LONG)], max_tokens=300, temperature=0)
        )
        wait_until(lambda: len(reply.text) >= 40 or reply.done.is_set(), 60)
        assert not reply.done.is_set(), f"the reply ended early: {reply.error!r}"
        admin.drain("helper", drain=False)
        result = installed.install()  # again: an upgrade, no token needed
        assert result.returncode == 0, result.stdout + result.stderr
        reply.finish(180)
        print(f"\nupgrade under a live stream (served by {' then '.join(reply.nodes())}):")
        print(result.stdout)
        assert reply.chunks[-1][1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert "draining the node" in result.stdout and "restarted the node" in result.stdout
    release_after = os.readlink(installed.prefix / "venv")
    assert release_after != release_before
    assert not (installed.prefix / release_before).exists()  # the old release is gone
    assert installed.process.process.poll() is not None  # the old process stopped
    pid = installed.relaunched_pid()
    assert Path(f"/proc/{pid}").exists()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert str(installed.prefix / "venv" / "bin" / "edgefleet").encode() in cmdline
    wait_until(lambda: "bundled" in ready_nodes(fleet), 60, what="the upgraded node to rejoin")
    with admin_client(fleet.coordinator) as admin:
        admin.drain("helper")
        try:
            chunks = list(admin.complete("smollm2-135m", [("user", "Hi")], max_tokens=8))
        finally:
            admin.drain("helper", drain=False)
    assert {c.node_id for c in chunks if c.node_id} == {"bundled"}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))


# --- the one line under systemd, in a container ---------------------------------------------------
SYSTEMD_IMAGE = "localhost/edgefleet-systemd-device:latest"
SYSTEMD_CONTAINERFILE = """\
FROM {base}
USER root
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
    systemd systemd-sysv curl passwd python3 libgomp1 libstdc++6 ca-certificates >/dev/null \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /opt/edgefleet /etc/edgefleet \\
 && (userdel edgefleet 2>/dev/null || true) && (groupdel edgefleet 2>/dev/null || true)
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENTRYPOINT []
CMD ["/sbin/init"]
"""


def podman(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    conf = ROOT / "deploy" / "container" / "containers.conf"
    if conf.is_file():
        env.setdefault("CONTAINERS_CONF", str(conf))
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=env, check=check
    )


def systemd_device_image(work: Path) -> str:
    """A Debian image that boots systemd: a local Debian image (the containers'
    base) plus systemd from Debian's archive. Skips with the reason when there is none."""
    if not shutil.which("podman") or podman("info").returncode != 0:
        pytest.skip("no podman here to boot a systemd container")
    if podman("image", "exists", SYSTEMD_IMAGE).returncode == 0:
        return SYSTEMD_IMAGE
    bases = ["localhost/edgefleet-base:bookworm", "localhost/edgefleet-node:latest"]
    base = next((b for b in bases if podman("image", "exists", b).returncode == 0), None)
    if base is None:
        pytest.skip("no local Debian image to add systemd to (make image builds one)")
    (work / "Containerfile").write_text(SYSTEMD_CONTAINERFILE.format(base=base))
    built = podman("build", "-q", "-t", SYSTEMD_IMAGE, str(work), timeout=900)
    if built.returncode != 0:
        pytest.skip(f"cannot build a systemd image here: {built.stderr.strip()[-300:]}")
    return SYSTEMD_IMAGE


@pytest.mark.bundle
def test_the_one_line_install_under_systemd_in_a_container(fleet, installed, tmp_path):
    """The join line in a container that boots systemd: bootstrap, install, the
    user, `systemctl enable --now` of the real unit (Type=notify), the join, a chat."""
    image = systemd_device_image(tmp_path)
    name = f"edgefleet-device-{os.getpid()}"
    served = fleet.bundle_dir / installed.archive.name
    shutil.copy2(installed.archive, served)  # the newest bundle for this arch: served first
    served.chmod(0o644)
    started = podman(
        "run", "-d", "--rm", "--name", name, "--network", "host", "--systemd", "always", image
    )  # fmt: skip
    if started.returncode != 0:
        pytest.skip(f"cannot boot systemd in a container here: {started.stderr.strip()[-300:]}")
    try:
        booted = wait_until(
            lambda: (
                podman("exec", name, "systemctl", "is-system-running").stdout.strip()
                in ("running", "degraded")
            ),
            60,
            interval_s=0.5,
            what="systemd to boot in the container",
        )
        assert booted
        line = subprocess.run(
            edgefleet_command(
                "token",
                "create",
                "--approve",
                "--join-line",
                "--profile",
                str(fleet.profile_path),
                "--coordinator",
                fleet.coordinator.address,
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        listen = f"127.0.0.1:{free_port()}"
        device = line.replace("| sudo sh", "| sh")  # root in the container; no sudo there
        device += f" --listen {listen} --node-id sd-node"
        started_at = time.monotonic()
        result = podman("exec", name, "bash", "-c", device, timeout=600)
        print(f"\none-line install under systemd: {time.monotonic() - started_at:.1f} s")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "enabling and starting edgefleet-node.service" in result.stdout
        active = podman("exec", name, "systemctl", "is-active", "edgefleet-node")
        assert active.stdout.strip() == "active"
        assert podman("exec", name, "id", "-u", "edgefleet").returncode == 0
        wait_until(lambda: "sd-node" in ready_nodes(fleet), 60, what="sd-node to join")
        with admin_client(fleet.coordinator) as admin:
            others = [n for n in ready_nodes(fleet) if n != "sd-node"]
            for other in others:
                admin.drain(other)
            try:
                chunks = list(admin.complete("smollm2-135m", [("user", "Hi")], max_tokens=8))
            finally:
                for other in others:
                    admin.drain(other, drain=False)
        assert {c.node_id for c in chunks if c.node_id} == {"sd-node"}
    finally:
        podman("rm", "-f", name, timeout=120)
        served.unlink(missing_ok=True)
