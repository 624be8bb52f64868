"""The pod VM side of the tunnel: the pod's interface, re-created in netns ``podns``.

    python -m cloudadaptor.podnetwork.vmside [--config /run/peerpod/apf.json] [--podns podns]

The VM's boot runs this after ``process-user-data`` (which wrote apf.json)
and before the kata-agent. From apf.json's ``network`` it creates, in the
VM's own netns (so its UDP socket is on the VM's network), a VXLAN device
towards the worker (``worker_ip``, ``vni``, ``vxlan_port``) placed straight in
``podns``, renames it to the pod's interface name and gives it the pod's MAC,
MTU (capped at ``wire.VXLAN_MAX_MTU``: the frame plus 50 bytes of VXLAN must fit
the underlay) and addresses, up. Then the pod's routes are replayed (routes without a gateway
first, so gateways are reachable) and its permanent neighbours. Before the
device exists, an nftables table ``ppvx<vni>`` in the VM's netns drops VXLAN
packets of this VNI from anyone but the worker (``peerfilter``).

Idempotent: a re-run replaces what an earlier run made. Exit status 0 when
done or when apf.json carries no network (nothing to do), 1 on failure (the
reason is printed), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import os
import socket
import sys
from typing import Any, Iterator

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cloudadaptor import linuxns, netnsocket
from cloudadaptor.podnetwork import peerfilter
from cloudadaptor.podnetwork.api import PodNetworkError, device_name
from cloudadaptor.podconfig import ApfConfigError, ForwarderConfig, PodInterface, PodNetworkConfig
from cloudadaptor.userdata import APF_CONFIG_PATH
from cloudadaptor.wire import PODNS, VXLAN_MAX_MTU

IFA_F_NODAD = 0x02
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80


def vm_mtu(pod_mtu: int) -> int:
    """The pod interface's MTU in the VM: the pod's, at most ``wire.VXLAN_MAX_MTU``."""
    return min(pod_mtu, VXLAN_MAX_MTU)


def setup_vm_network(net: PodNetworkConfig, podns: str = PODNS, vm_netns: str | None = None,
                     podns_ipr: IPRoute | None = None) -> str:
    """Build the pod interface in ``podns`` (created if missing); returns a summary line.

    ``vm_netns`` is the netns whose network reaches the worker (None: this
    process's own, as in a VM; tests pass a path). ``podns_ipr``: an open
    ``IPRoute`` in ``podns`` to work with (the namespace VM's init keeps the one
    it made podns with; this function does not close it); None: one is opened
    for this call. Blocking. Raises ``PodNetworkError`` naming the step that failed.
    """
    podns_path = linuxns.netns_path(podns)
    if podns_ipr is None and not os.path.exists(podns_path):
        netnsocket.create_netns(podns)
    pod = net.pod
    try:
        with contextlib.ExitStack() as stack:  # one socket into podns for the whole step
            ipr = podns_ipr if podns_ipr is not None else stack.enter_context(netnsocket.iproute_in(podns_path))
            _clear_podns(ipr, (device_name(net.vni), pod.name))
            # Only the worker may speak into the tunnel: the filter is in place before the socket exists.
            peerfilter.install(net.vni, net.vxlan_port, net.worker_ip, linuxns.netns_path(vm_netns) if vm_netns else None)
            _create_in_podns(net, vm_netns, podns_path)
            index = _configure_link(ipr, device_name(net.vni), pod)
            _replay_routes(ipr, index, pod)
            for neighbour in pod.neighbours:
                ipr.neigh("replace", dst=neighbour.address, lladdr=neighbour.mac, ifindex=index, state=NUD_PERMANENT)
    except (OSError, NetlinkError) as exc:
        raise PodNetworkError(f"setting up {pod.name} in {podns_path}: {_describe(exc)}") from exc
    return (f"{pod.name} in {podns}: {', '.join(pod.addresses)} mac {pod.mac} mtu {vm_mtu(pod.mtu)}, "
            f"VXLAN VNI {net.vni} to {net.worker_ip}:{net.vxlan_port}/udp, "
            f"{len(pod.routes)} routes, {len(pod.neighbours)} neighbours")


@contextlib.contextmanager
def create_podns(podns: str = PODNS) -> Iterator[IPRoute]:
    """Create the netns ``podns`` with lo up (what ``netns@podns.service`` does in the image); an
    ``IPRoute`` in it, for ``setup_vm_network``, until the context ends. ``FileExistsError`` when it exists."""
    with netnsocket.iproute_in(netnsocket.create_netns(podns)) as ipr:
        ipr.link("set", index=linuxns.LOOPBACK_IFINDEX, state="up")
        yield ipr


def _delete_link(ipr: IPRoute, name: str) -> None:
    """Delete the link ``name`` if there is one: one request (a lookup first would be two, and
    would decode the whole link)."""
    try:
        ipr.link("del", ifname=name)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise


def _clear_podns(ipr: IPRoute, names: tuple[str, ...]) -> None:
    """Remove what an earlier run left in podns (and bring lo up)."""
    ipr.link("set", index=linuxns.LOOPBACK_IFINDEX, state="up")
    for name in names:
        _delete_link(ipr, name)


def _create_in_podns(net: PodNetworkConfig, vm_netns: str | None, podns_path: str) -> None:
    """The VXLAN device, created by a request from the VM's netns (its UDP socket lives in the netns
    that created it) straight into podns (IFLA_NET_NS_FD), as the worker side does (``tunnel``).
    It is made under the VNI's name and renamed in podns (``_configure_link``): made as the pod's
    interface (eth0) in the same request, which the host's kernel accepts, the pod VM image's kernel
    (Debian 12) refused it with EEXIST. A device of the VNI's name in the VM's netns (an earlier
    version's leftover) is deleted first."""
    remote = ipaddress.ip_address(net.worker_ip)
    group = {"vxlan_group": str(remote)} if remote.version == 4 else {"vxlan_group6": str(remote)}
    fd = os.open(podns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with netnsocket.iproute_in(linuxns.netns_path(vm_netns) if vm_netns else None) as ipr:
            _delete_link(ipr, device_name(net.vni))
            ipr.link("add", ifname=device_name(net.vni), kind="vxlan", vxlan_id=net.vni, vxlan_port=net.vxlan_port,
                     vxlan_learning=0, net_ns_fd=fd, **group)
    finally:
        os.close(fd)


def _configure_link(ipr: IPRoute, device: str, pod: PodInterface) -> int:
    """Rename the moved device to the pod's interface, with its MAC, MTU and addresses; up. Its index."""
    index = ipr.link_lookup(ifname=device)[0]
    ipr.link("set", index=index, ifname=pod.name, address=pod.mac, mtu=vm_mtu(pod.mtu), state="up")
    for address in pod.addresses:
        iface = ipaddress.ip_interface(address)
        extra: dict[str, Any] = {"flags": IFA_F_NODAD} if iface.version == 6 else {}
        ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen, **extra)
    return index


def _replay_routes(ipr: IPRoute, index: int, pod: PodInterface) -> None:
    """Routes without a gateway first (they make the gateways reachable)."""
    for route in sorted(pod.routes, key=lambda r: r.gateway is not None):
        network = ipaddress.ip_network(route.dst)
        spec: dict[str, Any] = {
            "dst": str(network), "oif": index, "scope": route.scope,
            "family": socket.AF_INET if network.version == 4 else socket.AF_INET6,
        }
        if route.gateway:
            spec["gateway"] = route.gateway
        if route.src:
            spec["prefsrc"] = route.src
        if route.metric is not None:
            spec["priority"] = route.metric
        if route.onlink:
            spec["flags"] = RTNH_F_ONLINK
        try:
            ipr.route("add", **spec)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # e.g. the prefix route adding the address made
                raise PodNetworkError(f"route {route.dst} via {route.gateway or 'link'}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        return f"netlink error {exc.code} ({os.strerror(exc.code)})"
    return str(exc) or type(exc).__name__


# ------------------------------------------------------------------ command


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the command's options to ``parser`` (for mounting as a CLI subcommand)."""
    parser.add_argument("--config", default=APF_CONFIG_PATH, help=f"apf.json (default {APF_CONFIG_PATH})")
    parser.add_argument("--podns", default=PODNS, help=f"the pod's network namespace in the VM (default {PODNS})")
    return parser


def run(args: argparse.Namespace, podns_ipr: IPRoute | None = None, config: ForwarderConfig | None = None) -> int:
    """Set the pod network up from ``args.config``; see the module docstring for the exit status.

    The namespace VM's init, which runs this in-process, passes ``podns_ipr`` (see
    ``setup_vm_network``) and ``config``, apf.json as it has read it already."""
    if config is None:
        try:
            with open(args.config, "rb") as f:
                config = ForwarderConfig.from_json(f.read())
        except OSError as exc:
            print(f"pod-network: cannot read {args.config}: {exc.strerror}", file=sys.stderr, flush=True)
            return 1
        except ApfConfigError as exc:
            print(f"pod-network: {exc}", file=sys.stderr, flush=True)
            return 1
    if config.network is None:
        print(f"pod-network: {args.config} carries no pod network; nothing to do", flush=True)
        return 0
    try:
        summary = setup_vm_network(config.network, args.podns, podns_ipr=podns_ipr)
    except PodNetworkError as exc:
        print(f"pod-network: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"pod-network: {summary}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    summary = (__doc__ or "").splitlines()[0]
    parser = build_parser(argparse.ArgumentParser(prog="pod-network", description=summary))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
