"""Shim emulator: drives cloud-api-adaptor exactly as containerd-shim-kata-v2 does.

- A new unix connection per hypervisor call; CreateVM without a deadline,
  StartVM with ``max(10 s, remote_hypervisor_timeout)`` (600 s by default).
- Every CreateVM carries the annotations the real shim always sends.
- After StartVM it dials ``agentSocketPath`` (retrying for ~30 s), calls
  ``grpc.Health/Check``, then ``CreateSandbox`` (300 s), ``GetGuestDetails``
  (memory block size and hotplug probe, as ``Sandbox.getAndStoreGuestDetails``), ``CreateContainer``,
  ``StartContainer`` and, for commands, ``ExecProcess`` / ``ReadStdout`` /
  ``ReadStderr`` / ``WaitProcess`` — the calls ``kubectl exec`` turns into.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from typing import Mapping

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from cloudadaptor.protocols import agent_pb2, health_pb2
from cloudadaptor.protocols import hypervisor_pb2 as hv
from cloudadaptor.retry import Backoff, retry_until
from cloudadaptor.ttrpc.client import Client
from cloudadaptor.ttrpc.errors import TtrpcError

HYPERVISOR = "hypervisor.Hypervisor"
AGENT = "grpc.AgentService"
REMOTE_HYPERVISOR_TIMEOUT = 600.0
AGENT_DIAL_TIMEOUT = 30.0
CREATE_SANDBOX_TIMEOUT = 300.0
_HV = "io.katacontainers.config.hypervisor."


def shim_annotations(pod_name: str, pod_namespace: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The annotation set the kata shim sends with CreateVM (its defaults)."""
    annotations = {
        "io.kubernetes.cri.sandbox-name": pod_name,
        "io.kubernetes.cri.sandbox-namespace": pod_namespace,
        _HV + "machine_type": "",
        _HV + "image": "",
        _HV + "default_vcpus": "1",
        _HV + "default_memory": "2048",
        _HV + "default_gpus": "0",
        _HV + "default_gpu_model": "",
        _HV + "cc_init_data": "",
    }
    annotations.update(extra or {})
    return annotations


