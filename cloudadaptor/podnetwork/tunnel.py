"""The worker side of a pod's VXLAN tunnel (docs/ARCHITECTURE.md, "What the product is").

    pod netns: eth0 ◄─tc redirect─► ppvx<vni> ══UDP vxlan_port══► pod VM

The VXLAN device is created by a request from the worker's netns, so its UDP
socket lives there (where the VM network is routed), straight into the pod
netns (IFLA_NET_NS_FD, as `ip link add ... netns <pod>`). There,
two tc ingress filters (u32 match-all, mirred egress redirect) pass every
frame entering the pod interface to the tunnel and every frame coming out of
the tunnel to the pod interface: the pod netns itself never routes anything.

Linux VXLAN accepts a frame from any sender, so before the device exists an
nftables table ``ppvx<vni>`` in the worker's netns drops VXLAN packets of this
VNI from anyone but the VM (``peerfilter``); it goes with the tunnel.

Devices are named ``ppvx<vni>`` and the filters use priority
``REDIRECT_PRIO``, so ``tunnel_down`` finds everything from the netns path
and VNI alone, wherever a crash left it. Blocking: call through
``asyncio.to_thread``.

Issue 16 (daemon CPU per pod): interfaces are found by name without a netlink
request (``netnsocket.index_of``, in the thread that enters the netns), and
the requests of a step run on pyroute2's ``AsyncIPRoute`` in one event loop,
where the synchronous ``IPRoute`` runs its loop once per request and once per
message of a dump.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
from typing import Any, Awaitable, Callable, Collection, TypeVar

from pyroute2 import AsyncIPRoute, IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cloudadaptor import netnsocket
from cloudadaptor.podnetwork import peerfilter
from cloudadaptor.podnetwork.api import NetnsUnusable, PodNetworkError, TunnelSpec, vni_of_device
from cloudadaptor.podnetwork.netns import netns_exists, netns_socket_and

INGRESS = 0xFFFF0000  # the ingress qdisc's handle ("ffff:")
ETH_P_ALL = 0x0003
REDIRECT_PRIO = 1
U32_CLASSID = 0x10001  # "flowid 1:1", as `tc ... u32 match u32 0 0 flowid 1:1` sets
T = TypeVar("T")


def tunnel_up(tunnel: TunnelSpec) -> None:
    """Create the tunnel of ``tunnel`` (see the module docstring).

    Leftovers of an earlier attempt for the same VNI are removed first; on
    failure everything made is removed before ``PodNetworkError`` is raised.
    One netlink socket per netns serves the whole step, on one event loop.
    """
    if not tunnel.vm_ip:
        raise PodNetworkError(f"tunnel {tunnel.device}: no VM address to tunnel to")
    loop = asyncio.new_event_loop()
    sockets = contextlib.AsyncExitStack()
    try:
        worker, pod, pod_index = loop.run_until_complete(_remove_leftovers(tunnel, sockets))
        try:
            # before the socket can receive; replaces an earlier peer filter of this VNI (its own
            # socket and loop: between two runs of ours, never inside one)
            peerfilter.install(tunnel.vni, tunnel.vxlan_port, tunnel.vm_ip)
            loop.run_until_complete(_create_and_wire(worker, pod, pod_index, tunnel, sockets))
        except BaseException as exc:
            loop.run_until_complete(sockets.aclose())
            _undo(tunnel, exc)
            raise
    finally:
        loop.run_until_complete(sockets.aclose())
        loop.close()


def _undo(tunnel: TunnelSpec, exc: BaseException) -> None:
    """``tunnel_down`` after ``exc`` failed ``tunnel_up``; raises ``exc`` as a ``PodNetworkError``
    when it is a network error, returns (the caller re-raises) otherwise."""
    try:
        tunnel_down(tunnel)
    except PodNetworkError as cleanup:
        raise PodNetworkError(f"{_describe(exc)}; cleanup also failed: {cleanup}") from exc
    if isinstance(exc, (OSError, NetlinkError)) and not isinstance(exc, PodNetworkError):
        raise PodNetworkError(f"tunnel {tunnel.device} to {tunnel.vm_ip} in {tunnel.netns_path}: {_describe(exc)}") from exc


async def _remove_leftovers(tunnel: TunnelSpec, sockets: contextlib.AsyncExitStack,
                            ) -> tuple[AsyncIPRoute, AsyncIPRoute | None, int | None]:
    """``tunnel_down`` but the peer filter (``peerfilter.install`` replaces it), through
    sockets kept open for the rest of ``tunnel_up``: (worker netns, pod netns or None when
    the pod netns is gone, the pod interface's index as found there). Raises ``PodNetworkError``
    as ``tunnel_down`` does."""
    problems: list[str] = []
    name = tunnel.device
    worker = await _attempt_async(problems, f"cannot delete {name} in the worker netns",
                                  lambda: sockets.enter_async_context(AsyncIPRoute()))
    if worker is not None:
        await _attempt_async(problems, f"cannot delete {name} in the worker netns",
                             lambda: _delete_link(worker, netnsocket.index_of(name)))
    pod = pod_index = None
    if netns_exists(tunnel.netns_path):
        where = f"cannot clean {name} in {tunnel.netns_path}"
        opened = await _attempt_async(problems, where, lambda: _open_pod(tunnel, sockets))
        if opened is not None:
            pod = opened[0]
            pod_index = await _attempt_async(problems, where, lambda: _clean_pod_netns(*opened, tunnel))
    if problems or worker is None:
        raise PodNetworkError("; ".join(problems))
    return worker, pod, pod_index


async def _create_and_wire(worker: AsyncIPRoute, pod: AsyncIPRoute | None, pod_index: int | None,
                           tunnel: TunnelSpec, sockets: contextlib.AsyncExitStack) -> None:
    await _create(worker, tunnel)
    if pod is None:  # the pod netns was gone a moment ago: _wire says what is wrong with it now
        pod, _ = await _open_pod(tunnel, sockets)
    await _wire(pod, tunnel, pod_index)


async def _create(worker: AsyncIPRoute, tunnel: TunnelSpec) -> None:
    """The VXLAN device, created from this (worker) netns straight into the pod netns:
    its UDP socket lives in the netns that created it, so one request does what
    "create here, then move" did, and no device ever sits in the worker netns.
    Created up (one request less than "add, then set up"): nothing reaches the pod
    interface before ``_wire``'s redirects, as when it came up just before them."""
    remote = ipaddress.ip_address(tunnel.vm_ip)
    group = {"vxlan_group": str(remote)} if remote.version == 4 else {"vxlan_group6": str(remote)}
    fd = os.open(tunnel.netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await worker.link("add", ifname=tunnel.device, kind="vxlan", vxlan_id=tunnel.vni,
                          vxlan_port=tunnel.vxlan_port, vxlan_learning=0, net_ns_fd=fd, state="up", **group)
    finally:
        os.close(fd)


async def _wire(pod: AsyncIPRoute, tunnel: TunnelSpec, pod_index: int | None = None) -> None:
    """In the pod netns: the tc redirects both ways between the pod interface and the (up) device.
    ``pod_index``: the pod interface's index when ``_remove_leftovers`` found it (else looked up)."""
    found = netnsocket.indices_in(tunnel.netns_path, (tunnel.pod_ifname, tunnel.device))
    pod_index = pod_index or found[tunnel.pod_ifname]
    if pod_index is None:
        raise NetnsUnusable(f"network namespace {tunnel.netns_path} has no interface {tunnel.pod_ifname}")
    vxlan = found[tunnel.device]
    if vxlan is None:
        raise PodNetworkError(f"{tunnel.device} vanished from {tunnel.netns_path}")
    await add_redirect(pod, pod_index, vxlan)
    await add_redirect(pod, vxlan, pod_index)


def tunnel_down(tunnel: TunnelSpec) -> None:
    """Remove the tunnel's device (from the worker and the pod netns), our tc
    filters on the pod interface and the peer filter. Idempotent; a pod netns that is gone is fine.
    Raises ``PodNetworkError`` listing every part that could not be removed."""
    problems: list[str] = []
    name = tunnel.device

    def in_worker() -> None:
        index = netnsocket.index_of(name)  # a crash's leftover only: mostly none, and no socket needed
        if index is not None:
            with IPRoute() as ipr:
                _tolerate((errno.ENODEV,), ipr.link, "del", index=index)

    def in_pod() -> None:
        sock, indices = netns_socket_and(tunnel.netns_path, lambda: _pod_indices(tunnel))
        try:
            netnsocket.run_async(sock, lambda ipr: _clean_pod_netns(ipr, indices, tunnel))
        finally:
            sock.close()

    _attempt(problems, f"cannot delete {name} in the worker netns", in_worker)
    if netns_exists(tunnel.netns_path):
        _attempt(problems, f"cannot clean {name} in {tunnel.netns_path}", in_pod)
    _attempt(problems, f"cannot remove the peer filter {peerfilter.table_name(tunnel.vni)}", peerfilter.remove,
             tunnel.vni)
    if problems:
        raise PodNetworkError("; ".join(problems))


def _pod_indices(tunnel: TunnelSpec) -> dict[str, int | None]:
    """The indices of the pod interface and the tunnel device (run in the pod netns)."""
    return netnsocket.indices((tunnel.pod_ifname, tunnel.device))


async def _open_pod(tunnel: TunnelSpec, sockets: contextlib.AsyncExitStack,
                    ) -> tuple[AsyncIPRoute, dict[str, int | None]]:
    """The pod netns's socket (closed by ``sockets``) and ``_pod_indices`` there."""
    sock, indices = netns_socket_and(tunnel.netns_path, lambda: _pod_indices(tunnel))
    sockets.callback(sock.close)
    return await sockets.enter_async_context(AsyncIPRoute(use_socket=sock)), indices


async def _clean_pod_netns(ipr: AsyncIPRoute, indices: dict[str, int | None], tunnel: TunnelSpec) -> int | None:
    """Our filters and device out of the pod netns (``indices``: ``_pod_indices``);
    the pod interface's index (None: it has none)."""
    pod = indices[tunnel.pod_ifname]
    if pod is not None:
        await remove_redirect(ipr, pod)
    await _delete_link(ipr, indices[tunnel.device])
    return pod


def _attempt(problems: list[str], what: str, fn: Callable[..., T], *args: Any) -> T | None:
    """``fn(*args)``; a failure is added to ``problems`` as "``what``: why" (None returned)."""
    try:
        return fn(*args)
    except (OSError, NetlinkError, PodNetworkError) as exc:
        problems.append(f"{what}: {_describe(exc)}")
        return None


async def _attempt_async(problems: list[str], what: str, work: Callable[[], Awaitable[T]]) -> T | None:
    """``_attempt`` of ``await work()``."""
    try:
        return await work()
    except (OSError, NetlinkError, PodNetworkError) as exc:
        problems.append(f"{what}: {_describe(exc)}")
        return None


def sweep_worker_devices(known_vnis: Collection[int]) -> list[str]:
    """Delete ``ppvx<vni>`` devices and peer filters in this (worker) netns whose VNI
    is not known; one line per thing deleted. Such a device is a crash's leftover:
    a live tunnel's device lives in its pod netns."""
    actions = peerfilter.sweep(known_vnis)
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get("IFLA_IFNAME", "")
            vni = vni_of_device(name)
            if vni is not None and vni not in known_vnis:
                _tolerate((errno.ENODEV,), ipr.link, "del", index=link["index"])
                actions.append(f"deleted stale tunnel device {name} (VNI {vni}) in the worker netns")
    return actions


# --------------------------------------------------------------------- tc


async def add_redirect(ipr: AsyncIPRoute, from_index: int, to_index: int) -> None:
    """Everything entering ``from_index`` leaves through ``to_index`` (ingress
    qdisc, u32 match-all filter at ``REDIRECT_PRIO``, mirred egress redirect)."""
    await _tolerate_async((errno.EEXIST,), ipr.tc("add", "ingress", from_index, "ffff:"))
    await ipr.tc("add-filter", "u32", from_index, parent=INGRESS, prio=REDIRECT_PRIO, protocol=ETH_P_ALL,
                 target=U32_CLASSID, keys=["0x0/0x0+0"],
                 action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": to_index})


async def remove_redirect(ipr: AsyncIPRoute, index: int) -> None:
    """Delete our filter on ``index``'s ingress; the ingress qdisc goes too unless
    another filter still uses it. Nothing of ours there is fine (and changes nothing)."""
    try:
        filters = [msg async for msg in await ipr.get_filters(index=index, parent=INGRESS)]
    except NetlinkError as exc:
        if not _no_ingress(exc):
            raise
        return
    if not any(_prio(f) == REDIRECT_PRIO for f in filters):
        return
    if any(_prio(f) != REDIRECT_PRIO for f in filters):
        await _tolerate_async((errno.ENOENT,), ipr.tc("del-filter", "u32", index, parent=INGRESS, prio=REDIRECT_PRIO,
                                                     protocol=ETH_P_ALL, target=U32_CLASSID))
    else:
        await _tolerate_async((errno.EINVAL, errno.ENOENT), ipr.tc("del", "ingress", index, "ffff:"))


def ingress_filters(ipr: IPRoute, index: int) -> list[Any]:
    """The filters on ``index``'s ingress qdisc (empty without one); for diagnostics and tests."""
    try:
        return list(ipr.get_filters(index=index, parent=INGRESS))
    except NetlinkError as exc:
        if _no_ingress(exc):
            return []
        raise


def _no_ingress(exc: NetlinkError) -> bool:
    """Whether asking for the ingress filters failed because there is no ingress qdisc."""
    return exc.code in (errno.EINVAL, errno.ENOENT)


def redirect_targets(ipr: IPRoute, index: int) -> list[int]:
    """The interfaces our filters on ``index`` redirect to (for diagnostics and tests)."""
    targets = []
    for msg in ingress_filters(ipr, index):
        options = msg.get("TCA_OPTIONS")
        actions = options.get("TCA_U32_ACT") if options is not None else None
        if _prio(msg) != REDIRECT_PRIO or actions is None:
            continue
        for _, action in actions["attrs"]:
            parms = action.get_nested("TCA_ACT_OPTIONS", "TCA_MIRRED_PARMS")
            if parms is not None:
                targets.append(parms["ifindex"])
    return targets


# ----------------------------------------------------------------- helpers


def _prio(msg: Any) -> int:
    return msg["info"] >> 16


async def _delete_link(ipr: AsyncIPRoute, index: int | None) -> None:
    """Delete the interface ``index`` (None: nothing to delete); gone already is fine."""
    if index is not None:
        await _tolerate_async((errno.ENODEV,), ipr.link("del", index=index))


def _tolerate(codes: tuple[int, ...], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call a pyroute2 method, ignoring the netlink errors ``codes`` (EEXIST, ENODEV...)."""
    try:
        fn(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code not in codes:
            raise


async def _tolerate_async(codes: tuple[int, ...], request: Awaitable[Any]) -> None:
    """``_tolerate`` of an ``AsyncIPRoute`` request."""
    try:
        await request
    except NetlinkError as exc:
        if exc.code not in codes:
            raise


def _describe(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        return f"netlink error {exc.code} ({os.strerror(exc.code)})"
    return str(exc) or type(exc).__name__

