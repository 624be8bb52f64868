"""Pod netns inspection and the worker address, on real namespaces."""

from __future__ import annotations

import asyncio
import os

import pytest
from pyroute2 import IPRoute, netns

from cloudadaptor.config import ConfigError, load_settings
from cloudadaptor.podnetwork.api import NetnsInvalid, NetnsUnusable, PodNetwork, PodNetworkError
from cloudadaptor.podnetwork.netns import inspect_pod_netns, worker_address
from cloudadaptor.podnetwork.vxlan import VxlanPodNetwork
from cloudadaptor.dev.datapath import in_netns
from cloudadaptor.podconfig import PodNeighbour, PodRoute


@pytest.fixture
def bare_netns(private_ns):
    name = f"bare-{os.getpid()}"
    netns.create(name)
    yield name
    netns.remove(name)


def test_inspect_reads_what_cni_gave_the_pod(make_pod_netns):
    pod = make_pod_netns("198.51.100.10/24", "198.51.100.1")
    with IPRoute(netns=pod.name, flags=0) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address="2001:db8::a", prefixlen=64, flags=0x02)  # IFA_F_NODAD
        ipr.route("add", dst="::/0", gateway="2001:db8::1", family=10)  # before the IPv4 one: IPv4 still comes first
        ipr.route("add", dst="203.0.113.0/24", gateway="198.51.100.1", priority=20)
        ipr.neigh("add", dst="198.51.100.1", lladdr="02:00:00:00:00:01", ifindex=eth0, state=0x80)
        ipr.neigh("add", dst="198.51.100.99", lladdr="02:00:00:00:00:99", ifindex=eth0, state=0x02)  # reachable
    info = inspect_pod_netns(pod.path)
    assert (info.name, info.mac, info.mtu) == ("eth0", pod.mac, 1500)
    assert info.addresses == ("198.51.100.10/24", "2001:db8::a/64"), "link-local addresses are left out"
    assert info.routes == (
        PodRoute("0.0.0.0/0", gateway="198.51.100.1"),
        PodRoute("203.0.113.0/24", gateway="198.51.100.1", metric=20),
        PodRoute("::/0", gateway="2001:db8::1", metric=1024),
    ), "CNI's routes (IPv4, then IPv6), not the kernel's prefix routes"
    assert info.neighbours == (PodNeighbour("198.51.100.1", "02:00:00:00:00:01"),), "permanent entries only"


def test_inspect_picks_the_interface_of_the_default_route(make_pod_netns):
    pod = make_pod_netns("198.51.100.10/24", "198.51.100.1")
    with IPRoute(netns=pod.name, flags=0) as ipr:
        ipr.link("add", ifname="aaa0", kind="veth", peer={"ifname": "aaa1"})
        index = ipr.link_lookup(ifname="aaa0")[0]
        ipr.addr("add", index=index, address="203.0.113.5", prefixlen=24)
        ipr.link("set", index=index, state="up")
    assert inspect_pod_netns(pod.path).name == "eth0"


def test_inspect_refuses_a_missing_path(private_ns, tmp_path):
    with pytest.raises(NetnsInvalid, match=f"{tmp_path}/gone does not exist"):
        inspect_pod_netns(str(tmp_path / "gone"))


def test_inspect_refuses_a_file_that_is_no_netns(private_ns, tmp_path):
    path = tmp_path / "netns"
    path.write_text("")
    with pytest.raises(NetnsInvalid, match="is not a network namespace"):
        inspect_pod_netns(str(path))


def test_inspect_refuses_a_netns_without_pod_interface(bare_netns):
    with pytest.raises(NetnsUnusable) as err:
        inspect_pod_netns(f"/run/netns/{bare_netns}")
    assert f"/run/netns/{bare_netns}" in str(err.value) and "no pod interface" in str(err.value)
    assert "interfaces: lo" in str(err.value)


def test_worker_address_is_the_source_towards_the_vm_network(cloud_net):
    assert worker_address("192.0.2.250") == cloud_net.worker_ip == "192.0.2.241"


def _with_default_route(name: str) -> None:
    with IPRoute(netns=name, flags=0) as ipr:
        ipr.link("add", ifname="up0", kind="veth", peer={"ifname": "up1"})
        index = ipr.link_lookup(ifname="up0")[0]
        ipr.addr("add", index=index, address="203.0.113.7", prefixlen=24)
        ipr.link("set", index=index, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="up1")[0], state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway="203.0.113.1")


def test_worker_address_falls_back_to_the_default_route(bare_netns):
    _with_default_route(bare_netns)
    path = f"/run/netns/{bare_netns}"
    assert in_netns(path, lambda: worker_address(None)) == "203.0.113.7"
    assert in_netns(path, lambda: worker_address("10.99.0.1")) == "203.0.113.7", "an unroutable hint falls back"


def test_worker_address_without_any_route_names_the_override_key(bare_netns):
    with pytest.raises(PodNetworkError, match="VXLAN_WORKER_IP"):
        in_netns(f"/run/netns/{bare_netns}", lambda: worker_address("192.0.2.250"))


async def test_worker_ip_override_skips_detection(private_ns):
    network = VxlanPodNetwork(worker_ip_override="192.0.2.77")
    assert isinstance(network, PodNetwork)
    assert await network.worker_ip("192.0.2.250") == "192.0.2.77", "no route to the hint exists here"
    with pytest.raises(PodNetworkError):
        await VxlanPodNetwork().worker_ip("192.0.2.250")


async def test_vxlan_pod_network_inspects_off_the_event_loop(make_pod_netns):
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.10/24", "198.51.100.1")
    info = await VxlanPodNetwork().inspect(pod.path)
    assert info.addresses == ("198.51.100.10/24",)


def test_vxlan_worker_ip_key_is_validated():
    settings = load_settings({"CLOUD_PROVIDER": "local", "VXLAN_WORKER_IP": "192.0.2.9"})
    assert settings.vxlan_worker_ip == "192.0.2.9"
    assert load_settings({"CLOUD_PROVIDER": "local"}).vxlan_worker_ip is None
    with pytest.raises(ConfigError) as err:
        load_settings({"CLOUD_PROVIDER": "local", "VXLAN_WORKER_IP": "worker-1"})
    assert 'VXLAN_WORKER_IP="worker-1": expected an IP address' in str(err.value)

