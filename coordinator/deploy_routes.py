"""Downloads for devices joining the fleet, on the coordinator's HTTP listener
(README: Deploy > One line from the coordinator).

- ``GET /install.sh``: a small bootstrap script (``edgefleet/bundle/bootstrap.sh``)
  that picks the bundle for the device's arch and Python, downloads it
  (resuming), checks its sha256 and runs its ``install.sh`` with ``--coordinator``
  set to this coordinator's client port as the device reached it.
- ``GET /bundle/<file>``: a file of ``--bundle-dir`` (the bundles ``edgefleet
  bundle`` wrote, their ``.sha256``, model files put there), with HTTP Range,
  so an interrupted download resumes.

Every request carries a join token (``Authorization: Bearer EF1...``), checked
by ``Access.check_token``: it must be this fleet's, known, unexpired and have
uses left, and it is not spent (only the node's join spends a use). A missing
or bad token is 401.

Trust: the script carries what the device already trusted to fetch it. With a
listener certificate from the fleet CA (``--tls-auto``) it carries that CA and
downloads from ``https://coordinator.edgefleet:PORT`` (the name the fleet
certificates carry) through ``curl --connect-to`` to the address the device
used; otherwise the same URL it was fetched from (public-CA HTTPS, or plain
HTTP, which the coordinator serves on loopback only).
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response

from coordinator.openai_common import ApiError, api_error, services
from edgefleet import bundle, tls
from edgefleet.errors import EdgefleetError, Reason
from edgefleet.model_store import sha256_of

log = logging.getLogger("edgefleet.coordinator.deploy")

FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
TOKEN_REFUSALS = {
    Reason.TOKEN_MALFORMED,
    Reason.TOKEN_UNKNOWN,
    Reason.TOKEN_EXPIRED,
    Reason.TOKEN_USED_UP,
}


@dataclass(frozen=True)
class DeploySettings:
    bundle_dir: str = ""  # "": no bundles served
    grpc_port: int = 0  # the client port a joining node dials
    # The fleet CA's PEM when the HTTPS certificate is the fleet's (--tls-auto).
    ca_pem: bytes = b""


@dataclass(frozen=True)
class Bundle:
    file: str
    arch: str
    python: str
    version: str
    sha256: str
    size: int


class Shelf:
    """The bundles in ``--bundle-dir``: manifest and sha256 read once per file version."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory).expanduser().resolve() if directory else None
        self._known: dict[str, tuple[tuple[int, int], Bundle | None]] = {}

    def path(self, name: str) -> Path | None:
        """The file ``name`` in the directory, never anything outside it."""
        if self.directory is None or not FILE_NAME.fullmatch(name):
            return None
        path = self.directory / name
        if path.is_symlink() or not path.is_file():
            return None
        return path

    async def bundles(self) -> list[Bundle]:
        """The newest bundle per (arch, Python)."""
        if self.directory is None or not self.directory.is_dir():
            return []
        found: dict[tuple[str, str], tuple[float, Bundle]] = {}
        for path in sorted(self.directory.glob(f"*{bundle.SUFFIX}")):
            if self.path(path.name) is None:
                continue
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
            known = self._known.get(path.name)
            if known is None or known[0] != key:
                known = (key, await asyncio.to_thread(self._read, path))
                self._known[path.name] = known
            item = known[1]
            if item is not None:
                slot = (item.arch, item.python)
                if slot not in found or found[slot][0] < stat.st_mtime:
                    found[slot] = (stat.st_mtime, item)
        return [item for _, item in sorted(found.values(), key=lambda pair: -pair[0])]

    @staticmethod
    def _read(path: Path) -> Bundle | None:
        try:
            manifest = bundle.read_manifest(path)
        except ValueError as error:
            log.warning("not serving %s: %s", path.name, error)
            return None
        return Bundle(
            file=path.name,
            arch=str(manifest.get("arch", "")),
            python=str(manifest.get("python", "")),
            version=str(manifest.get("version", "")),
            sha256=sha256_of(path),
            size=path.stat().st_size,
        )


async def _authorize(request: Request) -> None:
    access = services(request).access
    if access is None:
        raise ApiError(
            404,
            "this coordinator runs --insecure: there are no join tokens, so it serves no installer",
            code="not_found",
        )
    header = request.headers.get("authorization") or ""
    token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    if not token:
        raise ApiError(
            401,
            "a join token is required: Authorization: Bearer EF1... (edgefleet token create)",
            type_="authentication_error",
            code="join_token_required",
        )
    try:
        await access.check_token(token)
    except EdgefleetError as error:
        if error.reason in TOKEN_REFUSALS:
            raise ApiError(
                401, error.message, type_="authentication_error", code=error.reason.name.lower()
            ) from None
        raise api_error(error) from None


def _origin(request: Request, settings: DeploySettings) -> tuple[str, str, str]:
    """(download base URL, curl --connect-to value, the node's --coordinator)."""
    server = request.scope.get("server") or ("", 0)
    host = request.url.hostname or ""
    port = request.url.port or server[1]
    if not host or host == tls.COORDINATOR_DNS:
        host = server[0]  # reached through --connect-to: the address it arrived at
    bracketed = f"[{host}]" if ":" in host else host
    coordinator = f"{bracketed}:{settings.grpc_port}"
    if settings.ca_pem and request.url.scheme == "https":
        name = f"{tls.COORDINATOR_DNS}:{port}"
        return f"https://{name}", f"{name}:{bracketed}:{port}", coordinator
    return f"{request.url.scheme}://{bracketed}:{port}", "", coordinator


def register(app: FastAPI, settings: DeploySettings) -> None:
    """``GET /install.sh`` and ``GET /bundle/<file>`` (module docstring)."""
    shelf = Shelf(settings.bundle_dir)

    async def install_script(request: Request) -> Response:
        await _authorize(request)
        base, connect_to, coordinator = _origin(request, settings)
        available = await shelf.bundles()
        lines = "\n".join(f"{b.arch} {b.python} {b.file} {b.sha256} {b.size}" for b in available)
        values = {
            "BASE_URL": base,
            "CONNECT_TO": connect_to,
            "COORDINATOR": coordinator,
            "CA_PEM": settings.ca_pem.decode().strip() if connect_to else "",
            "BUNDLES": lines,
        }
        script = bundle.template(bundle.BOOTSTRAP)
        for key, value in values.items():
            script = script.replace(f"@@{key}@@", shlex.quote(value))
        return PlainTextResponse(script, media_type="text/x-shellscript")

    async def bundle_file(request: Request) -> Response:
        await _authorize(request)
        if shelf.directory is None:
            raise ApiError(
                404,
                "this coordinator serves no bundles: start it with --bundle-dir DIR",
                code="not_found",
            )
        name = request.path_params["name"]
        path = shelf.path(name)
        if path is None:
            raise ApiError(404, f"no file {name[:80]!r} in the bundle dir", code="not_found")
        return FileResponse(path, media_type="application/octet-stream")

    app.add_route("/install.sh", install_script, methods=["GET"], include_in_schema=False)
    app.add_route("/bundle/{name}", bundle_file, methods=["GET"], include_in_schema=False)
