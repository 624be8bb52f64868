"""End to end with a kata-agent that is not ours, in namespace mode.

The agent (tests/fakes/thirdpartyagent.py) is written from the wire facts
alone and, like the real kata-agent, does not create the directory of its
socket: the namespace VM must do what the image's kata-agent.service does
(ExecStartPre=mkdir -p /run/kata-containers), or no pod starts.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path

from cloudadaptor.dev.shim import ShimEmulator, start_pod, stop_pod
from test_e2e import daemon_factory  # noqa: F401 - the fixture

AGENT = Path(__file__).resolve().parent / "fakes" / "thirdpartyagent.py"


async def test_a_third_party_agent_gets_create_sandbox_through_the_forwarder(daemon_factory, make_pod_netns):  # noqa: F811
    command = shlex.join([sys.executable, str(AGENT), "--addr", "unix://{socket}"])
    daemon, socket_path = await daemon_factory(LOCAL_AGENT_COMMAND=command)
    shim = ShimEmulator(socket_path)
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.40/24", "198.51.100.1")
    run, _, _ = await start_pod(shim, "thirdparty", "e2e", pod.path)
    record = daemon.lifecycle.store.get(run.sandbox_id)
    cloud_dir = Path(daemon.settings.state_dir) / "local-cloud" / record.instance_id
    console = (cloud_dir / "console.log").read_text()
    assert "kata-agent.service: made /run/kata-containers" in console, console
    assert "thirdparty-agent: serving on /run/kata-containers/agent.sock" in console, console
    assert "thirdparty-agent: grpc.AgentService/CreateSandbox" in console, console
    # The sandbox id went through the forwarder unchanged (CreateSandbox's sandbox_id field).
    line = next(x for x in console.splitlines() if "grpc.AgentService/CreateSandbox" in x)
    assert run.sandbox_id.encode().hex() in line, line
    await stop_pod(shim, run)
    assert await daemon.provider.list_owned({}) == []
