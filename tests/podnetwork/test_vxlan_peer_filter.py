"""Only the recorded peer speaks into a pod's VXLAN tunnel (issue 11 item 2).

Real packets in the private namespace: an attacker is one more host on the
fake cloud network; it sends VXLAN frames carrying the pod's VNI to the
worker's and to the VM's UDP port. Sniffers inside the pod netns (worker side)
and the VM's podns count what arrives; the real peer's frames, sent the same
way, must still arrive.
"""

from __future__ import annotations

import os
import socket
import struct

from cloudadaptor.podnetwork import peerfilter, tunnel, vmside
from cloudadaptor.dev.datapath import Sniffer, in_netns, socket_in_netns

FRAMES = 50


def vxlan_frame(vni: int, marker: bytes) -> bytes:
    """A VXLAN packet (RFC 7348: I flag, VNI) carrying a broadcast Ethernet frame with ``marker``."""
    inner = b"\xff" * 6 + bytes.fromhex("02005e005301") + struct.pack("!H", 0x88B5) + marker.ljust(46, b"\0")
    return struct.pack("!B3xI", 0x08, vni << 8) + inner


def send_from(netns_path: str, destination: str, port: int, vni: int, marker: bytes) -> None:
    sock = socket_in_netns(netns_path, socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for _ in range(FRAMES):
            sock.sendto(vxlan_frame(vni, marker), (destination, port))


def count(frames: list[bytes], marker: bytes) -> int:
    return sum(1 for frame in frames if marker in frame)


def test_injected_frames_never_reach_the_pod_while_the_vms_do(link_pod, cloud_net):
    pod = link_pod("198.51.100.10/24", vni=555000, port=9000)
    attacker_ns, attacker_ip = cloud_net.add_vm(f"atk{os.getpid() % 1000}")
    assert attacker_ip not in (pod.vm_ip, cloud_net.worker_ip)
    sniffer = Sniffer("eth0", pod.pod.path)
    send_from(attacker_ns, cloud_net.worker_ip, 9000, 555000, b"INJECTED-TO-WORKER")
    send_from(pod.vm_netns, cloud_net.worker_ip, 9000, 555000, b"FROM-THE-REAL-VM")
    frames = sniffer.stop()
    assert count(frames, b"INJECTED-TO-WORKER") == 0, "a frame from a third address reached the pod netns"
    assert count(frames, b"FROM-THE-REAL-VM") == FRAMES, "the VM's own frames must still reach the pod"


def test_injected_frames_never_reach_the_vm_podns_while_the_workers_do(link_pod, cloud_net):
    pod = link_pod("198.51.100.10/24", vni=555000, port=9000)
    attacker_ns, _ = cloud_net.add_vm(f"atk{os.getpid() % 1000}")
    sniffer = Sniffer("eth0", pod.podns)
    send_from(attacker_ns, pod.vm_ip, 9000, 555000, b"INJECTED-TO-VM")
    # The worker's frames come from the worker's address (this netns), as the tunnel's own would.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((cloud_net.worker_ip, 0))
        for _ in range(FRAMES):
            sock.sendto(vxlan_frame(555000, b"FROM-THE-WORKER"), (pod.vm_ip, 9000))
    frames = sniffer.stop()
    assert count(frames, b"INJECTED-TO-VM") == 0, "a frame from a third address reached the VM's podns"
    assert count(frames, b"FROM-THE-WORKER") == FRAMES


def test_other_vnis_and_ports_are_left_alone(link_pod, cloud_net):
    """The filter matches only this tunnel: the attacker's frames to another VNI are not ours to judge
    (no device takes them), and the tables are per VNI."""
    a = link_pod("198.51.100.11/24", vni=555000)
    b = link_pod("198.51.100.12/24", vni=555001)
    assert set(peerfilter.installed()) >= {555000, 555001}
    tunnel.tunnel_down(a.spec)
    assert 555000 not in peerfilter.installed() and 555001 in peerfilter.installed()
    sniffer = Sniffer("eth0", b.pod.path)
    send_from(b.vm_netns, cloud_net.worker_ip, 9000, 555001, b"B-STILL-WORKS")
    assert count(sniffer.stop(), b"B-STILL-WORKS") == FRAMES


def test_tunnel_down_removes_the_filter_and_sweep_finds_leftovers(link_pod):
    pod = link_pod(vni=555002)
    assert 555002 in peerfilter.installed()
    in_vm = in_netns(pod.vm_netns, peerfilter.installed)
    assert in_vm == [555002], "the VM side filters its tunnel in the VM's netns"
    tunnel.tunnel_down(pod.spec)
    tunnel.tunnel_down(pod.spec)
    assert 555002 not in peerfilter.installed(), "tunnel_down leaves no rule behind"
    peerfilter.install(555009, 9000, "192.0.2.242")  # as a crash between install and the device would leave it
    assert tunnel.sweep_worker_devices(set()) == ["deleted stale VXLAN peer filter ppvx555009"]
    assert peerfilter.installed() == []


def test_vm_side_rerun_keeps_one_filter(link_pod, cloud_net):
    pod = link_pod(vni=555003)
    vmside.setup_vm_network(pod.config, os.path.basename(pod.podns), pod.vm_netns)
    assert in_netns(pod.vm_netns, peerfilter.installed) == [555003]
