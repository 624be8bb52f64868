"""The hypervisor service over its two bindings: ttrpc (the shim's) and gRPC."""

from __future__ import annotations

import os
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2 as grpc_health_pb2
from grpc_health.v1 import health_pb2_grpc

from cloudadaptor import __version__
from cloudadaptor.adaptor.grpc_binding import GrpcBinding
from cloudadaptor.adaptor.service import HypervisorService
from cloudadaptor.protocols import health_pb2
from cloudadaptor.protocols import hypervisor_pb2 as hv
from cloudadaptor.protocols import podvminfo_pb2 as pvi
from cloudadaptor.dev.shim import AgentSession, ShimEmulator, shim_annotations
from cloudadaptor.ttrpc.client import Client
from cloudadaptor.ttrpc.errors import Code, TtrpcError
from cloudadaptor.ttrpc.server import Server

SANDBOX = "c0ffee" * 10


@pytest.fixture
async def service(lifecycle_factory, agent):
    return HypervisorService(lifecycle_factory(agent_port=agent.port, proxy_timeout=2.0))


@pytest.fixture
async def socket_path(service, short_dir):
    server = Server()
    service.register_ttrpc(server)
    path = str(short_dir / "run" / "hypervisor.sock")
    await server.serve_unix(path)
    yield path
    await server.close()


async def test_shim_call_pattern_over_ttrpc(socket_path, netns_file, provider):
    shim = ShimEmulator(socket_path)
    assert await shim.version() == __version__
    agent_socket = await shim.create_vm(SANDBOX, netns_file, shim_annotations("web", "prod"))
    await shim.start_vm(SANDBOX)
    session = await AgentSession.dial(agent_socket)
    assert await session.health_check() == health_pb2.HealthCheckResponse.SERVING
    await session.close()
    await shim.stop_vm(SANDBOX)
    assert provider.instances == {}


async def test_errors_reach_the_shim_with_status_codes(socket_path, netns_file):
    shim = ShimEmulator(socket_path)
    with pytest.raises(TtrpcError) as err:
        await shim.create_vm("../../etc", netns_file, shim_annotations("web", "prod"))
    assert err.value.code == Code.INVALID_ARGUMENT and "'/' or '..'" in err.value.message
    with pytest.raises(TtrpcError) as err:
        await shim.create_vm(SANDBOX, "/nonexistent/netns", shim_annotations("web", "prod"))
    assert err.value.code == Code.INVALID_ARGUMENT and "/nonexistent/netns" in err.value.message
    with pytest.raises(TtrpcError) as err:
        await shim.start_vm("unknown")
    assert err.value.code == Code.NOT_FOUND
    with pytest.raises(TtrpcError) as err:
        await shim.stop_vm("unknown")
    assert err.value.code == Code.NOT_FOUND


async def test_getinfo_over_ttrpc(socket_path, netns_file):
    shim = ShimEmulator(socket_path)
    await shim.create_vm(SANDBOX, netns_file, shim_annotations("web", "prod"))
    await shim.start_vm(SANDBOX)
    async with await Client.connect_unix(socket_path) as client:
        reply = await client.call_message("podvminfo.PodVMInfo", "GetInfo", pvi.GetInfoRequest(PodName="web", PodNamespace="prod"), pvi.GetInfoResponse)
        assert reply.VMID == "i-fake-1"
        with pytest.raises(TtrpcError) as err:
            await client.call_message("podvminfo.PodVMInfo", "GetInfo", pvi.GetInfoRequest(PodName="x", PodNamespace="prod", Wait=True), pvi.GetInfoResponse, timeout=0.2)
        assert err.value.code == Code.DEADLINE_EXCEEDED
    await shim.stop_vm(SANDBOX)


async def test_grpc_binding_serves_the_same_service_and_health(service, netns_file, provider):
    binding = GrpcBinding(service, "127.0.0.1:0")
    await binding.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{binding.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", "hypervisor.Hypervisor"):
                reply = await health.Check(grpc_health_pb2.HealthCheckRequest(service=name))
                assert reply.status == grpc_health_pb2.HealthCheckResponse.SERVING

            def rpc(method, response):
                return channel.unary_unary(f"/hypervisor.Hypervisor/{method}", request_serializer=lambda m: m.SerializeToString(), response_deserializer=response.FromString)

            assert (await rpc("Version", hv.VersionResponse)(hv.VersionRequest())).version == __version__
            created = await rpc("CreateVM", hv.CreateVMResponse)(hv.CreateVMRequest(id=SANDBOX, annotations=shim_annotations("web", "prod"), networkNamespacePath=netns_file))
            assert created.agentSocketPath.endswith(f"/{SANDBOX}/agent.ttrpc")
            await rpc("StartVM", hv.StartVMResponse)(hv.StartVMRequest(id=SANDBOX))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rpc("StartVM", hv.StartVMResponse)(hv.StartVMRequest(id="missing"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "missing" in err.value.details()
            await rpc("StopVM", hv.StopVMResponse)(hv.StopVMRequest(id=SANDBOX))
            assert provider.instances == {}
    finally:
        await binding.close()


def _node_namespace_spellings() -> list[str]:
    """Paths naming the node's (here: this process's) network namespace, spelled differently."""
    return ["/proc/self/ns/net", f"/proc/{os.getpid()}/ns/net", "/proc/thread-self/ns/net"]


async def test_an_independent_clients_createvm_with_the_nodes_namespace_is_refused(socket_path, provider):
    for path in _node_namespace_spellings():
        async with await Client.connect_unix(socket_path) as client:
            request = hv.CreateVMRequest(id=SANDBOX, annotations={}, networkNamespacePath=path)
            with pytest.raises(TtrpcError) as err:
                await client.call_message("hypervisor.Hypervisor", "CreateVM", request, hv.CreateVMResponse)
        assert err.value.code == Code.INVALID_ARGUMENT, (path, err.value)
        assert path in err.value.message and "not a pod's own network namespace" in err.value.message, err.value.message
    assert provider.instances == {}


async def test_a_bind_mount_of_the_nodes_namespace_is_refused_by_identity(private_ns, socket_path, short_dir, provider):
    target = short_dir / "looks-like-a-pod-netns"
    target.touch()
    # Test code may use mount(8); the bind mount lives in the test's private mount namespace.
    subprocess.run(["mount", "--bind", "/proc/self/ns/net", str(target)], check=True)
    try:
        with pytest.raises(TtrpcError) as err:
            await ShimEmulator(socket_path).create_vm(SANDBOX, str(target), shim_annotations("web", "prod"))
        assert err.value.code == Code.INVALID_ARGUMENT and str(target) in err.value.message, err.value
        assert "adaptor's own network namespace" in err.value.message, err.value.message
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert provider.instances == {}
