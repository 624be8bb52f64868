"""The checked-in protobuf modules match protos/, and field numbers match docs/ARCHITECTURE.md ("Wire facts")."""

from __future__ import annotations

from cloudadaptor.protocols import agent_pb2, health_pb2, hypervisor_pb2, podvminfo_pb2, ttrpc_pb2
from cloudadaptor.protocols.generate import drift


def test_generated_modules_match_protos():
    stale = drift()
    assert stale == [], f"regenerate with `make protos`; out of date: {stale}"


def _numbers(message) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_wire_field_numbers():
    assert _numbers(ttrpc_pb2.Request) == {"service": 1, "method": 2, "payload": 3, "timeout_nano": 4, "metadata": 5}
    assert _numbers(ttrpc_pb2.Response) == {"status": 1, "payload": 2}
    assert _numbers(ttrpc_pb2.Status) == {"code": 1, "message": 2, "details": 3}
    assert _numbers(hypervisor_pb2.CreateVMRequest) == {"id": 1, "annotations": 2, "networkNamespacePath": 3}
    assert _numbers(hypervisor_pb2.CreateVMResponse) == {"agentSocketPath": 1}
    assert _numbers(podvminfo_pb2.GetInfoRequest) == {"PodName": 1, "PodNamespace": 2, "Wait": 3}
    assert _numbers(podvminfo_pb2.GetInfoResponse) == {"VMID": 1}
    assert _numbers(health_pb2.VersionCheckResponse) == {"grpc_version": 1, "agent_version": 2}
    assert _numbers(agent_pb2.CreateContainerRequest)["OCI"] == 6
    assert _numbers(agent_pb2.Spec)["Linux"] == 8
    assert _numbers(agent_pb2.Linux) == {"CgroupsPath": 5, "Namespaces": 6}
    assert _numbers(agent_pb2.CreateSandboxRequest)["dns"] == 2
    assert _numbers(agent_pb2.GuestDetailsRequest) == {"mem_block_size": 1, "mem_hotplug_probe": 2}
    assert _numbers(agent_pb2.GuestDetailsResponse) == {
        "mem_block_size_bytes": 1, "agent_details": 2, "support_mem_hotplug_probe": 3}
    assert _numbers(agent_pb2.AgentDetails) == {
        "version": 1, "init_daemon": 2, "device_handlers": 3, "storage_handlers": 4,
        "supports_seccomp": 5, "extra_features": 6}
    assert _numbers(agent_pb2.ReadStreamRequest) == {"container_id": 1, "exec_id": 2, "len": 3}


def test_service_names_are_the_shims():
    assert hypervisor_pb2.DESCRIPTOR.services_by_name["Hypervisor"].full_name == "hypervisor.Hypervisor"
    assert podvminfo_pb2.DESCRIPTOR.services_by_name["PodVMInfo"].full_name == "podvminfo.PodVMInfo"
    assert health_pb2.DESCRIPTOR.services_by_name["Health"].full_name == "grpc.Health"
    assert agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name == "grpc.AgentService"
