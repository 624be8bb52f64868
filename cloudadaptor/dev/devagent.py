"""Development agent: speaks kata-agent's ttrpc services and really runs commands.

It stands in for kata-agent the way moto stands in for EC2 (docs/ARCHITECTURE.md, "How we test"): a
ttrpc server on a unix socket serving ``grpc.Health`` and the part of
``grpc.AgentService`` a pod's life uses. Container processes really run, in
the container's network namespace (``OCI.Linux.Namespaces`` entry of type
``network``; in a pod VM that is ``/run/netns/podns``, appended by the
forwarder) — and nothing else is isolated: no rootfs, users, cgroups or PID
namespace. Each process starts as ``cloudadaptor.dev.nsexec`` starts it (a
fork that enters the netns and execs the command; no interpreter per process) in
its own session, so signals and kills reach its whole process group.

Behaviour worth knowing (chosen to match what the kata shim expects):

- **End of stream.** ReadStdout/ReadStderr block until data or end of
  stream. At the end they answer an error (INTERNAL, "read meet eof"), as
  kata-agent 3.x does; the Go shim's ``readProcessStream`` turns any error
  into ``(0, err)`` and its ``io.Copy`` ends the stream there. After the
  process exited, output still buffered is drained for at most 0.5 s (a
  background child holding the pipe open cannot block the stream forever).
- **Exit status.** WaitProcess answers the exit code, or 128+N for a process
  killed by signal N. Exec records stay until RemoveContainer, so late reads
  after WaitProcess still see buffered output.
- **IDs.** ``exec_id`` "" (or the CreateContainer exec id) names the
  container's init process. Unknown container or exec: NOT_FOUND; a second
  container or exec with the same id: ALREADY_EXISTS.
- **Init process.** It starts at StartContainer. A container without
  ``Process.Args``, or whose command is ``/pause``, runs a pause process.
  A command that cannot be found fails StartContainer/ExecProcess (INTERNAL,
  runc's wording). A ``Cwd`` that does not exist here falls back to ``/``.
- **Signals.** SIGKILL to a container's init kills all its processes (as the
  death of a PID namespace's init would). Signalling an exited process is
  success.
- **Teardown.** RemoveContainer kills the container's processes (with their
  process groups, so background children too); DestroySandbox kills
  everything but keeps serving (StopVM deletes the VM next). SIGTERM or
  SIGINT to the agent kills everything and exits. Every child is reaped.
- **Not modelled.** Terminal (a pty), users/groups (``string_user``),
  storages, devices, rootfs: processes run as the agent's user on its files.

    python -m cloudadaptor.dev.devagent --socket /run/kata-containers/agent.sock
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

from google.protobuf import empty_pb2

from cloudadaptor import __version__
from cloudadaptor.protocols import agent_pb2, health_pb2
from cloudadaptor.dev.devprocess import BlockedCalls, Process, read_or_drain, signal_group, spawn
from cloudadaptor.ttrpc.errors import Code, TtrpcError
from cloudadaptor.ttrpc.server import CallContext, Server, unary

log = logging.getLogger("cloudadaptor.devagent")

AGENT_SERVICE = "grpc.AgentService"
HEALTH_SERVICE = "grpc.Health"
AGENT_VERSION = f"devagent {__version__}"
EOF_MESSAGE = "read meet eof"
DEFAULT_READ = 32 * 1024
MAX_READ = 1024 * 1024  # stays well under the 4 MiB ttrpc message limit
KILL_WAIT = 5.0
# Where kata-agent reads the guest's memory facts (rpc.rs get_memory_info): the block size as hex,
# and hotplug-by-probe support as the probe file's existence.
MEMORY_BLOCK_SIZE_PATH = "/sys/devices/system/memory/block_size_bytes"
MEMORY_HOTPLUG_PROBE_PATH = "/sys/devices/system/memory/probe"
# kata-agent 3.x answers an empty device-handler list (rpc.rs get_agent_details); the development
# agent has no devices or storages either, so both lists stay empty rather than claim support.
DEVICE_HANDLERS: tuple[str, ...] = ()
STORAGE_HANDLERS: tuple[str, ...] = ()


@dataclass(eq=False)
class _Container:
    id: str
    init_exec_id: str
    spec: agent_pb2.Spec
    netns: str | None
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)

    def processes(self) -> list[Process]:
        return [self.init, *self.execs.values()]


def network_namespace(spec: agent_pb2.Spec) -> str | None:
    """The path of the spec's ``network`` namespace (the last one listed), or None."""
    path = None
    for ns in spec.Linux.Namespaces:
        if ns.Type == "network" and ns.Path:
            path = ns.Path
    return path


def memory_block_size(path: str) -> int:
    """The memory block size in bytes from ``path`` (hex, as sysfs writes it); 0 when the file is
    absent (kata-agent does the same); INTERNAL when it cannot be parsed."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return 0
    try:
        return int(text, 16)
    except ValueError:
        raise TtrpcError(Code.INTERNAL, f"invalid memory block size in {path}: {text[:32]!r}") from None


class DevAgent:
    """The agent's state and RPC implementations; ``register`` binds them to a server."""

    def __init__(self) -> None:
        self.containers: dict[str, _Container] = {}
        self.blocked = BlockedCalls()
        self.sandbox_id: str | None = None
        self.hostname: str | None = None

    def register(self, server: Server) -> None:
        server.register(HEALTH_SERVICE, "Check", unary(health_pb2.CheckRequest, self.check))
        server.register(HEALTH_SERVICE, "Version", unary(health_pb2.CheckRequest, self.version))
        methods = {
            "CreateSandbox": (agent_pb2.CreateSandboxRequest, self.create_sandbox),
            "DestroySandbox": (agent_pb2.DestroySandboxRequest, self.destroy_sandbox),
            "GetGuestDetails": (agent_pb2.GuestDetailsRequest, self.get_guest_details),
            "CreateContainer": (agent_pb2.CreateContainerRequest, self.create_container),
            "StartContainer": (agent_pb2.StartContainerRequest, self.start_container),
            "RemoveContainer": (agent_pb2.RemoveContainerRequest, self.remove_container),
            "ExecProcess": (agent_pb2.ExecProcessRequest, self.exec_process),
            "SignalProcess": (agent_pb2.SignalProcessRequest, self.signal_process),
            "WaitProcess": (agent_pb2.WaitProcessRequest, self.wait_process),
            "WriteStdin": (agent_pb2.WriteStreamRequest, self.write_stdin),
            "CloseStdin": (agent_pb2.CloseStdinRequest, self.close_stdin),
            "ReadStdout": (agent_pb2.ReadStreamRequest, self.read_stdout),
            "ReadStderr": (agent_pb2.ReadStreamRequest, self.read_stderr),
        }
        for method, (request_cls, fn) in methods.items():
            server.register(AGENT_SERVICE, method, unary(request_cls, fn))

    # ------------------------------------------------------------------ health

    async def check(self, req: health_pb2.CheckRequest, ctx: CallContext) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def version(self, req: health_pb2.CheckRequest, ctx: CallContext) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(grpc_version=__version__, agent_version=AGENT_VERSION)

    # ----------------------------------------------------------------- sandbox

    async def create_sandbox(self, req: agent_pb2.CreateSandboxRequest, ctx: CallContext) -> empty_pb2.Empty:
        self.sandbox_id = req.sandbox_id or self.sandbox_id
        self.hostname = req.hostname
        log.info("sandbox %s created (hostname %r, dns %s)", req.sandbox_id, req.hostname, list(req.dns))
        return empty_pb2.Empty()

    async def destroy_sandbox(self, req: agent_pb2.DestroySandboxRequest, ctx: CallContext) -> empty_pb2.Empty:
        await self.kill_everything()
        log.info("sandbox %s destroyed", self.sandbox_id)
        return empty_pb2.Empty()

    async def get_guest_details(self, req: agent_pb2.GuestDetailsRequest, ctx: CallContext) -> agent_pb2.GuestDetailsResponse:
        """As kata-agent: memory facts only when asked, agent details always."""
        reply = agent_pb2.GuestDetailsResponse(agent_details=agent_pb2.AgentDetails(
            version=AGENT_VERSION, init_daemon=os.getpid() == 1,
            device_handlers=DEVICE_HANDLERS, storage_handlers=STORAGE_HANDLERS, supports_seccomp=False))
        if req.mem_block_size:
            reply.mem_block_size_bytes = memory_block_size(MEMORY_BLOCK_SIZE_PATH)
        if req.mem_hotplug_probe:
            reply.support_mem_hotplug_probe = os.path.exists(MEMORY_HOTPLUG_PROBE_PATH)
        return reply

    async def kill_everything(self) -> None:
        """Kill and reap every process of every container; forget the containers."""
        containers = list(self.containers.values())
        self.containers.clear()
        await asyncio.gather(*(self._kill_container(c) for c in containers))

    # -------------------------------------------------------------- containers

    async def create_container(self, req: agent_pb2.CreateContainerRequest, ctx: CallContext) -> empty_pb2.Empty:
        cid = req.container_id
        if not cid:
            raise TtrpcError(Code.INVALID_ARGUMENT, "container_id is empty")
        if cid in self.containers:
            raise TtrpcError(Code.ALREADY_EXISTS, f"container {cid} already exists")
        netns = network_namespace(req.OCI)
        if netns is not None and not os.path.exists(netns):
            raise TtrpcError(Code.INVALID_ARGUMENT, f"network namespace {netns} does not exist")
        process = req.OCI.Process
        args = list(process.Args)
        if not args or args[0] == "/pause":
            args = []  # a pause process
        init = Process(cid, req.exec_id or cid, args, list(process.Env), process.Cwd, netns)
        spec = agent_pb2.Spec()
        spec.CopyFrom(req.OCI)
        container = _Container(cid, req.exec_id or cid, spec, netns, init)
        self.containers[cid] = container
        log.info("container %s created (netns %s, args %s)", cid, netns, args or "<pause>")
        return empty_pb2.Empty()

    async def start_container(self, req: agent_pb2.StartContainerRequest, ctx: CallContext) -> empty_pb2.Empty:
        container = self._container(req.container_id)
        if container.init.started.is_set():
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {container.id} is already started")
        await spawn(container.init)
        return empty_pb2.Empty()

    async def remove_container(self, req: agent_pb2.RemoveContainerRequest, ctx: CallContext) -> empty_pb2.Empty:
        container = self._container(req.container_id)
        del self.containers[container.id]
        await self._kill_container(container)
        log.info("container %s removed", container.id)
        return empty_pb2.Empty()

    # --------------------------------------------------------------- processes

    async def exec_process(self, req: agent_pb2.ExecProcessRequest, ctx: CallContext) -> empty_pb2.Empty:
        container = self._container(req.container_id)
        eid = req.exec_id
        if not eid:
            raise TtrpcError(Code.INVALID_ARGUMENT, "exec_id is empty")
        if eid in container.execs or eid == container.init_exec_id:
            raise TtrpcError(Code.ALREADY_EXISTS, f"exec {eid} already exists in container {container.id}")
        args = list(req.process.Args)
        if not args:
            raise TtrpcError(Code.INVALID_ARGUMENT, "process.Args is empty")
        process = Process(container.id, eid, args, list(req.process.Env), req.process.Cwd, container.netns)
        await spawn(process)
        container.execs[eid] = process
        return empty_pb2.Empty()

    async def signal_process(self, req: agent_pb2.SignalProcessRequest, ctx: CallContext) -> empty_pb2.Empty:
        container = self._container(req.container_id)
        process = self._process(req.container_id, req.exec_id)
        sig = req.signal
        targets = container.processes() if process is container.init and sig == signal.SIGKILL else [process]
        for target in targets:
            signal_group(target, sig)
        return empty_pb2.Empty()

    async def wait_process(self, req: agent_pb2.WaitProcessRequest, ctx: CallContext) -> agent_pb2.WaitProcessResponse:
        process = self._process(req.container_id, req.exec_id)
        async with self.blocked.at("wait"):
            await process.exited.wait()
        if process.status is None:
            raise TtrpcError(Code.NOT_FOUND, f"process {process.exec_id} was removed before it ran")
        return agent_pb2.WaitProcessResponse(status=process.status)

    async def write_stdin(self, req: agent_pb2.WriteStreamRequest, ctx: CallContext) -> agent_pb2.WriteStreamResponse:
        process = await self._running(req.container_id, req.exec_id)
        stdin = process.proc.stdin if process.proc else None
        if stdin is None or stdin.is_closing():
            raise TtrpcError(Code.FAILED_PRECONDITION, f"stdin of {process.exec_id} is closed")
        async with process.stdin_lock:
            if not req.data:  # an empty write closes stdin, as kata-agent does
                stdin.close()
                return agent_pb2.WriteStreamResponse(len=0)
            try:
                stdin.write(req.data)
                await stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise TtrpcError(Code.INTERNAL, f"write to stdin of {process.exec_id}: {exc}") from None
        return agent_pb2.WriteStreamResponse(len=len(req.data))

    async def close_stdin(self, req: agent_pb2.CloseStdinRequest, ctx: CallContext) -> empty_pb2.Empty:
        process = await self._running(req.container_id, req.exec_id)
        if process.proc is not None and process.proc.stdin is not None:
            async with process.stdin_lock:
                process.proc.stdin.close()
        return empty_pb2.Empty()

    async def read_stdout(self, req: agent_pb2.ReadStreamRequest, ctx: CallContext) -> agent_pb2.ReadStreamResponse:
        return await self._read(req, stdout=True)

    async def read_stderr(self, req: agent_pb2.ReadStreamRequest, ctx: CallContext) -> agent_pb2.ReadStreamResponse:
        return await self._read(req, stdout=False)

    async def _read(self, req: agent_pb2.ReadStreamRequest, stdout: bool) -> agent_pb2.ReadStreamResponse:
        process = await self._running(req.container_id, req.exec_id)
        assert process.proc is not None
        stream = process.proc.stdout if stdout else process.proc.stderr
        size = min(req.len or DEFAULT_READ, MAX_READ)
        async with process.stdout_lock if stdout else process.stderr_lock:
            data = await read_or_drain(stream, size, process.exited)
        if not data:
            raise TtrpcError(Code.INTERNAL, EOF_MESSAGE)
        return agent_pb2.ReadStreamResponse(data=data)

    # ----------------------------------------------------------------- helpers

    def _container(self, cid: str) -> _Container:
        try:
            return self.containers[cid]
        except KeyError:
            raise TtrpcError(Code.NOT_FOUND, f"container {cid} not found") from None

    def _process(self, cid: str, eid: str) -> Process:
        container = self._container(cid)
        if not eid or eid == container.init_exec_id:
            return container.init
        try:
            return container.execs[eid]
        except KeyError:
            raise TtrpcError(Code.NOT_FOUND, f"exec {eid} not found in container {cid}") from None

    async def _running(self, cid: str, eid: str) -> Process:
        """The process, once started (an init waits for StartContainer)."""
        process = self._process(cid, eid)
        async with self.blocked.at("start"):
            await process.started.wait()
        if process.proc is None:
            raise TtrpcError(Code.NOT_FOUND, f"process {process.exec_id} was removed before it ran")
        return process

    async def _kill_container(self, container: _Container) -> None:
        for process in container.processes():
            process.removed = True
            if process.proc is None:  # never started: release anyone waiting on it
                process.started.set()
                process.exited.set()
            signal_group(process, signal.SIGKILL, even_if_exited=True)
        waiters = [asyncio.ensure_future(p.exited.wait()) for p in container.processes()]
        _, pending = await asyncio.wait(waiters, timeout=KILL_WAIT)
        for waiter in pending:
            waiter.cancel()


async def serve(socket_path: str, stop: asyncio.Event, ready: asyncio.Event | None = None,
                agent: DevAgent | None = None) -> None:
    """Serve ``agent`` (a new one by default) on ``socket_path`` until ``stop`` is set (or
    cancellation); then kill every process and remove the socket. ``ready`` is set once listening."""
    agent = agent or DevAgent()
    server = Server()
    agent.register(server)
    await server.serve_unix(socket_path, mode=0o600)
    log.info("%s serving on %s", AGENT_VERSION, socket_path)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await agent.kill_everything()
        await server.close()


async def _serve_until_signalled(socket_path: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(socket_path, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devagent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="unix socket path to serve")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s devagent: %(message)s")
    asyncio.run(_serve_until_signalled(args.socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())
