"""``VxlanPodNetwork``: the real ``PodNetwork`` (netns inspection + worker-side VXLAN).

Every call runs the blocking pyroute2 work in a worker thread
(``asyncio.to_thread``): pyroute2's synchronous API runs its own event loop
and cannot run on the daemon's.

pyroute2 costs about 9 MiB of the daemon's memory once imported (issue 16:
idle RSS), so it is imported by the first pod's network call, not at start,
and the start-up sweep of a crash's leftover devices and peer filters runs in
a short-lived child (``python -m cloudadaptor.podnetwork.sweep``): a node that
runs no peer pod never loads it.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Collection

from cloudadaptor.podconfig import PodInterface
from cloudadaptor.podnetwork.api import PodNetworkError, TunnelSpec

SWEEP_TIMEOUT = 60.0


class VxlanPodNetwork:
    """See ``PodNetwork``. ``worker_ip_override`` (VXLAN_WORKER_IP) replaces the
    worker address detection when set. Holds no state."""

    def __init__(self, worker_ip_override: str | None = None) -> None:
        self.worker_ip_override = worker_ip_override

    async def inspect(self, netns_path: str) -> PodInterface:
        from cloudadaptor.podnetwork import netns

        return await asyncio.to_thread(netns.inspect_pod_netns, netns_path)

    async def worker_ip(self, vm_network_hint: str | None) -> str:
        if self.worker_ip_override:
            return self.worker_ip_override
        from cloudadaptor.podnetwork import netns

        return await asyncio.to_thread(netns.worker_address, vm_network_hint)

    async def tunnel_up(self, tunnel_spec: TunnelSpec) -> None:
        from cloudadaptor.podnetwork import tunnel

        await asyncio.to_thread(tunnel.tunnel_up, tunnel_spec)

    async def tunnel_down(self, tunnel_spec: TunnelSpec) -> None:
        from cloudadaptor.podnetwork import tunnel

        await asyncio.to_thread(tunnel.tunnel_down, tunnel_spec)

    async def sweep(self, known_vnis: Collection[int]) -> list[str]:
        """``tunnel.sweep_worker_devices`` in a child (see the module docstring); its lines."""
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cloudadaptor.podnetwork.sweep", *map(str, sorted(known_vnis)),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(child.communicate(), SWEEP_TIMEOUT)
        except asyncio.TimeoutError:
            child.kill()
            await child.wait()
            raise PodNetworkError(f"the worker netns sweep did not finish within {SWEEP_TIMEOUT:.0f}s") from None
        if child.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines() or [f"exit status {child.returncode}"]
            raise PodNetworkError(f"the worker netns sweep failed: {lines[-1]}")
        return out.decode().splitlines()
