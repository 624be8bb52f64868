"""The VXLAN tunnel with real packets: worker-side network ⇄ pod netns ⇄ VM podns.

Every test runs in the private namespace: the "cloud" is a bridge with bare
network namespaces as VMs (``CloudNet``), the pod netns is made the way CNI
would, and both tunnel ends are the product code (``tunnel`` and ``vmside``).
"""

from __future__ import annotations

import os
import socket
import threading

import pytest
from pyroute2 import IPRoute

from cloudadaptor.podnetwork import tunnel
from cloudadaptor.podnetwork.api import NetnsUnusable, TunnelSpec, device_name
from cloudadaptor.podnetwork.netns import open_netns
from cloudadaptor.dev.datapath import Sniffer, icmp_echo, mentions, socket_in_netns, udp_destination_ports


def serve_once(listener: socket.socket, seen: dict) -> threading.Thread:
    """Accept one connection, record the peer, echo the message upper-cased."""

    def run() -> None:
        conn, peer = listener.accept()
        with conn:
            seen["peer"] = peer[0]
            conn.sendall(conn.recv(65536).upper())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def tcp_exchange(address: str, podns: str, port: int = 8080, message: bytes = b"hello pod") -> tuple[bytes, str]:
    """A TCP server in ``podns``, a client in this (worker) netns; (reply, peer seen by the server)."""
    listener = socket_in_netns(podns)
    listener.settimeout(5)
    listener.bind((address, port))
    listener.listen(1)
    seen: dict = {}
    thread = serve_once(listener, seen)
    try:
        with socket.create_connection((address, port), timeout=5) as conn:
            conn.sendall(message)
            reply = conn.recv(65536)
    finally:
        thread.join(5)
        listener.close()
    return reply, seen.get("peer", "")


def links_in(netns_path: str | None) -> dict[str, dict]:
    if netns_path is None:
        with IPRoute() as ipr:
            return {link.get("IFLA_IFNAME"): link for link in ipr.get_links()}
    with open_netns(netns_path) as ipr:
        return {link.get("IFLA_IFNAME"): link for link in ipr.get_links()}


def vxlan_data(link) -> dict:
    data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
    return {name: value for name, value in data["attrs"]}


# ------------------------------------------------------------------ packets


def test_tcp_exchange_from_worker_lands_in_vm_podns_and_comes_back(link_pod):
    pod = link_pod("198.51.100.10/24")
    reply, peer = tcp_exchange("198.51.100.10", pod.podns)
    assert reply == b"HELLO POD", "the server in the VM's podns answered through the tunnel"
    assert peer == "198.51.100.1", "the VM saw the worker-side address (the pod's gateway) as the client"


def test_ping_from_worker_is_answered_by_the_vm_podns(link_pod):
    pod = link_pod("198.51.100.10/24")
    sniffer = Sniffer("eth0", pod.podns)
    rtt = icmp_echo("198.51.100.10")
    frames = sniffer.stop()
    assert rtt < 3
    assert mentions(frames, "198.51.100.10"), "the echo request reached the VM's podns (not the worker's pod netns)"


def test_1400_byte_payloads_cross_the_tunnel_unfragmented(link_pod):
    pod = link_pod("198.51.100.10/24")
    icmp_echo("198.51.100.10", payload=1400)  # DF set: would fail if the path could not carry it
    server = socket_in_netns(pod.podns, socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("198.51.100.10", 7000))
    server.settimeout(5)
    with server, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: DF
        client.settimeout(5)
        payload = bytes(range(256)) * 5 + bytes(120)
        assert len(payload) == 1400
        client.sendto(payload, ("198.51.100.10", 7000))
        data, peer = server.recvfrom(65536)
        server.sendto(data[::-1], peer)
        echoed, _ = client.recvfrom(65536)
    assert data == payload and echoed == payload[::-1]


