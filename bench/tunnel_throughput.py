"""TCP throughput through the pod VXLAN tunnel next to the same transfer over a plain veth.

    .venv/bin/python -m cloudadaptor.dev.privatens -- .venv/bin/python bench/tunnel_throughput.py [--seconds 3]

Runs inside the private namespace (nothing on the machine's network changes).
It builds a fake cloud (a bridge with the worker's address, one "VM" netns on
it) and a pod netns made the way CNI would, then brings both ends of the
tunnel up with the product code (``podnetwork.tunnel`` on the worker side,
``podnetwork.vmside`` in the VM). Two single-stream TCP transfers from the
worker's netns, each for ``--seconds``:

- plain veth: to a server on the VM's own address (bridge + veth, no tunnel);
- VXLAN tunnel: to a server on the pod IP inside the VM's podns (pod veth →
  tc redirect → VXLAN over the same bridge + veth → podns).

Figures are printed, never asserted: they depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

from cloudadaptor.podnetwork import tunnel, vmside
from cloudadaptor.podnetwork.api import TunnelSpec
from cloudadaptor.podnetwork.netns import inspect_pod_netns
from cloudadaptor.dev import privatens
from cloudadaptor.dev.datapath import CloudNet, socket_in_netns
from cloudadaptor.dev.podnet import create_pod_netns
from cloudadaptor.podconfig import PodNetworkConfig

CHUNK = 1 << 20
PORT = 5201


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


def run(seconds: float, vxlan_port: int) -> None:
    cloud = CloudNet(bridge="ppbench0", cidr="192.0.2.240/28").open()
    pod = None
    try:
        vm_netns, vm_ip = cloud.add_vm("benchvm")
        pod = create_pod_netns("bench-pod", "198.51.100.10/24", "198.51.100.1")
        interface = inspect_pod_netns(pod.path)
        tunnel.tunnel_up(TunnelSpec(pod.path, interface.name, 555000, vxlan_port, vm_ip))
        config = PodNetworkConfig(interface, cloud.worker_ip, 555000, vxlan_port)
        vmside.setup_vm_network(config, CloudNet.podns_of("benchvm"), vm_netns)
        podns = f"/run/netns/{CloudNet.podns_of('benchvm')}"
        results = []
        for label, netns_path, address in (
            (f"plain veth    worker -> VM {vm_ip}", vm_netns, vm_ip),
            (f"VXLAN tunnel  worker -> pod {pod.pod_ip} (VM podns, udp/{vxlan_port})", podns, pod.pod_ip),
        ):
            with listen_in(netns_path, address) as listener:
                transfer(listener, address, min(0.5, seconds))  # warm up (ARP, slow start)
                bps = transfer(listener, address, seconds)
            results.append(bps)
            print(f"  {label:<62} {bps / 1e9:7.2f} Gbit/s", flush=True)
        print(f"  ratio tunnel / plain veth: {results[1] / results[0]:.2f}")
    finally:
        if pod is not None:
            pod.delete()
        cloud.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each transfer (default 3)")
    parser.add_argument("--vxlan-port", type=int, default=9000, help="VXLAN UDP port (default 9000)")
    args = parser.parse_args()
    if not privatens.inside():
        print("run inside the private namespace: python -m cloudadaptor.dev.privatens -- "
              f"{sys.executable} {' '.join(sys.argv)}", file=sys.stderr)
        return 2
    print(f"TCP throughput, one stream, {args.seconds:g} s each, {os.cpu_count()} CPUs:")
    run(args.seconds, args.vxlan_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
