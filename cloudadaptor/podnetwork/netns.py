"""Reading the pod netns CNI made, and finding the worker address pod VMs reach.

Blocking (pyroute2's synchronous API): call through ``asyncio.to_thread``.
Nothing here changes any network state.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from typing import Any, Callable, Iterator, TypeVar

from pyroute2 import AsyncIPRoute, IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cloudadaptor import linuxns, netnsocket
from cloudadaptor.podnetwork.api import DEVICE_PREFIX, NetnsInvalid, NetnsUnusable, PodNetworkError
from cloudadaptor.podconfig import PodInterface, PodNeighbour, PodRoute

RTPROT_KERNEL = 2
RTN_UNICAST = 1
RT_TABLE_MAIN = 254
RT_SCOPE_HOST = 254
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
_SELF_NETNS = "/proc/self/ns/net"
T = TypeVar("T")


# ---------------------------------------------------------------- opening a netns


def check_netns(path: str) -> None:
    """Raise ``NetnsInvalid`` unless ``path`` is a network namespace file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NetnsInvalid(f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise NetnsInvalid(f"network namespace {path} cannot be read: {exc.strerror}") from None
    if st.st_dev != os.stat(_SELF_NETNS).st_dev:  # every namespace file lives on nsfs
        raise NetnsInvalid(f"{path} is not a network namespace (a namespace file such as /run/netns/<name> is expected)")


def netns_exists(path: str) -> bool:
    """True when ``path`` is (still) a namespace file."""
    try:
        check_netns(path)
    except NetnsInvalid:
        return False
    return True


@contextlib.contextmanager
def open_netns(path: str) -> Iterator[IPRoute]:
    """An ``IPRoute`` working in the netns at ``path``; never creates one (no fork: ``netnsocket``)."""
    sock, _ = netns_socket_and(path, lambda: None)
    with netnsocket.iproute_over(sock) as ipr:
        yield ipr


def netns_socket_and(path: str, probe: Callable[[], T]) -> tuple[socket.socket, T]:
    """A netlink (route) socket working in the netns at ``path`` and what ``probe()`` returns there,
    from the one thread that enters it (``netnsocket.socket_and``: interface names and indices without
    a netlink request); never creates a netns. The caller closes the socket. ``NetnsInvalid`` when
    ``path`` cannot be entered."""
    check_netns(path)
    try:
        return netnsocket.socket_and(path, probe)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise NetnsInvalid(f"{path} is not a network namespace: {exc}") from None
        raise NetnsInvalid(f"cannot enter network namespace {path}: {exc}") from None


# ------------------------------------------------------------------ inspection


def inspect_pod_netns(path: str) -> PodInterface:
    """The pod interface in ``path``: name, MAC, MTU, addresses, routes and
    permanent neighbours. The pod interface is the one the default route uses,
    else ``eth0``, else the first non-loopback interface with an address.

    The interfaces' names come from the thread entering the netns (``if_nameindex(3)``)
    and only the pod interface's own link is asked for: pyroute2 takes about 0.35 ms of
    CPU to decode each link of a dump (issue 16); the four requests share one event loop
    (``netnsocket.run_async``). Loopback is ``lo``, whose index the kernel fixes
    (``LOOPBACK_IFINDEX``). Raises ``NetnsInvalid`` / ``NetnsUnusable``; changes nothing.
    """
    sock, names = netns_socket_and(path, socket.if_nameindex)
    try:
        return netnsocket.run_async(sock, lambda ipr: _inspect(ipr, path, names))
    finally:
        sock.close()


async def _inspect(ipr: AsyncIPRoute, path: str, names: list[tuple[int, str]]) -> PodInterface:
    candidates = {
        index: name for index, name in names
        if index != linuxns.LOOPBACK_IFINDEX and not name.startswith(DEVICE_PREFIX)
    }
    addresses = _addresses_by_link([msg async for msg in await ipr.get_addr()])
    routes = _main_routes([msg async for msg in await ipr.get_routes(family=socket.AF_UNSPEC, table=RT_TABLE_MAIN)])
    index = _pod_link(candidates, addresses, routes)
    if index is None:
        found = ", ".join(sorted(name for _, name in names)) or "none"
        raise NetnsUnusable(
            f"network namespace {path} has no pod interface: no interface besides lo holds an address "
            f"(interfaces: {found}); CNI should have configured one"
        )
    try:
        [link] = await ipr.link("get", index=index)
    except NetlinkError as exc:
        raise NetnsUnusable(f"interface {candidates[index]} vanished from network namespace {path}: {exc}") from None
    neighbours = _permanent_neighbours([msg async for msg in await ipr.get_neighbours(ifindex=index)])
    return PodInterface(
        name=link.get("IFLA_IFNAME"),
        mac=link.get("IFLA_ADDRESS"),
        mtu=link.get("IFLA_MTU"),
        addresses=tuple(addresses[index]),
        routes=tuple(_pod_route(r) for r in routes if r.get("RTA_OIF") == index),
        neighbours=tuple(neighbours),
    )


def _addresses_by_link(messages: list[Any]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for msg in messages:
        address = msg.get("IFA_ADDRESS")
        if address is None or msg["scope"] == RT_SCOPE_HOST:
            continue
        ip = ipaddress.ip_address(address)
        if ip.version == 6 and ip.is_link_local:
            continue  # the VM derives its own from the (same) MAC
        found.setdefault(msg["index"], []).append(f"{ip}/{msg['prefixlen']}")
    return found


def _main_routes(messages: list[Any]) -> list[Any]:
    """Unicast routes of the main table that CNI (not the kernel) made, IPv4 first, of one dump of
    every family (AF_UNSPEC) instead of one per family, each pod's CreateVM asks."""
    families = (socket.AF_INET, socket.AF_INET6)
    routes = [
        route for route in messages
        if route["family"] in families and route["type"] == RTN_UNICAST and route["proto"] != RTPROT_KERNEL
        and route.get("RTA_OIF")
    ]
    return sorted(routes, key=lambda route: families.index(route["family"]))  # stable: the kernel's order within


def _pod_link(candidates: dict[int, str], addresses: dict[int, list[str]], routes: list[Any]) -> int | None:
    with_address = [index for index in candidates if addresses.get(index)]
    for route in routes:
        if route["dst_len"] == 0 and route.get("RTA_OIF") in with_address:
            return route.get("RTA_OIF")
    for index in with_address:
        if candidates[index] == "eth0":
            return index
    return min(with_address) if with_address else None


def _pod_route(route: Any) -> PodRoute:
    family = route["family"]
    default = "0.0.0.0" if family == socket.AF_INET else "::"
    dst = f"{route.get('RTA_DST') or default}/{route['dst_len']}"
    return PodRoute(
        dst=str(ipaddress.ip_network(dst, strict=False)),
        gateway=route.get("RTA_GATEWAY"),
        scope=route["scope"],
        src=route.get("RTA_PREFSRC"),
        metric=route.get("RTA_PRIORITY"),
        onlink=bool(route["flags"] & RTNH_F_ONLINK),
    )


def _permanent_neighbours(messages: list[Any]) -> list[PodNeighbour]:
    found = []
    for msg in messages:
        if msg["state"] & NUD_PERMANENT and msg.get("NDA_DST") and msg.get("NDA_LLADDR"):
            found.append(PodNeighbour(address=msg.get("NDA_DST"), mac=msg.get("NDA_LLADDR")))
    return found


# -------------------------------------------------------------- worker address


def worker_address(vm_network_hint: str | None) -> str:
    """The address of this (worker) netns that pod VMs reach: the preferred
    source of the route towards ``vm_network_hint`` (an address in the VM
    network), else that of the IPv4 default route. Raises ``PodNetworkError``."""
    with IPRoute() as ipr:
        if vm_network_hint:
            address = _source_towards(ipr, vm_network_hint)
            if address:
                return address
        for route in ipr.get_default_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
            address = route.get("RTA_PREFSRC") or _first_address(ipr, route.get("RTA_OIF"))
            if address:
                return address
    towards = f"no route towards the VM network ({vm_network_hint}) and " if vm_network_hint else ""
    raise PodNetworkError(
        f"cannot tell which worker address pod VMs reach: {towards}no default route with a source address; "
        "set VXLAN_WORKER_IP"
    )


def _source_towards(ipr: IPRoute, destination: str) -> str | None:
    try:
        [route] = ipr.route("get", dst=destination)
    except NetlinkError:
        return None
    return route.get("RTA_PREFSRC") or _first_address(ipr, route.get("RTA_OIF"))


def _first_address(ipr: IPRoute, index: int | None) -> str | None:
    if not index:
        return None
    for msg in ipr.get_addr(index=index, family=socket.AF_INET):
        if msg["scope"] != RT_SCOPE_HOST and msg.get("IFA_ADDRESS"):
            return msg.get("IFA_ADDRESS")
    return None