@pytest.mark.parametrize("port", [9000, 4789])
def test_vxlan_devices_use_the_configured_udp_port(link_pod, cloud_net, port):
    pod = link_pod("198.51.100.10/24", port=port)
    worker_dev = links_in(pod.pod.path)[device_name(555000)]
    vm_dev = links_in(pod.podns)["eth0"]
    assert vxlan_data(worker_dev)["IFLA_VXLAN_PORT"] == port
    assert vxlan_data(vm_dev)["IFLA_VXLAN_PORT"] == port
    assert vxlan_data(worker_dev)["IFLA_VXLAN_ID"] == vxlan_data(vm_dev)["IFLA_VXLAN_ID"] == 555000
    sniffer = Sniffer(cloud_net.bridge)
    reply, _ = tcp_exchange("198.51.100.10", pod.podns)
    ports = udp_destination_ports(sniffer.stop())
    assert reply == b"HELLO POD"
    assert port in ports, f"VXLAN traffic on the VM network went to UDP ports {sorted(ports)}, expected {port}"
    assert {9000, 4789} - {port} & ports == set(), "no traffic on the other port"


def test_two_pods_get_their_own_tunnels_and_do_not_see_each_others_traffic(link_pod):
    a = link_pod("198.51.100.11/24", vni=555000)
    b = link_pod("198.51.100.12/24", vni=555001)
    sniff_a, sniff_b = Sniffer("eth0", a.podns), Sniffer("eth0", b.podns)
    assert tcp_exchange("198.51.100.11", a.podns)[0] == b"HELLO POD"
    icmp_echo("198.51.100.11")
    frames_a, frames_b = sniff_a.stop(), sniff_b.stop()
    assert mentions(frames_a, "198.51.100.11"), "pod A's VM saw pod A's traffic"
    assert not mentions(frames_b, "198.51.100.11"), "pod B's VM saw pod A's traffic"
    assert tcp_exchange("198.51.100.12", b.podns)[0] == b"HELLO POD", "pod B works alongside"


# ---------------------------------------------------------------- lifecycle


def test_tunnel_up_redirects_both_ways_between_pod_interface_and_vxlan(link_pod):
    pod = link_pod()
    with open_netns(pod.pod.path) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        vxlan = ipr.link_lookup(ifname=device_name(555000))[0]
        assert tunnel.redirect_targets(ipr, eth0) == [vxlan]
        assert tunnel.redirect_targets(ipr, vxlan) == [eth0]
    assert device_name(555000) not in links_in(None), "the device lives in the pod netns only"


def test_tunnel_down_removes_device_filters_and_qdisc_and_is_idempotent(link_pod):
    pod = link_pod()
    tunnel.tunnel_down(pod.spec)
    tunnel.tunnel_down(pod.spec)
    assert set(links_in(pod.pod.path)) == {"lo", "eth0"}
    with open_netns(pod.pod.path) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        assert tunnel.ingress_filters(ipr, eth0) == []
        kinds = [q.get("TCA_KIND") for q in ipr.get_qdiscs(index=eth0)]
    assert "ingress" not in kinds, f"ingress qdisc left on the pod interface: {kinds}"
    assert device_name(555000) not in links_in(None)


def test_tunnel_down_keeps_other_ingress_filters_on_the_pod_interface(link_pod):
    pod = link_pod()
    with open_netns(pod.pod.path) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.tc("add-filter", "u32", eth0, parent=tunnel.INGRESS, prio=7, protocol=tunnel.ETH_P_ALL,
               target=tunnel.U32_CLASSID, keys=["0x0/0x0+0"],
               action={"kind": "mirred", "direction": "egress", "action": "mirror", "ifindex": 1})
    tunnel.tunnel_down(pod.spec)
    with open_netns(pod.pod.path) as ipr:
        prios = {f["info"] >> 16 for f in tunnel.ingress_filters(ipr, eth0)}
    assert prios == {7}, "our filter is gone, the foreign one stays"


def test_tunnel_down_after_the_pod_netns_is_gone_is_harmless(link_pod):
    pod = link_pod()
    assert device_name(pod.spec.vni) in links_in(pod.pod.path)
    pod.pod.delete()
    tunnel.tunnel_down(pod.spec)
    tunnel.tunnel_down(pod.spec)
    # The device and its filters went with the pod netns; nothing was left, or recreated, in the worker's.
    assert not os.path.exists(pod.spec.netns_path)
    assert device_name(pod.spec.vni) not in links_in(None)


