"""The seam between the sandbox lifecycle and the pod network (no pyroute2 here).

The lifecycle knows a pod network only through ``PodNetwork``: inspect the
pod netns at CreateVM, tell which worker address the VM must tunnel to, bring
the worker side of the VXLAN tunnel up at StartVM and down at StopVM, and
sweep what a crash left. ``VxlanPodNetwork`` (``podnetwork.vxlan``) is the
real one; lifecycle tests use a fake.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Collection, Protocol, runtime_checkable

from cloudadaptor.podconfig import PodInterface

# Every VXLAN device we create is named after its VNI, so it can be found again
# (after a crash, in the worker netns or the pod netns) without any record.
DEVICE_PREFIX = "ppvx"
_DEVICE = re.compile(DEVICE_PREFIX + r"(\d{1,8})")



def device_name(vni: int) -> str:
    """``ppvx<vni>`` (at most 12 characters): the tunnel device of ``vni``."""
    return f"{DEVICE_PREFIX}{vni}"


def vni_of_device(name: str) -> int | None:
    """The VNI a ``ppvx<vni>`` device name carries; None for any other name."""
    match = _DEVICE.fullmatch(name)
    return int(match.group(1)) if match else None


class PodNetworkError(Exception):
    """A pod network step failed; the message names the netns or device and why."""


class NetnsInvalid(PodNetworkError):
    """The given path is not a usable network namespace (missing, not a netns)."""


class NetnsUnusable(PodNetworkError):
    """The netns exists but has nothing to tunnel (no pod interface with an address)."""


@dataclass(frozen=True)
class TunnelSpec:
    """The worker side of one pod's tunnel.

    ``vm_ip`` (the remote end) is needed to bring the tunnel up, not to take it down.
    """

    netns_path: str
    pod_ifname: str
    vni: int
    vxlan_port: int
    vm_ip: str = ""

    @property
    def device(self) -> str:
        return device_name(self.vni)


@runtime_checkable
class PodNetwork(Protocol):
    """Pod netns inspection and the worker side of the VXLAN tunnel."""

    async def inspect(self, netns_path: str) -> PodInterface:
        """The pod interface in ``netns_path``. Raises ``NetnsInvalid`` (not a
        netns) or ``NetnsUnusable`` (no interface with an address). Read only."""
        ...

    async def worker_ip(self, vm_network_hint: str | None) -> str:
        """The worker address pod VMs reach: the configured override, else the
        preferred source towards ``vm_network_hint`` (an address in the VM
        network), else the default route's. Raises ``PodNetworkError``."""
        ...

    async def tunnel_up(self, tunnel: TunnelSpec) -> None:
        """Create the VXLAN device and the tc redirects; replaces leftovers of an
        earlier attempt. On failure removes what it made, then raises."""
        ...

    async def tunnel_down(self, tunnel: TunnelSpec) -> None:
        """Remove the device (worker or pod netns) and our tc filters. Idempotent;
        a pod netns that is gone is success. Raises ``PodNetworkError`` listing
        what could not be removed."""
        ...

    async def sweep(self, known_vnis: Collection[int]) -> list[str]:
        """Delete tunnel devices left in the worker netns whose VNI is not in
        ``known_vnis``; one line per device removed."""
        ...
