"""TCP throughput through the pod VXLAN tunnel, next to bare kernel VXLAN and a plain veth.

    python -m bench --only tunnel          (or, alone: python -m bench.tunnel_throughput [--seconds 3])

Runs inside the private namespace (nothing on the machine's network changes).
It builds a fake cloud (a bridge with the worker's address, one "VM" netns on
it) and a pod netns made the way CNI would, then brings both ends of the
tunnel up with the product code (``podnetwork.tunnel`` on the worker side,
``podnetwork.vmside`` in the VM). Single-stream TCP transfers from the
worker's netns, each for ``--seconds``:

- plain veth: to a server on the VM's own address (bridge + veth, no tunnel);
- bare VXLAN: two kernel VXLAN devices, one in the worker's netns and one in
  the VM's, over the same bridge and veth, with the pod's MTU — the ceiling a
  VXLAN tunnel can reach on this kernel;
- pod tunnel: to a server on the pod IP inside the VM's podns (pod veth →
  tc redirect → VXLAN over the same bridge + veth → podns), once with the pod
  interface at the tunnel's MTU (1450, what an overlay CNI sets on a 1500-byte
  network) and once at 1500 (a CNI that does not account for the tunnel).

Figures are printed, never asserted: they depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

from pyroute2 import IPRoute

from cloudadaptor.dev import privatens
from cloudadaptor.dev.datapath import CloudNet, socket_in_netns
from cloudadaptor.dev.podnet import create_pod_netns
from cloudadaptor.podconfig import PodNetworkConfig
from cloudadaptor.podnetwork import tunnel, vmside
from cloudadaptor.podnetwork.api import TunnelSpec
from cloudadaptor.podnetwork.netns import inspect_pod_netns
from cloudadaptor.wire import VXLAN_MAX_MTU

from bench.table import Row

CHUNK = 1 << 20
PORT = 5201
BARE_VNI, BARE_PORT = 7, 4789
BARE_WORKER, BARE_VM = "203.0.113.1", "203.0.113.2"  # on the bare VXLAN devices only


def transfer(listener: socket.socket, address: str, seconds: float) -> float:
    """Send from this netns to ``listener`` for ``seconds``; bits per second received."""
    received = [0]

    def sink() -> None:
        conn, _ = listener.accept()
        buffer = bytearray(CHUNK)
        with conn:
            while n := conn.recv_into(buffer):
                received[0] += n

    thread = threading.Thread(target=sink)
    thread.start()
    payload = bytes(CHUNK)
    with socket.create_connection((address, PORT), timeout=10) as conn:
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        thread.join()
        elapsed = time.monotonic() - began
    return received[0] * 8 / elapsed


def listen_in(netns_path: str, address: str) -> socket.socket:
    listener = socket_in_netns(netns_path)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, PORT))
    listener.listen(1)
    return listener


def measure(netns_path: str, address: str, seconds: float) -> float:
    with listen_in(netns_path, address) as listener:
        transfer(listener, address, min(0.5, seconds))  # warm up (ARP, slow start)
        return transfer(listener, address, seconds)


def bare_vxlan(vm_netns: str, vm_name: str, vm_ip: str, worker_ip: str, mtu: int) -> None:
    """Kernel VXLAN between the worker's netns and the VM's, nothing of ours in between."""
    for ns, local, remote, address in ((None, worker_ip, vm_ip, BARE_WORKER), (vm_name, vm_ip, worker_ip, BARE_VM)):
        with (IPRoute(netns=ns, flags=0) if ns else IPRoute()) as ipr:
            ipr.link("add", ifname="ppbarevx", kind="vxlan", vxlan_id=BARE_VNI, vxlan_port=BARE_PORT,
                     vxlan_group=remote, vxlan_local=local, vxlan_learning=0)
            index = ipr.link_lookup(ifname="ppbarevx")[0]
            ipr.link("set", index=index, mtu=mtu, state="up")
            ipr.addr("add", index=index, address=address, prefixlen=30)


def remove_bare_vxlan() -> None:
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname="ppbarevx"):
            ipr.link("del", index=index)


def run_all(seconds: float, vxlan_port: int = 9000, pod_mtus: tuple[int, ...] = (VXLAN_MAX_MTU, 1500)) -> list[Row]:
    """Every transfer, as table rows (Gbit/s, compared with bare VXLAN; veth shown too)."""
    cloud = CloudNet(bridge="ppbench0", cidr="192.0.2.240/28").open()
    pods = []
    try:
        vm_netns, vm_ip = cloud.add_vm("benchvm")
        veth = measure(vm_netns, vm_ip, seconds)
        bare_vxlan(vm_netns, "benchvm", vm_ip, cloud.worker_ip, VXLAN_MAX_MTU)
        bare = measure(vm_netns, BARE_VM, seconds)
        remove_bare_vxlan()
        rows = [Row("TCP over a plain veth (worker → VM address)", veth / 1e9, "Gbit/s", veth / 1e9, "itself"),
                Row(f"TCP over bare kernel VXLAN, MTU {VXLAN_MAX_MTU}", bare / 1e9, "Gbit/s", veth / 1e9, "plain veth")]
        for i, mtu in enumerate(pod_mtus):
            pod = create_pod_netns(f"bench-pod{i}", "198.51.100.10/24", "198.51.100.1", mtu=mtu)
            pods.append(pod)
            interface = inspect_pod_netns(pod.path)
            spec = TunnelSpec(pod.path, interface.name, 555000, vxlan_port, vm_ip)
            tunnel.tunnel_up(spec)
            vmside.setup_vm_network(PodNetworkConfig(interface, cloud.worker_ip, 555000, vxlan_port),
                                    CloudNet.podns_of("benchvm"), vm_netns)
            bps = measure(f"/run/netns/{CloudNet.podns_of('benchvm')}", pod.pod_ip, seconds)
            rows.append(Row(f"TCP through the pod tunnel, pod MTU {mtu}", bps / 1e9, "Gbit/s", bare / 1e9,
                            f"bare VXLAN; veth ratio {bps / veth:.2f}", "≥ 0.9" if mtu == VXLAN_MAX_MTU else ""))
            tunnel.tunnel_down(spec)
            pod.delete()
            pods.remove(pod)
        return rows
    finally:
        for pod in pods:
            pod.delete()
        remove_bare_vxlan()
        cloud.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each transfer (default 3)")
    parser.add_argument("--vxlan-port", type=int, default=9000, help="VXLAN UDP port (default 9000)")
    args = parser.parse_args()
    if not privatens.inside():
        privatens.exec_inside([sys.executable, "-m", "bench.tunnel_throughput", *sys.argv[1:]])
    from bench.table import render

    print(f"TCP throughput, one stream, {args.seconds:g} s each, {os.cpu_count()} CPUs:")
    print(render(run_all(args.seconds, args.vxlan_port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
