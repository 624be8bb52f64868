"""The daemon under a flood: 10,000 idle connections to the hypervisor socket leave real calls served
(issue 11 item 8). The daemon is the real one (settings → ttrpc server with its caps); the provider and
the pod network are the lifecycle fakes."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.config import load_settings
from cloudadaptor.dev.shim import ShimEmulator, shim_annotations

SANDBOX = "f1" * 32


async def open_idle_unix(path: str, count: int, batch: int = 100) -> list[socket.socket]:
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []

    async def one() -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)
        socks.append(sock)
        await loop.sock_connect(sock, path)

    for start in range(0, count, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, count - start))))
    return socks


async def test_10000_idle_connections_leave_the_shims_calls_served(short_dir, provider, pod_network, agent, netns_file, many_files):
    settings = load_settings({
        "CLOUD_PROVIDER": "local", "NODE_NAME": "worker-1", "DISABLE_TLS": "true",
        "STATE_DIR": str(short_dir / "state"), "SOCKET": str(short_dir / "hv.sock"), "PODS_DIR": str(short_dir / "pods"),
    })
    assert settings.ttrpc_max_connections == 512, "the default cap"
    daemon = Daemon(settings, provider=provider, pod_network=pod_network)
    await daemon.start()
    # The fake provider's VMs answer on loopback: point the lifecycle at the fake agent's port.
    daemon.lifecycle.options = dataclasses.replace(daemon.lifecycle.options, agent_port=agent.port)
    idle: list[socket.socket] = []
    try:
        idle = await open_idle_unix(str(settings.socket), 10_000)
        server = daemon._ttrpc
        assert len(server._connections) <= 512
        assert server.evicted >= 10_000 - 512 - 1024, "only the cap and the listen backlog may hold connections"
        shim = ShimEmulator(str(settings.socket))
        assert await shim.version()
        await shim.create_vm(SANDBOX, netns_file, shim_annotations("web", "prod"))
        await shim.start_vm(SANDBOX)
        await shim.stop_vm(SANDBOX)
        assert provider.instances == {}
        assert len(server._connections) <= 512
    finally:
        for sock in idle:
            sock.close()
        await daemon.close()
