"""SandboxNetwork: the lifecycle's use of the ``PodNetwork`` seam, in sandbox terms.

Turns a sandbox record into the tunnel it owns (``TunnelSpec``) and pod
network failures into ``LifecycleError`` with the gRPC status the shim gets:
a path that is no netns is INVALID_ARGUMENT, a netns without a pod interface
(or no worker address to tunnel to) FAILED_PRECONDITION, anything else in
bringing a tunnel up INTERNAL.
"""

from __future__ import annotations

import logging
import time

from cloudadaptor.adaptor.errors import LifecycleError
from cloudadaptor.adaptor.store import Sandbox, SandboxState, SandboxStore
from cloudadaptor.podnetwork.api import NetnsInvalid, NetnsUnusable, PodNetwork, PodNetworkError, TunnelSpec
from cloudadaptor.providers.base import Provider
from cloudadaptor.ttrpc.errors import Code
from cloudadaptor.podconfig import PodInterface

log = logging.getLogger(__name__)

def tunnel_of(sandbox: Sandbox) -> TunnelSpec | None:
    """The tunnel a sandbox owns (None for a row from before tunnels)."""
    network = sandbox.pod_network
    if network is None or not sandbox.vni:
        return None
    return TunnelSpec(
        netns_path=sandbox.netns_path,
        pod_ifname=network.pod.name,
        vni=sandbox.vni,
        vxlan_port=network.vxlan_port,
        vm_ip=sandbox.vm_ips[0] if sandbox.vm_ips else "",
    )


class SandboxNetwork:
    """Pod network steps of the lifecycle. Holds no state beyond the seam."""

    def __init__(self, pod_network: PodNetwork) -> None:
        self.pod_network = pod_network

    async def inspect(self, netns_path: str) -> PodInterface:
        """The pod interface CNI made (CreateVM). Raises ``LifecycleError``."""
        try:
            return await self.pod_network.inspect(netns_path)
        except NetnsInvalid as exc:
            raise LifecycleError(Code.INVALID_ARGUMENT, f"networkNamespacePath {netns_path!r}: {exc}") from None
        except PodNetworkError as exc:
            raise LifecycleError(Code.FAILED_PRECONDITION, f"networkNamespacePath {netns_path!r}: {exc}") from None

    async def worker_ip(self, provider: Provider) -> str:
        """The worker address the VM tunnels to: the source of the route towards
        the provider's ``network_hint()`` (an address in the VM network) when it
        gives one. Raises ``LifecycleError``."""
        try:
            return await self.pod_network.worker_ip(provider.network_hint())
        except PodNetworkError as exc:
            raise LifecycleError(Code.FAILED_PRECONDITION, f"VXLAN tunnel: {exc}") from None

    async def up(self, sandbox: Sandbox) -> None:
        """Bring the sandbox's tunnel up (its VM IP must be recorded). Raises ``LifecycleError``;
        the tunnel has then removed what it made."""
        tunnel = tunnel_of(sandbox)
        if tunnel is None:
            return
        began = time.monotonic()
        try:
            await self.pod_network.tunnel_up(tunnel)
        except (NetnsInvalid, NetnsUnusable) as exc:
            raise LifecycleError(Code.FAILED_PRECONDITION, f"VXLAN tunnel: {exc}") from None
        except PodNetworkError as exc:
            raise LifecycleError(Code.INTERNAL, f"VXLAN tunnel: {exc}") from None
        log.info("StartVM %s: tunnel %s (VNI %d, udp/%d) to %s up in %.2fs", sandbox.id, tunnel.device,
                 tunnel.vni, tunnel.vxlan_port, tunnel.vm_ip, time.monotonic() - began)

    async def down(self, sandbox: Sandbox) -> None:
        """Remove the sandbox's tunnel. Idempotent; raises ``PodNetworkError``
        naming what could not be removed."""
        tunnel = tunnel_of(sandbox)
        if tunnel is not None:
            await self.pod_network.tunnel_down(tunnel)

    async def remove_stale(self, store: SandboxStore) -> list[str]:
        """After a restart: tunnels of recorded sandboxes that are not running,
        and worker-netns tunnel devices of VNIs no record holds (a crash between
        creating a device and moving it). One line per problem or device removed."""
        actions = []
        for sandbox in store.all():
            if sandbox.state is SandboxState.RUNNING:
                continue
            try:
                await self.down(sandbox)
            except PodNetworkError as exc:
                actions.append(f"sandbox {sandbox.id}: tunnel removal failed: {exc}")
        try:
            actions.extend(await self.pod_network.sweep({s.vni for s in store.all() if s.vni}))
        except PodNetworkError as exc:
            actions.append(f"sweeping tunnel devices failed: {exc}")
        return actions