def test_failed_tunnel_up_leaves_nothing_behind(link_pod, make_pod_netns, cloud_net):
    pod = make_pod_netns("198.51.100.20/24", "198.51.100.1")
    spec = TunnelSpec(pod.path, "eth9", 555002, 9000, "192.0.2.242")
    with pytest.raises(NetnsUnusable, match="eth9"):
        tunnel.tunnel_up(spec)
    assert set(links_in(pod.path)) == {"lo", "eth0"}
    assert device_name(555002) not in links_in(None)
    with open_netns(pod.path) as ipr:
        assert tunnel.ingress_filters(ipr, ipr.link_lookup(ifname="eth0")[0]) == []


def test_device_left_in_worker_netns_by_a_crash_is_swept_or_replaced(make_pod_netns, cloud_net):
    pod = make_pod_netns("198.51.100.21/24", "198.51.100.1")
    with IPRoute() as ipr:  # a crash between creating the device and moving it
        ipr.link("add", ifname=device_name(555003), kind="vxlan", vxlan_id=555003, vxlan_port=9000,
                 vxlan_group="192.0.2.242")
    assert tunnel.sweep_worker_devices({555003}) == [], "a known VNI's device is left to its sandbox"
    spec = TunnelSpec(pod.path, "eth0", 555003, 9000, "192.0.2.242")
    tunnel.tunnel_up(spec)  # a retried start replaces the leftover
    assert device_name(555003) in links_in(pod.path) and device_name(555003) not in links_in(None)
    tunnel.tunnel_down(spec)
    with IPRoute() as ipr:
        ipr.link("add", ifname=device_name(555004), kind="vxlan", vxlan_id=555004, vxlan_port=9000,
                 vxlan_group="192.0.2.242")
    actions = tunnel.sweep_worker_devices({555003})
    assert actions == [f"deleted stale tunnel device {device_name(555004)} (VNI 555004) in the worker netns"]
    assert device_name(555004) not in links_in(None)


def test_the_daemons_sweep_runs_in_a_child_and_finds_a_crashs_device_and_filter(cloud_net):
    """``VxlanPodNetwork.sweep`` (what ``recover`` calls at start) works in a child so that the daemon
    loads no pyroute2 before its first pod; it must still delete what a crash left, and only that."""
    import asyncio

    from cloudadaptor.podnetwork import peerfilter
    from cloudadaptor.podnetwork.vxlan import VxlanPodNetwork

    with IPRoute() as ipr:
        for vni in (555005, 555006):
            ipr.link("add", ifname=device_name(vni), kind="vxlan", vxlan_id=vni, vxlan_port=9000,
                     vxlan_group="192.0.2.242")
    peerfilter.install(555007, 9000, "192.0.2.242")
    try:
        actions = asyncio.run(VxlanPodNetwork().sweep({555005}))  # pyroute2's sync API runs its own loop
        assert sorted(actions) == sorted([
            f"deleted stale tunnel device {device_name(555006)} (VNI 555006) in the worker netns",
            "deleted stale VXLAN peer filter ppvx555007",
        ])
        assert device_name(555005) in links_in(None), "a known VNI's device is its sandbox's"
        assert device_name(555006) not in links_in(None) and 555007 not in peerfilter.installed()
    finally:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=device_name(555005)):
                ipr.link("del", index=index)


async def test_a_failing_sweep_child_is_one_clear_pod_network_error(monkeypatch):
    from cloudadaptor.podnetwork.api import PodNetworkError
    from cloudadaptor.podnetwork.vxlan import VxlanPodNetwork

    monkeypatch.setattr("sys.executable", "/bin/false")
    with pytest.raises(PodNetworkError, match="the worker netns sweep failed: exit status 1"):
        await VxlanPodNetwork().sweep(set())
