"""The coordinator's HTTP listener: the OpenAI-compatible API (``/v1``),
health, readiness, Prometheus metrics, and the installer and bundles for
joining devices (``coordinator.deploy_routes``).

An ASGI app (FastAPI, on Starlette) served by uvicorn inside the
coordinator's event loop.

Connections (``HttpLimits``; uvicorn has only the keep-alive timeout of these,
so ``GuardedH11Protocol`` adds the rest to uvicorn's h11 protocol):

- **request head timeout**: a connection has ``header_timeout_s`` to send a
  whole request head, from when it opens and again from the end of each
  response (keep-alive); one that has not is answered 408 (if it sent part of
  a head) and closed. Sending a byte now and then does not extend it.
- **idle timeout**: a keep-alive connection with no new request for
  ``idle_timeout_s`` is closed (uvicorn's ``timeout_keep_alive``).
- **body pace**: a request body must arrive within ``body_timeout_s`` plus one
  second per ``body_min_rate`` bytes, else 408 (``openai_api.BodyLimit``).
- **connection limit**: at most ``max_connections`` open connections are
  served. Each one beyond is still accepted and its request head read (under
  the head timeout), then answered ``503`` with ``Retry-After`` and an
  OpenAI-style error (``code: too_many_connections``) and closed: a client
  sees a clear answer, never a reset or a hang, and an extra connection
  costs at most the head timeout. (uvicorn's ``limit_concurrency`` would
  also count them, and log each refusal.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import uvicorn
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from coordinator import deploy_routes, openai_api, responses_api
from coordinator.deploy_routes import DeploySettings
from coordinator.metrics import CoordinatorMetrics
from coordinator.openai_common import ApiError, HttpServices, authorize_metrics
from edgefleet import __version__
from edgefleet.errors import Unavailable

log = logging.getLogger("edgefleet.coordinator.http")


@dataclass(frozen=True)
class HttpLimits:
    """The HTTP listener's connection rules (module docstring); 0 turns one off."""

    header_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0
    body_timeout_s: float = openai_api.BODY_TIMEOUT_S
    body_min_rate: int = openai_api.BODY_MIN_RATE
    max_connections: int = 512
    max_body_bytes: int = openai_api.MAX_BODY_BYTES


