"""The hypervisor service: wire messages in, lifecycle calls, wire messages out.

One method table serves both bindings — ttrpc on the unix socket the shim
dials, and gRPC on the optional endpoint — so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from google.protobuf.message import Message

from cloudadaptor import __version__, logcontext
from cloudadaptor.adaptor.errors import LifecycleError
from cloudadaptor.adaptor.hooks import StartObserver
from cloudadaptor.adaptor.lifecycle import SandboxLifecycle
from cloudadaptor.adaptor.validation import ANN_POD_NAME, ANN_POD_NAMESPACE
from cloudadaptor.protocols import hypervisor_pb2 as hv
from cloudadaptor.protocols import podvminfo_pb2 as pvi
from cloudadaptor.ttrpc.errors import Code, TtrpcError
from cloudadaptor.ttrpc.server import Server, unary

log = logging.getLogger(__name__)

HYPERVISOR_SERVICE = "hypervisor.Hypervisor"
PODVMINFO_SERVICE = "podvminfo.PodVMInfo"


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    request: type[Message]
    response: type[Message]
    call: Callable[[Any], Awaitable[Message]]


class HypervisorService:
    def __init__(self, lifecycle: SandboxLifecycle, starts: StartObserver | None = None) -> None:
        self.lifecycle = lifecycle
        self.starts = starts  # told how each StartVM ended (Pod events)

    async def version(self, request: hv.VersionRequest) -> hv.VersionResponse:
        return hv.VersionResponse(version=__version__)

    async def create_vm(self, request: hv.CreateVMRequest) -> hv.CreateVMResponse:
        path = await self.lifecycle.create(request.id, dict(request.annotations), request.networkNamespacePath)
        return hv.CreateVMResponse(agentSocketPath=path)

    async def start_vm(self, request: hv.StartVMRequest) -> hv.StartVMResponse:
        began = time.monotonic()
        try:
            await self.lifecycle.start(request.id)
        except LifecycleError as exc:
            sandbox = self.lifecycle.store.get(request.id)
            if self.starts is not None and sandbox is not None:
                await self.starts.vm_failed(request.id, sandbox.pod_namespace, sandbox.pod_name, exc.message, exc.console)
            raise
        sandbox = self.lifecycle.store.get(request.id)
        if self.starts is not None and sandbox is not None:
            await self.starts.vm_ready(request.id, sandbox.pod_namespace, sandbox.pod_name, sandbox.instance_id,
                                       time.monotonic() - began)
        return hv.StartVMResponse()

    async def stop_vm(self, request: hv.StopVMRequest) -> hv.StopVMResponse:
        await self.lifecycle.stop(request.id)
        return hv.StopVMResponse()

    async def get_info(self, request: pvi.GetInfoRequest) -> pvi.GetInfoResponse:
        vm_id = await self.lifecycle.vm_id_of_pod(request.PodNamespace, request.PodName, request.Wait)
        return pvi.GetInfoResponse(VMID=vm_id)

    def methods(self) -> list[Method]:
        return [
            Method(HYPERVISOR_SERVICE, "Version", hv.VersionRequest, hv.VersionResponse, self._counted("Version", self.version)),
            Method(HYPERVISOR_SERVICE, "CreateVM", hv.CreateVMRequest, hv.CreateVMResponse, self._counted("CreateVM", self.create_vm)),
            Method(HYPERVISOR_SERVICE, "StartVM", hv.StartVMRequest, hv.StartVMResponse, self._counted("StartVM", self.start_vm)),
            Method(HYPERVISOR_SERVICE, "StopVM", hv.StopVMRequest, hv.StopVMResponse, self._counted("StopVM", self.stop_vm)),
            Method(PODVMINFO_SERVICE, "GetInfo", pvi.GetInfoRequest, pvi.GetInfoResponse, self._counted("GetInfo", self.get_info)),
        ]

    def _counted(self, name: str, call: Callable[[Any], Awaitable[Message]]) -> Callable[[Any], Awaitable[Message]]:
        """``call``, reporting its status code to the lifecycle's recorder (both bindings share it)."""
        recorder = self.lifecycle.recorder

        async def counted(request: Any) -> Message:
            with logcontext.bind(**self._log_fields(request)):
                try:
                    response = await call(request)
                except LifecycleError as exc:
                    recorder.call_done(name, exc.code.name)
                    raise
                except asyncio.CancelledError:
                    recorder.call_done(name, Code.CANCELLED.name)
                    raise
                except Exception:
                    recorder.call_done(name, Code.INTERNAL.name)
                    raise
                recorder.call_done(name, Code.OK.name)
                return response

        return counted

    def _log_fields(self, request: Any) -> dict[str, str]:
        """Sandbox id, pod and instance id of a call, for structured logs (``logcontext``)."""
        sandbox_id = str(getattr(request, "id", "") or "")
        annotations = getattr(request, "annotations", None)
        if annotations and annotations.get(ANN_POD_NAME):
            return {"sandbox_id": sandbox_id, "pod": f"{annotations.get(ANN_POD_NAMESPACE, '')}/{annotations[ANN_POD_NAME]}"}
        pod = self.lifecycle.store.pod_of(sandbox_id) if sandbox_id else None
        if pod is None:
            return {"sandbox_id": sandbox_id}
        return {"sandbox_id": sandbox_id, "pod": f"{pod[0]}/{pod[1]}", "instance_id": pod[2]}

    def register_ttrpc(self, server: Server) -> None:
        for method in self.methods():
            server.register(method.service, method.name, unary(method.request, _ttrpc_call(method)))


def _ttrpc_call(method: Method) -> Callable[[Message, Any], Awaitable[Message]]:
    async def call(request: Message, ctx: Any) -> Message:
        try:
            return await method.call(request)
        except LifecycleError as exc:
            log.warning("%s/%s: %s: %s", method.service, method.name, exc.code.name, exc.message)
            raise TtrpcError(exc.code, exc.message) from None
        except TtrpcError:
            raise
        except Exception as exc:
            log.exception("%s/%s failed", method.service, method.name)
            raise TtrpcError(Code.INTERNAL, f"{method.name}: internal error: {type(exc).__name__}: {exc}") from None

    return call
