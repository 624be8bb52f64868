"""The hypervisor service over gRPC (grpcio), with the standard health service.

CreateVM/StartVM/StopVM start VMs at the cluster's expense and take a netns
path, so the binding serves only where nobody else can reach it — a loopback
address or a unix socket — or with mutual TLS: clients must present a
certificate signed by the configured client CA (``GrpcTls``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cloudadaptor.adaptor.errors import LifecycleError
from cloudadaptor.adaptor.service import HypervisorService, Method
from cloudadaptor.config_security import endpoint_is_local

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrpcTls:
    """PEM files: the server's certificate and key, and the CA every client certificate must chain to."""

    cert: Path
    key: Path
    client_ca: Path

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require and verify a client certificate; ``OSError`` names an unreadable file."""
        pem = {name: Path(path).read_bytes() for name, path in (("cert", self.cert), ("key", self.key), ("ca", self.client_ca))}
        return grpc.ssl_server_credentials([(pem["key"], pem["cert"])], root_certificates=pem["ca"], require_client_auth=True)


class GrpcBinding:
    """A grpc.aio server on ``endpoint`` ("host:port" or "unix:/path"); ``port`` is the bound port.

    Refuses (``ValueError``, one line) a non-loopback TCP endpoint without ``tls``.
    """

    def __init__(self, service: HypervisorService, endpoint: str, tls: GrpcTls | None = None) -> None:
        if tls is None and not endpoint_is_local(endpoint):
            raise ValueError(
                f"GRPC_ENDPOINT {endpoint!r} is not loopback: set GRPC_TLS_CERT, GRPC_TLS_KEY and GRPC_TLS_CLIENT_CA"
                " (mutual TLS) or use 127.0.0.1:PORT or unix:/path"
            )
        self.endpoint = endpoint
        self.tls = tls
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
        if self.tls is None:
            self.port = self._server.add_insecure_port(self.endpoint)
        else:
            self.port = self._server.add_secure_port(self.endpoint, self.tls.credentials())
        if self.port == 0:
            raise OSError(f"GRPC_ENDPOINT {self.endpoint!r}: cannot listen there")
        await self._server.start()
        for name in self._service_names:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC hypervisor service listening on %s (%s)", self.endpoint, "mutual TLS" if self.tls else "local only")

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