def build_app(
    services: HttpServices,
    *,
    metrics: CoordinatorMetrics,
    etcd_ping: Callable[[], Awaitable[None]],
    dev: bool = True,
    limits: HttpLimits = HttpLimits(),
    deploy: DeploySettings | None = None,
) -> FastAPI:
    fleet = services.fleet

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        problems = []
        try:
            await etcd_ping()
        except Unavailable as exc:
            problems.append(exc.message)
        ready_nodes = len(fleet.ready_nodes())
        if not ready_nodes:
            problems.append("no ready node in the fleet")
        body = {"ready": not problems, "ready_nodes": ready_nodes, "problems": problems}
        return JSONResponse(body, status_code=200 if not problems else 503)

    async def prometheus(request: Request) -> Response:
        await authorize_metrics(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app = FastAPI(
        title="edgefleet coordinator",
        version=__version__,
        description="OpenAI-compatible API over a fleet of edge devices",
        # The API's map is for developers (--dev), not for whoever reaches the port.
        docs_url="/docs" if dev else None,
        redoc_url="/redoc" if dev else None,
        openapi_url="/openapi.json" if dev else None,
        routes=[
            Route("/healthz", healthz, include_in_schema=False),
            Route("/readyz", readyz, include_in_schema=False),
            Route("/metrics", prometheus, include_in_schema=False),
        ],
    )
    app.state.services = services
    openai_api.register(
        app,
        max_body_bytes=limits.max_body_bytes,
        body_timeout_s=limits.body_timeout_s,
        body_min_rate=limits.body_min_rate,
    )
    responses_api.register(app)
    # /install.sh and /bundle/<file>, for devices joining the fleet
    deploy_routes.register(app, deploy or DeploySettings())
    return app


class EmbeddedServer(uvicorn.Server):
    """Uvicorn inside the daemon's own event loop: the daemon owns the signals,
    and start/serve/stop are separate steps of the daemon's lifecycle."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def start(self) -> bool:
        """Bind and start; False when the address cannot be used."""
        if not self.config.loaded:
            self.config.load()
        self.lifespan = self.config.lifespan_class(self.config)
        try:
            await self.startup()
        except SystemExit:  # uvicorn exits on a bind error; the daemon decides
            return False
        return self.started

    async def stop(self) -> None:
        self.should_exit = True
        if self.started:
            await self.shutdown()

    def reload_certificate(self, certfile: str, keyfile: str) -> None:
        """Serve a renewed certificate from the next handshake on (the TLS
        context is uvicorn's own; open connections keep the one they have)."""
        if self.config.loaded and self.config.ssl is not None:
            self.config.ssl.load_cert_chain(certfile, keyfile)


class ConnectionGate:
    """How many connections are being served, of at most ``limit`` (0: any number)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.served = 0

    def enter(self) -> bool:
        if self.limit and self.served >= self.limit:
            return False
        self.served += 1
        return True

    def leave(self) -> None:
        self.served -= 1


def _raw_error(status: int, reason: bytes, error: ApiError) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection."""
    body = json.dumps(error.body()).encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, reason, len(body))
    ) + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout and a connection limit."""

    def __init__(self, *args, limits: HttpLimits, gate: ConnectionGate, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._gate = gate
        self._served = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._served = self._gate.enter()
        if not self._served:
            # Read its head (under the head timeout), answer 503, close.
            self.app = _too_many_connections
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._served:
            self._served = False
            self._gate.leave()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request head arrived: it is the app's now

    def on_response_complete(self) -> None:
        self._arm()  # the next request's head (keep-alive) has the same time
        super().on_response_complete()  # a pipelined request disarms again

    def _unsupported_upgrade_warning(self) -> None:
        # No WebSockets here (ws="none"): the request is served as plain HTTP,
        # without a warning a client could repeat to flood the log.
        log.debug("ignored an Upgrade header from %s", self.client)

    def _arm(self) -> None:
        self._disarm()
        if self._limits.header_timeout_s:
            self._head_timer = self.loop.call_later(
                self._limits.header_timeout_s, self._head_timed_out
            )

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served
        pending, _ = self.conn.trailing_data
        if pending and self.conn.their_state is h11.IDLE:
            error = ApiError(
                408,
                f"the request head did not arrive within {self._limits.header_timeout_s:g} s",
                code="request_timeout",
            )
            self.transport.write(_raw_error(408, b"Request Timeout", error))
        self.transport.close()


async def _too_many_connections(scope, receive, send) -> None:
    error = ApiError(
        503,
        "the coordinator serves as many HTTP connections as it may; retry shortly",
        type_="service_unavailable_error",
        code="too_many_connections",
    )
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def http_server(
    app: FastAPI,
    address: str,
    *,
    ssl_files: tuple[str, str] | None = None,
    limits: HttpLimits = HttpLimits(),
) -> EmbeddedServer:
    """``ssl_files``: (certificate chain, key) paths to serve HTTPS."""
    host, _, port = address.rpartition(":")
    gate = ConnectionGate(limits.max_connections)
    config = uvicorn.Config(
        app,
        ssl_certfile=ssl_files[0] if ssl_files else None,
        ssl_keyfile=ssl_files[1] if ssl_files else None,
        host=host or "127.0.0.1",
        port=int(port),
        log_level="warning",
        lifespan="off",
        access_log=False,
        http=functools.partial(GuardedH11Protocol, limits=limits, gate=gate),
        ws="none",  # an upgrade would take the connection out of the limits' sight
        timeout_keep_alive=limits.idle_timeout_s or 365 * 86400.0,
    )
    return EmbeddedServer(config)