class ShimEmulator:
    """The hypervisor side of the shim: one connection per call."""

    def __init__(self, socket_path: str, remote_hypervisor_timeout: float = REMOTE_HYPERVISOR_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.start_timeout = max(10.0, remote_hypervisor_timeout)

    async def _call(self, method: str, request: Message, response_cls: type[Message], timeout: float | None = None) -> Message:
        client = await Client.connect_unix(self.socket_path)
        try:
            return await client.call_message(HYPERVISOR, method, request, response_cls, timeout=timeout)
        finally:
            await client.close()

    async def version(self) -> str:
        reply = await self._call("Version", hv.VersionRequest(version="0.0.1"), hv.VersionResponse)
        return reply.version

    async def create_vm(self, sandbox_id: str, netns_path: str, annotations: Mapping[str, str]) -> str:
        reply = await self._call(
            "CreateVM",
            hv.CreateVMRequest(id=sandbox_id, annotations=dict(annotations), networkNamespacePath=netns_path),
            hv.CreateVMResponse,
        )
        if not reply.agentSocketPath:
            raise RuntimeError("CreateVM returned an empty agentSocketPath")  # the real shim fails here too
        return reply.agentSocketPath

    async def start_vm(self, sandbox_id: str) -> None:
        await self._call("StartVM", hv.StartVMRequest(id=sandbox_id), hv.StartVMResponse, timeout=self.start_timeout)

    async def stop_vm(self, sandbox_id: str) -> None:
        await self._call("StopVM", hv.StopVMRequest(id=sandbox_id), hv.StopVMResponse)


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


class AgentSession:
    """The shim's connection to the agent through ``agentSocketPath``."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @classmethod
    async def dial(cls, path: str, timeout: float = AGENT_DIAL_TIMEOUT) -> AgentSession:
        client = await retry_until(timeout, lambda: Client.connect_unix(path), backoff=Backoff(initial=0.05, maximum=1.0))
        return cls(client)

    async def close(self) -> None:
        await self.client.close()

    async def _agent(self, method: str, request: Message, response_cls: type[Message] = empty_pb2.Empty, timeout: float | None = None) -> Message:
        return await self.client.call_message(AGENT, method, request, response_cls, timeout=timeout)

    async def health_check(self) -> int:
        reply = await self.client.call_message("grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse)
        return reply.status

    async def create_sandbox(self, sandbox_id: str, hostname: str, dns: list[str] | None = None) -> None:
        request = agent_pb2.CreateSandboxRequest(hostname=hostname, sandbox_id=sandbox_id, dns=dns or ["nameserver 198.51.100.53"])
        await self._agent("CreateSandbox", request, timeout=CREATE_SANDBOX_TIMEOUT)

    async def guest_details(self) -> agent_pb2.GuestDetailsResponse:
        """GetGuestDetails as the shim asks it right after CreateSandbox (both flags set)."""
        request = agent_pb2.GuestDetailsRequest(mem_block_size=True, mem_hotplug_probe=True)
        reply = await self._agent("GetGuestDetails", request, agent_pb2.GuestDetailsResponse)
        assert isinstance(reply, agent_pb2.GuestDetailsResponse)
        return reply

    async def create_container(self, container_id: str, args: list[str], netns_path: str = "") -> None:
        spec = agent_pb2.Spec(Version="1.1.0", Process=agent_pb2.Process(Args=args, Cwd="/"), Root=agent_pb2.Root(Path="rootfs"))
        # The real shim passes the worker-side netns path; the forwarder in the VM
        # replaces it with the VM's podns.
        if netns_path:
            spec.Linux.Namespaces.add(Type="network", Path=netns_path)
        await self._agent("CreateContainer", agent_pb2.CreateContainerRequest(container_id=container_id, exec_id=container_id, OCI=spec))

    async def start_container(self, container_id: str) -> None:
        await self._agent("StartContainer", agent_pb2.StartContainerRequest(container_id=container_id))

    async def remove_container(self, container_id: str) -> None:
        await self._agent("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=container_id))

    async def destroy_sandbox(self) -> None:
        await self._agent("DestroySandbox", agent_pb2.DestroySandboxRequest())

    async def exec(self, container_id: str, args: list[str], timeout: float = 60.0) -> ExecResult:
        """ExecProcess, then drain stdout/stderr and wait, as the shim does for kubectl exec."""
        exec_id = uuid.uuid4().hex
        process = agent_pb2.Process(Args=args, Env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], Cwd="/")
        await self._agent("ExecProcess", agent_pb2.ExecProcessRequest(container_id=container_id, exec_id=exec_id, process=process))
        async with asyncio.timeout(timeout):
            stdout, stderr = await asyncio.gather(
                self._drain("ReadStdout", container_id, exec_id), self._drain("ReadStderr", container_id, exec_id)
            )
            waited = await self._agent(
                "WaitProcess", agent_pb2.WaitProcessRequest(container_id=container_id, exec_id=exec_id), agent_pb2.WaitProcessResponse
            )
        return ExecResult(waited.status, stdout, stderr)

    async def _drain(self, method: str, container_id: str, exec_id: str) -> bytes:
        chunks = []
        request = agent_pb2.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=32 * 1024)
        while True:
            try:
                reply = await self._agent(method, request, agent_pb2.ReadStreamResponse)
            except TtrpcError:
                break  # the agent reports end of stream as an error; so does the shim treat it
            if not reply.data:
                break
            chunks.append(reply.data)
        return b"".join(chunks)


@dataclass
class PodRun:
    """One pod started through the emulator (what the demo and e2e tests drive)."""

    sandbox_id: str
    agent_socket: str
    session: AgentSession
    container_id: str
    guest: agent_pb2.GuestDetailsResponse | None = None

    async def exec(self, args: list[str]) -> ExecResult:
        return await self.session.exec(self.container_id, args)


async def start_pod(shim: ShimEmulator, pod_name: str, pod_namespace: str, netns_path: str, sandbox_id: str | None = None,
                    annotations: Mapping[str, str] | None = None) -> tuple[PodRun, float, float]:
    """CreateVM → StartVM → dial agent → Health.Check → CreateSandbox → GetGuestDetails →
    CreateContainer(pause) → StartContainer. Returns the run and the
    CreateVM/StartVM durations in seconds. ``annotations`` add to (or replace) the shim's defaults."""
    loop = asyncio.get_running_loop()
    sandbox_id = sandbox_id or uuid.uuid4().hex + uuid.uuid4().hex
    began = loop.time()
    agent_socket = await shim.create_vm(sandbox_id, netns_path, shim_annotations(pod_name, pod_namespace, annotations))
    created = loop.time()
    try:
        await shim.start_vm(sandbox_id)
    except BaseException:
        # The shim tears a sandbox down with StopVM when StartVM fails.
        with contextlib.suppress(Exception):
            await shim.stop_vm(sandbox_id)
        raise
    started = loop.time()
    session = await AgentSession.dial(agent_socket)
    try:
        status = await session.health_check()
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"agent health is {status}, expected SERVING")
        await session.create_sandbox(sandbox_id, hostname=pod_name)
        guest = await session.guest_details()  # the real shim fails the sandbox when this fails
        container_id = sandbox_id  # the pause container carries the sandbox id
        await session.create_container(container_id, ["sleep", "infinity"], netns_path)
        await session.start_container(container_id)
    except BaseException:
        await session.close()
        raise
    return PodRun(sandbox_id, agent_socket, session, container_id, guest), created - began, started - created


async def stop_pod(shim: ShimEmulator, run: PodRun) -> None:
    """RemoveContainer, DestroySandbox, close the agent connection, StopVM."""
    with contextlib.suppress(TtrpcError, ConnectionError):
        await run.session.remove_container(run.container_id)
        await run.session.destroy_sandbox()
    await run.session.close()
    await shim.stop_vm(run.sandbox_id)
