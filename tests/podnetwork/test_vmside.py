"""The VM side of the tunnel: the pod interface re-created in the VM's podns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from cloudadaptor.podnetwork import vmside
from cloudadaptor.dev.datapath import CloudNet
from cloudadaptor.podconfig import ForwarderConfig, PodInterface, PodNeighbour, PodNetworkConfig, PodRoute

# Calico style: the gateway is a link-local address reachable only through a
# scope-link route, listed here after the route that needs it.
CALICO = PodInterface(
    name="eth0", mac="02:00:00:00:00:0a", mtu=1500, addresses=("198.51.100.10/32", "2001:db8::a/128"),
    routes=(
        PodRoute("0.0.0.0/0", gateway="169.254.1.1"),
        PodRoute("169.254.1.1/32", scope=253),
        PodRoute("::/0", gateway="fe80::ecee:eeff:feee:eeee"),
    ),
    neighbours=(PodNeighbour("169.254.1.1", "ee:ee:ee:ee:ee:ee"),),
)


@pytest.fixture
def vm(cloud_net):
    """(vm netns path, podns name) of a bare-netns VM on the fake cloud."""
    name = f"vmside{os.getpid() % 1000}"
    path, _ = cloud_net.add_vm(name)
    return path, CloudNet.podns_of(name)


def config(pod: PodInterface = CALICO, port: int = 9000) -> PodNetworkConfig:
    return PodNetworkConfig(pod, worker_ip="192.0.2.241", vni=555123, vxlan_port=port)


def podns_state(podns: str) -> dict:
    with IPRoute(netns=podns, flags=0) as ipr:
        [link] = [link for link in ipr.get_links() if link.get("IFLA_IFNAME") != "lo"]
        index = link["index"]
        data = dict(link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")["attrs"])
        return {
            "link": link,
            "vxlan": data,
            "addresses": sorted(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=index)
                                if not a.get("IFA_ADDRESS").startswith("fe80")),
            "routes": {(r.get("RTA_DST"), r["dst_len"], r.get("RTA_GATEWAY"))
                       for r in ipr.get_routes(table=254) + ipr.get_routes(family=10, table=254)},
            "neighbours": {(n.get("NDA_DST"), n.get("NDA_LLADDR"), n["state"]) for n in ipr.get_neighbours(ifindex=index)},
            "lo_up": bool(ipr.get_links(ipr.link_lookup(ifname="lo")[0])[0]["flags"] & 1),
        }


def test_vm_side_gives_podns_the_pod_interface_over_vxlan(vm):
    vm_netns, podns = vm
    summary = vmside.setup_vm_network(config(), podns, vm_netns)
    state = podns_state(podns)
    link = state["link"]
    assert link.get("IFLA_IFNAME") == "eth0" and link.get("IFLA_ADDRESS") == "02:00:00:00:00:0a"
    assert link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "vxlan"
    assert link.get("IFLA_LINK_NETNSID") is not None, "the UDP socket stays in the VM's own netns"
    assert (state["vxlan"]["IFLA_VXLAN_ID"], state["vxlan"]["IFLA_VXLAN_PORT"]) == (555123, 9000)
    assert state["vxlan"]["IFLA_VXLAN_GROUP"] == "192.0.2.241", "the tunnel's remote end is the worker"
    assert state["addresses"] == ["198.51.100.10/32", "2001:db8::a/128"]
    assert {(None, 0, "169.254.1.1"), ("169.254.1.1", 32, None), (None, 0, "fe80::ecee:eeff:feee:eeee")} <= state["routes"]
    assert ("169.254.1.1", "ee:ee:ee:ee:ee:ee", 0x80) in state["neighbours"]
    assert state["lo_up"] and link["flags"] & 1
    assert "eth0 in " in summary and "VNI 555123" in summary


@pytest.mark.parametrize(("pod_mtu", "expected"), [(1500, 1450), (1400, 1400), (9000, 1450)])
def test_vm_side_mtu_is_the_pod_mtu_capped_at_1450(vm, pod_mtu, expected):
    vm_netns, podns = vm
    pod = PodInterface("eth0", "02:00:00:00:00:0b", pod_mtu, ("198.51.100.11/24",))
    vmside.setup_vm_network(config(pod), podns, vm_netns)
    assert podns_state(podns)["link"].get("IFLA_MTU") == expected


def test_vm_side_rerun_replaces_the_earlier_interface(vm):
    vm_netns, podns = vm
    vmside.setup_vm_network(config(), podns, vm_netns)
    vmside.setup_vm_network(config(port=4789), podns, vm_netns)
    state = podns_state(podns)  # exactly one interface besides lo
    assert state["vxlan"]["IFLA_VXLAN_PORT"] == 4789


def test_vm_side_keeps_the_pod_interface_name(vm):
    vm_netns, podns = vm
    pod = PodInterface("net1", "02:00:00:00:00:0c", 1500, ("198.51.100.12/24",),
                       routes=(PodRoute("0.0.0.0/0", gateway="198.51.100.1"),))
    vmside.setup_vm_network(config(pod), podns, vm_netns)
    assert podns_state(podns)["link"].get("IFLA_IFNAME") == "net1"


def write_apf(path: Path, network: PodNetworkConfig | None) -> str:
    path.write_text(ForwarderConfig("sid", "web", "default", network=network).to_json())
    return str(path)


def run_command(vm_netns: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m cloudadaptor.podnetwork.vmside`` run inside the VM's netns, as the VM boot does."""
    return subprocess.run(
        [sys.executable, "-m", "cloudadaptor.dev.nsexec", "--net", vm_netns, "--",
         sys.executable, "-m", "cloudadaptor.podnetwork.vmside", *args],
        capture_output=True, text=True, timeout=30,
    )


def test_command_sets_the_pod_network_up_from_apf_json(vm, tmp_path):
    vm_netns, podns = vm
    result = run_command(vm_netns, "--config", write_apf(tmp_path / "apf.json", config()), "--podns", podns)
    assert result.returncode == 0, result.stderr
    assert "pod-network: eth0 in" in result.stdout
    assert podns_state(podns)["addresses"] == ["198.51.100.10/32", "2001:db8::a/128"]


def test_command_without_pod_network_does_nothing(vm, tmp_path):
    vm_netns, podns = vm
    result = run_command(vm_netns, "--config", write_apf(tmp_path / "apf.json", None), "--podns", podns)
    assert result.returncode == 0 and "carries no pod network; nothing to do" in result.stdout


def test_command_reports_a_missing_or_bad_config(vm, tmp_path):
    vm_netns, podns = vm
    missing = run_command(vm_netns, "--config", str(tmp_path / "nope.json"), "--podns", podns)
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    (tmp_path / "bad.json").write_text('{"sandbox_id": "s", "pod_name": "p", "pod_namespace": "n", "network": {"vni": 0}}')
    bad = run_command(vm_netns, "--config", str(tmp_path / "bad.json"), "--podns", podns)
    assert bad.returncode == 1 and "network." in bad.stderr, bad.stderr
