"""What every edgefleet gRPC daemon serves besides its own API, and how it stops."""

from __future__ import annotations

import asyncio
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


def add_health_and_reflection(
    server: grpc.aio.Server, *service_names: str, reflect: bool = True
) -> health.aio.HealthServicer:
    """Standard grpc.health.v1 checking, and server reflection (grpcurl) when
    ``reflect``: a secure daemon lists its API only with ``--dev``."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflect:
        reflection.enable_server_reflection(
            (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    return health_servicer


async def set_serving(
    health_servicer: health.aio.HealthServicer, service_name: str, serving: bool
) -> None:
    """Report the daemon (overall and its service) SERVING or NOT_SERVING."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in ("", service_name):
        await health_servicer.set(service, status)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: the daemon's cue to shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop
