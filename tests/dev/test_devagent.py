"""The development agent through a real ttrpc client on its unix socket.

Tests that put processes in a pod network namespace need the private
namespace (``make test``); the others run anywhere.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import pytest
from google.protobuf import empty_pb2

from cloudadaptor.protocols import agent_pb2, health_pb2
from cloudadaptor.dev import devagent
from cloudadaptor.ttrpc.client import Client
from cloudadaptor.ttrpc.errors import Code, TtrpcError

AGENT = "grpc.AgentService"


class Agent:
    """A connected client with shorthands for the agent calls."""

    def __init__(self, client: Client, socket_path: str, dev: devagent.DevAgent | None = None) -> None:
        self.client = client
        self.socket_path = socket_path
        # Where calls wait (an agent served in this loop): act once they do, never after a sleep.
        self.blocked = dev.blocked if dev is not None else None

    async def call(self, method: str, request, response_cls=empty_pb2.Empty):
        return await self.client.call_message(AGENT, method, request, response_cls, timeout=10)

    async def create(self, cid: str = "c1", args: list[str] | None = None, netns: str | None = None) -> None:
        oci = agent_pb2.Spec()
        if args is not None:
            oci.Process.Args.extend(args)
        if netns:
            oci.Linux.Namespaces.add(Type="network", Path=netns)
        await self.call("CreateContainer", agent_pb2.CreateContainerRequest(container_id=cid, exec_id=cid, OCI=oci))

    async def start(self, cid: str = "c1") -> None:
        await self.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))

    async def exec(self, args: list[str], eid: str = "e1", cid: str = "c1", env: list[str] | None = None) -> None:
        process = agent_pb2.Process(Args=args, Env=env or [])
        await self.call("ExecProcess", agent_pb2.ExecProcessRequest(container_id=cid, exec_id=eid, process=process))

    async def read_all(self, eid: str = "e1", cid: str = "c1", method: str = "ReadStdout") -> bytes:
        """Read until the agent's end-of-stream error, as the shim's io.Copy does."""
        data = b""
        while True:
            try:
                reply = await self.call(method, agent_pb2.ReadStreamRequest(container_id=cid, exec_id=eid, len=4096),
                                        agent_pb2.ReadStreamResponse)
            except TtrpcError as exc:
                if (exc.code, exc.message) != (Code.INTERNAL, devagent.EOF_MESSAGE):
                    raise
                return data
            assert reply.data, "a successful read carries data"
            data += reply.data

    async def wait(self, eid: str = "e1", cid: str = "c1") -> int:
        reply = await self.call("WaitProcess", agent_pb2.WaitProcessRequest(container_id=cid, exec_id=eid),
                                agent_pb2.WaitProcessResponse)
        return reply.status


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    """The development agent served in this event loop; everything it started is gone at teardown."""
    socket_path = str(tmp_path / "agent.sock")
    stop, ready = asyncio.Event(), asyncio.Event()
    dev = devagent.DevAgent()
    task = asyncio.create_task(devagent.serve(socket_path, stop, ready, dev))
    await asyncio.wait_for(ready.wait(), 5)
    client = await Client.connect_unix(socket_path)
    yield Agent(client, socket_path, dev)
    await client.close()
    stop.set()
    await asyncio.wait_for(task, 10)
    assert not os.path.exists(socket_path)


# ---------------------------------------------------------------------- health


async def test_health_check_is_serving_and_version_names_the_devagent(agent: Agent):
    reply = await agent.client.call_message("grpc.Health", "Check", health_pb2.CheckRequest(),
                                            health_pb2.HealthCheckResponse)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    version = await agent.client.call_message("grpc.Health", "Version", health_pb2.CheckRequest(),
                                              health_pb2.VersionCheckResponse)
    assert version.agent_version == devagent.AGENT_VERSION and version.agent_version.startswith("devagent ")


async def _guest_details(agent: Agent, **flags: bool) -> agent_pb2.GuestDetailsResponse:
    return await agent.call("GetGuestDetails", agent_pb2.GuestDetailsRequest(**flags), agent_pb2.GuestDetailsResponse)


async def test_guest_details_answer_the_memory_facts_the_shim_asks_for(agent: Agent, tmp_path: Path, monkeypatch):
    block, probe = tmp_path / "block_size_bytes", tmp_path / "probe"
    block.write_text("8000000\n")  # sysfs writes hex: 128 MiB
    probe.write_text("")
    monkeypatch.setattr(devagent, "MEMORY_BLOCK_SIZE_PATH", str(block))
    monkeypatch.setattr(devagent, "MEMORY_HOTPLUG_PROBE_PATH", str(probe))
    reply = await _guest_details(agent, mem_block_size=True, mem_hotplug_probe=True)
    assert (reply.mem_block_size_bytes, reply.support_mem_hotplug_probe) == (128 << 20, True), reply
    details = reply.agent_details
    assert details.version == devagent.AGENT_VERSION and details.init_daemon is False, details
    assert list(details.device_handlers) == [] and details.supports_seccomp is False, details
    unasked = await _guest_details(agent)
    assert (unasked.mem_block_size_bytes, unasked.support_mem_hotplug_probe) == (0, False), "facts only when asked"
    assert unasked.agent_details.version == devagent.AGENT_VERSION, "agent details always"


async def test_guest_details_without_sysfs_files_and_with_a_garbled_one(agent: Agent, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(devagent, "MEMORY_BLOCK_SIZE_PATH", str(tmp_path / "absent"))
    monkeypatch.setattr(devagent, "MEMORY_HOTPLUG_PROBE_PATH", str(tmp_path / "absent-probe"))
    reply = await _guest_details(agent, mem_block_size=True, mem_hotplug_probe=True)
    assert (reply.mem_block_size_bytes, reply.support_mem_hotplug_probe) == (0, False), reply
    (tmp_path / "garbled").write_text("not hex")
    monkeypatch.setattr(devagent, "MEMORY_BLOCK_SIZE_PATH", str(tmp_path / "garbled"))
    with pytest.raises(TtrpcError) as err:
        await _guest_details(agent, mem_block_size=True)
    assert err.value.code == Code.INTERNAL and "invalid memory block size" in err.value.message, err.value


async def test_unimplemented_methods_are_answered_unimplemented(agent: Agent):
    with pytest.raises(TtrpcError) as err:
        await agent.client.call(AGENT, "PullImage", b"")
    assert err.value.code == Code.UNIMPLEMENTED


# ------------------------------------------------------------- in a pod netns


async def test_exec_runs_inside_the_containers_network_namespace(agent: Agent, make_pod_netns):
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.10/24", "198.51.100.1")
    await agent.call("CreateSandbox", agent_pb2.CreateSandboxRequest(sandbox_id="sb", hostname="web"))
    await agent.create(args=["sleep", "30"], netns=pod.path)
    await agent.start()
    await agent.exec(["sh", "-c", "echo hi; cat /proc/net/dev /proc/net/fib_trie; exit 3"])
    out = await agent.read_all()
    assert await agent.wait() == 3
    text = out.decode()
    assert text.startswith("hi\n")
    assert "eth0:" in text, "the pod's eth0 (the test's own namespace has none)"
    assert pod.pod_ip in text, "the pod's address is local in the exec's namespace"
    assert await agent.read_all(method="ReadStderr") == b""


async def test_the_init_process_runs_in_the_netns_and_exec_id_empty_names_it(agent: Agent, make_pod_netns):
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.20/24", "198.51.100.1")
    await agent.create("web", args=["sh", "-c", "cat /proc/net/fib_trie; exit 7"], netns=pod.path)
    await agent.start("web")
    out = await agent.read_all(eid="", cid="web")
    assert pod.pod_ip in out.decode()
    assert await agent.wait(eid="", cid="web") == 7
    assert await agent.wait(eid="web", cid="web") == 7, "the CreateContainer exec id names the init too"


async def test_a_missing_network_namespace_is_refused(agent: Agent, tmp_path: Path):
    with pytest.raises(TtrpcError) as err:
        await agent.create(args=["true"], netns=str(tmp_path / "no-such-netns"))
    assert err.value.code == Code.INVALID_ARGUMENT


async def test_a_netns_that_cannot_be_entered_ends_the_process_with_126_and_says_why(agent: Agent, tmp_path: Path):
    """The process is forked and enters the netns itself (nsexec's step, no interpreter): a path that
    exists but is no network namespace fails there, as nsexec does: status 126, the reason on stderr."""
    not_a_netns = tmp_path / "plain-file"
    not_a_netns.write_text("")
    await agent.create(args=["true"], netns=str(not_a_netns))
    await agent.start()
    assert await agent.wait(eid="") == 126
    stderr = (await agent.read_all(eid="c1", method="ReadStderr")).decode()
    assert stderr.startswith("nsexec: ") and f"setns {not_a_netns}: Invalid argument" in stderr, stderr
    await agent.create("c2", args=["sleep", "30"])  # the agent itself carries on
    await agent.start("c2")


async def test_a_process_inherits_only_its_stdio(agent: Agent):
    await agent.create(args=["sleep", "30"])
    await agent.start()
    await agent.exec(["sh", "-c", "ls /proc/self/fd"])
    fds = sorted(int(fd) for fd in (await agent.read_all()).split())
    assert await agent.wait() == 0
    assert fds == [0, 1, 2, 3], "stdio, and the directory ls reads (fd 3)"


# --------------------------------------------------------------- processes


async def test_stdin_round_trip_through_cat(agent: Agent):
    await agent.create(args=["sleep", "30"])
    await agent.start()
    await agent.exec(["cat"])
    reply = await agent.call("WriteStdin", agent_pb2.WriteStreamRequest(container_id="c1", exec_id="e1",
                                                                         data=b"ping\n"), agent_pb2.WriteStreamResponse)
    assert reply.len == 5
    first = await agent.call("ReadStdout", agent_pb2.ReadStreamRequest(container_id="c1", exec_id="e1", len=100),
                             agent_pb2.ReadStreamResponse)
    assert first.data == b"ping\n"
    await agent.call("CloseStdin", agent_pb2.CloseStdinRequest(container_id="c1", exec_id="e1"))
    assert await agent.read_all() == b""
    assert await agent.wait() == 0


async def test_stderr_env_and_cwd_are_the_processes_own(agent: Agent, tmp_path: Path):
    await agent.create(args=["sleep", "30"])
    await agent.start()
    process = agent_pb2.Process(Args=["sh", "-c", 'echo "$GREETING from $(pwd)" >&2'],
                                Env=["GREETING=hello", "PATH=/usr/bin:/bin"], Cwd=str(tmp_path))
    await agent.call("ExecProcess", agent_pb2.ExecProcessRequest(container_id="c1", exec_id="e1", process=process))
    assert await agent.read_all(method="ReadStderr") == f"hello from {tmp_path}\n".encode()
    assert await agent.read_all() == b""
    assert await agent.wait() == 0


async def test_reads_end_soon_after_exit_even_if_a_child_holds_the_pipe(agent: Agent):
    await agent.create(args=["sleep", "30"])
    await agent.start()
    await agent.exec(["sh", "-c", "echo out; sleep 30 &"])
    started = time.monotonic()
    assert await agent.read_all() == b"out\n"
    assert time.monotonic() - started < 5
    assert await agent.wait() == 0


async def test_signal_process_and_exit_status_of_a_signalled_process(agent: Agent):
    await agent.create(args=["sleep", "30"])
    await agent.start()
    await agent.exec(["sleep", "30"])
    await agent.call("SignalProcess", agent_pb2.SignalProcessRequest(container_id="c1", exec_id="e1",
                                                                      signal=signal.SIGTERM))
    assert await agent.wait() == 128 + signal.SIGTERM
    await agent.call("SignalProcess", agent_pb2.SignalProcessRequest(container_id="c1", exec_id="e1",
                                                                      signal=signal.SIGTERM))  # exited: still fine


async def test_sigkill_to_the_init_kills_the_whole_container(agent: Agent):
    await agent.create(args=["sleep", "30"])
    await agent.start()
    await agent.exec(["sleep", "30"])
    await agent.call("SignalProcess", agent_pb2.SignalProcessRequest(container_id="c1", exec_id="",
                                                                      signal=signal.SIGKILL))
    assert await agent.wait(eid="") == 128 + signal.SIGKILL
    assert await agent.wait() == 128 + signal.SIGKILL


async def test_a_container_without_a_command_runs_a_pause_process(agent: Agent):
    await agent.create("sandbox", args=["/pause"])
    await agent.start("sandbox")
    wait = asyncio.create_task(agent.wait(eid="", cid="sandbox"))
    await asyncio.wait_for(agent.blocked.until("wait"), 5)
    assert not wait.done(), "pause keeps running"
    await agent.call("SignalProcess", agent_pb2.SignalProcessRequest(container_id="sandbox", exec_id="",
                                                                      signal=signal.SIGTERM))
    assert await wait == 128 + signal.SIGTERM, "pause ran until signalled (it did not exit by itself)"


async def test_unknown_container_and_exec_are_not_found(agent: Agent):
    for method, request, response in [
        ("ExecProcess", agent_pb2.ExecProcessRequest(container_id="nope", exec_id="e",
                                                      process=agent_pb2.Process(Args=["true"])), empty_pb2.Empty),
        ("StartContainer", agent_pb2.StartContainerRequest(container_id="nope"), empty_pb2.Empty),
        ("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="nope"), empty_pb2.Empty),
        ("WaitProcess", agent_pb2.WaitProcessRequest(container_id="nope"), agent_pb2.WaitProcessResponse),
    ]:
        with pytest.raises(TtrpcError) as err:
            await agent.call(method, request, response)
        assert err.value.code == Code.NOT_FOUND, method
    await agent.create(args=["sleep", "30"])
    for method, request, response in [
        ("WaitProcess", agent_pb2.WaitProcessRequest(container_id="c1", exec_id="ghost"), agent_pb2.WaitProcessResponse),
        ("ReadStdout", agent_pb2.ReadStreamRequest(container_id="c1", exec_id="ghost"), agent_pb2.ReadStreamResponse),
        ("WriteStdin", agent_pb2.WriteStreamRequest(container_id="c1", exec_id="ghost", data=b"x"),
         agent_pb2.WriteStreamResponse),
        ("SignalProcess", agent_pb2.SignalProcessRequest(container_id="c1", exec_id="ghost", signal=9), empty_pb2.Empty),
    ]:
        with pytest.raises(TtrpcError) as err:
            await agent.call(method, request, response)
        assert err.value.code == Code.NOT_FOUND, method


async def test_duplicates_and_missing_commands_are_refused(agent: Agent):
    await agent.create(args=["sleep", "30"])
    with pytest.raises(TtrpcError) as err:
        await agent.create(args=["sleep", "30"])
    assert err.value.code == Code.ALREADY_EXISTS
    await agent.start()
    await agent.exec(["sleep", "30"])
    with pytest.raises(TtrpcError) as err:
        await agent.exec(["sleep", "30"])
    assert err.value.code == Code.ALREADY_EXISTS
    with pytest.raises(TtrpcError) as err:
        await agent.exec(["no-such-command-here"], eid="e2")
    assert err.value.code == Code.INTERNAL and "executable file not found" in err.value.message


async def test_remove_container_kills_its_processes_and_forgets_it(agent: Agent):
    await agent.create(args=["sleep", "30"])
    await agent.start()
    await agent.exec(["sh", "-c", "sleep 30 & wait"])
    waiting = asyncio.create_task(agent.wait())
    await asyncio.wait_for(agent.blocked.until("wait"), 5)
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="c1"))
    assert await waiting == 128 + signal.SIGKILL
    with pytest.raises(TtrpcError) as err:
        await agent.wait()
    assert err.value.code == Code.NOT_FOUND


async def test_a_read_waiting_for_start_is_released_by_removal(agent: Agent):
    await agent.create(args=["echo", "never"])
    read = asyncio.create_task(agent.read_all(eid=""))
    await asyncio.wait_for(agent.blocked.until("start"), 5)
    assert not read.done(), "a read on an init that has not started waits"
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="c1"))
    with pytest.raises(TtrpcError) as err:
        await read
    assert err.value.code == Code.NOT_FOUND


async def test_destroy_sandbox_kills_everything(agent: Agent):
    for cid in ("a", "b"):
        await agent.create(cid, args=["sleep", "30"])
        await agent.start(cid)
    await agent.exec(["sleep", "30"], cid="a")
    waits = [asyncio.create_task(agent.wait(eid=e, cid=c)) for c, e in (("a", ""), ("b", ""), ("a", "e1"))]
    await asyncio.wait_for(agent.blocked.until("wait", 3), 5)
    await agent.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
    assert await asyncio.gather(*waits) == [128 + signal.SIGKILL] * 3
    with pytest.raises(TtrpcError) as err:
        await agent.start("a")
    assert err.value.code == Code.NOT_FOUND


# --------------------------------------------------------------------- command


def _process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_the_command_serves_until_sigterm_and_kills_its_processes(tmp_path: Path):
    socket_path = str(tmp_path / "agent.sock")
    proc = subprocess.Popen([sys.executable, "-m", "cloudadaptor.dev.devagent", "--socket", socket_path],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(socket_path):
            assert proc.poll() is None and time.monotonic() < deadline, "the agent did not start"
            await asyncio.sleep(0.02)
        client = await Client.connect_unix(socket_path)
        agent = Agent(client, socket_path)
        await agent.create(args=["sleep", "30"])
        await agent.start()
        await agent.exec(["sh", "-c", "echo $$; exec sleep 30"])
        reply = await agent.call("ReadStdout", agent_pb2.ReadStreamRequest(container_id="c1", exec_id="e1", len=64),
                                 agent_pb2.ReadStreamResponse)
        exec_pid = int(reply.data)
        await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert not os.path.exists(socket_path)
    assert not _process_group_alive(exec_pid), "the exec'd process was killed with the agent"
