"""The hypervisor service over gRPC (grpcio), with the standard health service."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cloudadaptor.adaptor.errors import LifecycleError
from cloudadaptor.adaptor.service import HypervisorService, Method

log = logging.getLogger(__name__)


class GrpcBinding:
    """A grpc.aio server on ``endpoint`` ("host:port"); ``port`` is the bound port."""

    def __init__(self, service: HypervisorService, endpoint: str) -> None:
        self.endpoint = endpoint
        self.port = 0
        self._server = grpc.aio.server()
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for method in service.methods():
            by_service.setdefault(method.service, {})[method.name] = grpc.unary_unary_rpc_method_handler(
                _grpc_call(method),
                request_deserializer=method.request.FromString,
                response_serializer=method.response.SerializeToString,
            )
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(name, handlers) for name, handlers in by_service.items()]
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._service_names = [*by_service, ""]

    async def start(self) -> None:
        self.port = self._server.add_insecure_port(self.endpoint)
        if self.port == 0:
            raise OSError(f"GRPC_ENDPOINT {self.endpoint!r}: cannot listen there")
        await self._server.start()
        for name in self._service_names:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC hypervisor service listening on %s", self.endpoint)

    async def close(self, grace: float = 1.0) -> None:
        for name in self._service_names:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(grace)


def _grpc_call(method: Method) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method.call(request)
        except LifecycleError as exc:
            log.warning("gRPC %s/%s: %s: %s", method.service, method.name, exc.code.name, exc.message)
            await context.abort(grpc.StatusCode[exc.code.name], exc.message)
        except Exception as exc:
            log.exception("gRPC %s/%s failed", method.service, method.name)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method.name}: internal error: {type(exc).__name__}: {exc}")

    return call

