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


class _Unparsed:
    def __init__(self, problem: str) -> None:
        self.problem = problem


async def _refuse(context, unparsed: _Unparsed) -> None:
    from edgefleet.errors import InvalidArgument, Reason, abort_with

    await abort_with(
        context,
        InvalidArgument(
            f"the request is not a valid message: {unparsed.problem}",
            reason=Reason.INVALID_REQUEST,
        ),
    )


class RequestParseGuard(grpc.aio.ServerInterceptor):
    """A request that does not parse (bad UTF-8, a corrupt field) is the
    caller's fault: INVALID_ARGUMENT with INVALID_REQUEST, not grpc's UNKNOWN."""

    async def intercept_service(self, continuation, handler_call_details):
        from google.protobuf.message import DecodeError

        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def lenient(raw: bytes):
            try:
                return parse(raw)
            except DecodeError as exc:
                return _Unparsed(str(exc))

        kwargs = {
            "request_deserializer": lenient,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                if isinstance(request, _Unparsed):
                    return await _refuse(context, request)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
        if handler.unary_stream:
            inner = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, _Unparsed):
                    await _refuse(context, request)
                    return
                async for reply in inner(request, context):
                    yield reply

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
        inner = handler.stream_stream or handler.stream_unary

        async def checked(requests, context):
            async for request in requests:
                if isinstance(request, _Unparsed):
                    await _refuse(context, request)
                yield request

        if handler.stream_unary:

            async def stream_unary(requests, context):
                return await inner(checked(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)

        async def stream_stream(requests, context):
            async for reply in inner(checked(requests, context), context):
                yield reply

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)
