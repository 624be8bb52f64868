"""``VxlanPodNetwork``: the real ``PodNetwork`` (netns inspection + worker-side VXLAN).

Every call runs the blocking pyroute2 work in a worker thread
(``asyncio.to_thread``): pyroute2's synchronous API runs its own event loop
and cannot run on the daemon's.
"""

from __future__ import annotations

import asyncio
from typing import Collection

from cloudadaptor.podnetwork import netns, tunnel
from cloudadaptor.podnetwork.api import TunnelSpec
from cloudadaptor.podconfig import PodInterface


class VxlanPodNetwork:
    """See ``PodNetwork``. ``worker_ip_override`` (VXLAN_WORKER_IP) replaces the
    worker address detection when set. Holds no state."""

    def __init__(self, worker_ip_override: str | None = None) -> None:
        self.worker_ip_override = worker_ip_override

    async def inspect(self, netns_path: str) -> PodInterface:
        return await asyncio.to_thread(netns.inspect_pod_netns, netns_path)

    async def worker_ip(self, vm_network_hint: str | None) -> str:
        if self.worker_ip_override:
            return self.worker_ip_override
        return await asyncio.to_thread(netns.worker_address, vm_network_hint)

    async def tunnel_up(self, tunnel_spec: TunnelSpec) -> None:
        await asyncio.to_thread(tunnel.tunnel_up, tunnel_spec)

    async def tunnel_down(self, tunnel_spec: TunnelSpec) -> None:
        await asyncio.to_thread(tunnel.tunnel_down, tunnel_spec)

    async def sweep(self, known_vnis: Collection[int]) -> list[str]:
        return await asyncio.to_thread(tunnel.sweep_worker_devices, frozenset(known_vnis))
