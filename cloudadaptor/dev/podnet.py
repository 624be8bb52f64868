"""A pod network namespace made the way a CNI plugin (ptp-style) would (test/demo helper).

``create_pod_netns("pod-a", "198.51.100.10/24", "198.51.100.1")`` gives
``/run/netns/pod-a`` with ``eth0`` (the pod IP, a default route via the
gateway) whose veth peer stays in the current namespace, holding the gateway
address as a /32 plus a /32 route to the pod. Several pods can share one
subnet and gateway, as with CNI. Everything goes through pyroute2.

Blocking (pyroute2's synchronous API runs its own event loop): from async
code call these through ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cloudadaptor import linuxns, netnsocket

POD_IFNAME = "eth0"


@dataclass(frozen=True)
class PodNetns:
    """A pod netns and its host-side veth; ``delete()`` removes both (idempotent)."""

    name: str
    path: str
    ifname: str
    host_veth: str
    pod_ip: str
    prefixlen: int
    gateway: str
    mac: str

    @property
    def pod_cidr(self) -> str:
        return f"{self.pod_ip}/{self.prefixlen}"

    def delete(self) -> None:
        delete_pod_netns(self.name, self.host_veth)


def host_veth_name(name: str) -> str:
    """A host-side interface name (≤ 15 chars) derived from the pod netns name."""
    return "pn-" + hashlib.sha1(name.encode()).hexdigest()[:12]


def create_pod_netns(name: str, pod_ip_cidr: str, gateway: str, *, mtu: int = 1500) -> PodNetns:
    """Create netns ``name`` wired to the current namespace; undoes itself on failure."""
    iface = ipaddress.ip_interface(pod_ip_cidr)
    gw = ipaddress.ip_address(gateway)
    if iface.version != 4 or gw.version != 4 or gw not in iface.network:
        raise ValueError(f"expected an IPv4 pod address with the gateway in its subnet: {pod_ip_cidr} via {gateway}")
    path = linuxns.netns_path(name)
    if os.path.exists(path):
        raise FileExistsError(errno.EEXIST, "network namespace exists", path)
    host = host_veth_name(name)
    netnsocket.create_netns(name)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=host, kind="veth", mtu=mtu,
                     peer={"ifname": POD_IFNAME, "net_ns_fd": name, "mtu": mtu})
            index = ipr.link_lookup(ifname=host)[0]
            ipr.addr("add", index=index, address=str(gw), prefixlen=32)
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst=f"{iface.ip}/32", oif=index)
        with netnsocket.iproute_in(path) as ipr:
            ipr.link("set", index=linuxns.LOOPBACK_IFINDEX, state="up")
            index = ipr.link_lookup(ifname=POD_IFNAME)[0]
            ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=str(gw))
            mac = ipr.get_links(index)[0].get("IFLA_ADDRESS")
    except BaseException:
        delete_pod_netns(name, host)
        raise
    return PodNetns(name, path, POD_IFNAME, host, str(iface.ip), iface.network.prefixlen, str(gw), mac)


def delete_pod_netns(name: str, host_veth: str | None = None) -> None:
    """Delete the host veth (its peer goes with it) and the netns; missing parts are fine."""
    host_veth = host_veth or host_veth_name(name)
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=host_veth):
            try:
                ipr.link("del", index=index)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise
    path = linuxns.netns_path(name)
    try:
        netnsocket.remove_netns(path)
    except FileNotFoundError:
        pass
