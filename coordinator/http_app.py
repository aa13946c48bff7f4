"""The coordinator's HTTP listener: the OpenAI-compatible API (``/v1``),
health, readiness and Prometheus metrics.

An ASGI app (FastAPI, on Starlette) served by uvicorn inside the
coordinator's event loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coordinator import openai_api, responses_api
from coordinator.metrics import CoordinatorMetrics
from coordinator.openai_common import HttpServices, authorize_metrics
from edgefleet import __version__
from edgefleet.errors import Unavailable


def build_app(
    services: HttpServices,
    *,
    metrics: CoordinatorMetrics,
    etcd_ping: Callable[[], Awaitable[None]],
    dev: bool = True,
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
    openai_api.register(app)
    responses_api.register(app)
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


def http_server(
    app: FastAPI, address: str, *, ssl_files: tuple[str, str] | None = None
) -> EmbeddedServer:
    """``ssl_files``: (certificate chain, key) paths to serve HTTPS."""
    host, _, port = address.rpartition(":")
    config = uvicorn.Config(
        app,
        ssl_certfile=ssl_files[0] if ssl_files else None,
        ssl_keyfile=ssl_files[1] if ssl_files else None,
        host=host or "127.0.0.1",
        port=int(port),
        log_level="warning",
        lifespan="off",
        access_log=False,
    )
    return EmbeddedServer(config)
