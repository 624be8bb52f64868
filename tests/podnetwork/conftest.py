"""Pod network fixtures: a fake cloud (bridge + bare-netns VMs) and pods tunnelled to it."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

from cloudadaptor import linuxns
from cloudadaptor.podnetwork import tunnel, vmside
from cloudadaptor.podnetwork.api import TunnelSpec
from cloudadaptor.podnetwork.netns import inspect_pod_netns
from cloudadaptor.dev.datapath import CloudNet
from cloudadaptor.podconfig import PodNetworkConfig

_serial = itertools.count(1)


@pytest.fixture
def cloud_net(private_ns: None) -> Iterator[CloudNet]:
    """A bridge with the worker at 192.0.2.241/28 and room for VMs; removed at teardown."""
    n = next(_serial)
    net = CloudNet(bridge=f"pptn{os.getpid() % 1000}x{n}"[:15], cidr="192.0.2.240/28").open()
    yield net
    net.close()


@dataclass
class Linked:
    """A pod netns tunnelled to a bare-netns VM whose pod interface is in ``podns``."""

    pod: object  # testing.podnet.PodNetns
    vm_netns: str
    vm_ip: str
    podns: str  # path
    spec: TunnelSpec
    config: PodNetworkConfig


@pytest.fixture
def link_pod(cloud_net: CloudNet, make_pod_netns) -> Iterator[Callable[..., Linked]]:
    """``link_pod("198.51.100.10/24", vni=555000, port=9000)``: a pod netns, its VM,
    both sides of the tunnel up. Tunnels are taken down at teardown."""
    made: list[Linked] = []

    def link(pod_cidr: str = "198.51.100.10/24", vni: int = 555000, port: int = 9000) -> Linked:
        pod = make_pod_netns(pod_cidr, "198.51.100.1")
        vm_name = f"vm{os.getpid() % 1000}x{next(_serial)}"
        vm_netns, vm_ip = cloud_net.add_vm(vm_name)
        interface = inspect_pod_netns(pod.path)
        spec = TunnelSpec(pod.path, interface.name, vni, port, vm_ip)
        tunnel.tunnel_up(spec)
        config = PodNetworkConfig(interface, cloud_net.worker_ip, vni, port)
        vmside.setup_vm_network(config, CloudNet.podns_of(vm_name), vm_netns)
        linked = Linked(pod, vm_netns, vm_ip, linuxns.netns_path(CloudNet.podns_of(vm_name)), spec, config)
        made.append(linked)
        return linked

    yield link
    for linked in made:
        tunnel.tunnel_down(linked.spec)
