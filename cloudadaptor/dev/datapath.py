"""Probing the pod data path with real packets (test, demo and benchmark helper).

- ``CloudNet``: a stand-in for the VM network without the local provider: a
  bridge holding the worker's address and "VMs" that are bare network
  namespaces on it (for tunnel tests and the benchmark);
- ``socket_in_netns``: a socket created inside another netns (a thread
  enters it; the socket stays there, the process does not move);
- ``icmp_echo``: one ping (raw ICMP socket, DF set), no ``ping`` binary needed;
- ``Sniffer``: an AF_PACKET capture on one interface of a netns;
- ``ECHO_SERVER`` / ``tcp_round_trip``: a one-shot TCP echo server to run in a
  pod (through ExecProcess) and the worker-side client.

Needs the private namespace (``python -m cloudadaptor.dev.privatens``).
Blocking: call through ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from cloudadaptor import linuxns, netnsocket

ETH_P_ALL = 0x0003
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2

# What the demo runs in a pod through ExecProcess (the dev agent may run `ip`).
POD_ADDR_COMMAND = ["ip", "-br", "addr", "show"]
# A one-shot TCP echo server: argv[1] address, argv[2] port; upper-cases one message.
ECHO_SERVER = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(30)\n"
    "c, peer = s.accept(); c.sendall(c.recv(4096).upper()); c.close()\n"
    "print(f'echoed for {peer[0]}')\n"
)


in_netns = netnsocket.in_netns  # run fn in a fresh thread that has entered the netns at path


def socket_in_netns(path: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
    """A socket that lives in the netns at ``path``."""
    return in_netns(path, lambda: socket.socket(family, kind, proto))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_echo(dst: str, payload: int = 56, timeout: float = 3.0, sock: socket.socket | None = None) -> float:
    """Send one ICMP echo request (IPv4, DF set) with ``payload`` bytes; the
    round-trip time in seconds. Raises ``TimeoutError`` without a matching reply."""
    own = sock is None
    sock = sock or socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        ident, seq = os.getpid() & 0xFFFF, int(time.monotonic() * 1000) & 0xFFFF
        body = os.urandom(payload)
        header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + body), ident, seq) + body
        began = time.monotonic()
        sock.sendto(packet, (dst, 0))
        while (left := began + timeout - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            data, (source, _) = sock.recvfrom(65535)
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if kind == 0 and source == dst and (rid, rseq) == (ident, seq) and data[ihl + 8:] == body:
                return time.monotonic() - began
        raise TimeoutError(f"no ICMP echo reply from {dst} ({payload}-byte payload) within {timeout:g}s")
    finally:
        if own:
            sock.close()


def tcp_round_trip(address: str, port: int, message: bytes = b"ping through the tunnel",
                   timeout: float = 10.0) -> tuple[bytes, float]:
    """Connect (retrying until ``timeout`` while the server starts), send
    ``message``, read the reply until EOF; (reply, seconds from connect to reply)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = socket.create_connection((address, port), timeout=2)
            break
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH) and not isinstance(exc, TimeoutError):
                raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"cannot connect to {address}:{port}: {exc}") from None
            time.sleep(0.05)
    with conn:
        began = time.monotonic()
        conn.sendall(message)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks), time.monotonic() - began


class Sniffer:
    """Captures every frame on ``ifname`` in the netns at ``netns_path`` (None:
    this one) from creation until ``stop()``; ``frames`` holds them."""

    def __init__(self, ifname: str, netns_path: str | None = None) -> None:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.bind((ifname, 0))
            return sock

        self._sock = in_netns(netns_path, make) if netns_path else make()
        self.frames: list[bytes] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            if select.select([self._sock], [], [], 0.05)[0]:
                self.frames.append(self._sock.recv(65535))

    def stop(self) -> list[bytes]:
        time.sleep(0.1)  # frames in flight
        self._stopped.set()
        self._thread.join()
        self._sock.close()
        return self.frames


def udp_destination_ports(frames: list[bytes]) -> set[int]:
    """UDP destination ports of the IPv4 frames among ``frames``."""
    ports = set()
    for frame in frames:
        if len(frame) >= 42 and frame[12:14] == b"\x08\x00" and frame[23] == socket.IPPROTO_UDP:
            ihl = (frame[14] & 0x0F) * 4
            ports.add(struct.unpack("!H", frame[14 + ihl + 2:14 + ihl + 4])[0])
    return ports


def mentions(frames: list[bytes], address: str) -> list[bytes]:
    """The frames that carry ``address`` anywhere (inner or outer headers, ARP)."""
    raw = ipaddress.ip_address(address).packed
    return [frame for frame in frames if raw in frame]


# ------------------------------------------------------------------ a fake cloud


@dataclass
class CloudNet:
    """A bridge holding the worker's address, with bare-netns "VMs" on it.

    ``add_vm(name)`` gives ``(vm netns path, vm ip)`` and reserves netns
    ``<name>-podns`` for the VM's pod (``podns_of``); ``close()`` removes
    everything (idempotent).
    """

    bridge: str
    cidr: str  # e.g. 192.0.2.240/28: the first host is the worker
    vms: list[str] = field(default_factory=list)
    veths: list[str] = field(default_factory=list)

    @staticmethod
    def podns_of(vm_name: str) -> str:
        return f"{vm_name}-podns"

    @property
    def worker_ip(self) -> str:
        return str(next(ipaddress.ip_network(self.cidr).hosts()))

    def open(self) -> CloudNet:
        network = ipaddress.ip_network(self.cidr)
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            index = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.addr("add", index=index, address=self.worker_ip, prefixlen=network.prefixlen)
            ipr.link("set", index=index, state="up")
        return self

    def add_vm(self, name: str) -> tuple[str, str]:
        network = ipaddress.ip_network(self.cidr)
        ip = str(list(network.hosts())[len(self.vms) + 1])
        veth = f"cv{os.getpid() % 1000}{name}"[:15]
        netnsocket.create_netns(name)
        self.vms.append(name)
        self.veths.append(veth)
        with IPRoute() as ipr:
            ipr.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
            index = ipr.link_lookup(ifname=veth)[0]
            ipr.link("set", index=index, master=ipr.link_lookup(ifname=self.bridge)[0], state="up")
        with netnsocket.iproute_in(linuxns.netns_path(name)) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            index = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=index, address=ip, prefixlen=network.prefixlen)
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=self.worker_ip)
        return linuxns.netns_path(name), ip

    def close(self) -> None:
        with IPRoute() as ipr:
            for name in [*self.veths, self.bridge]:
                for index in ipr.link_lookup(ifname=name):
                    ipr.link("del", index=index)
        for name in self.vms:
            for ns in (self.podns_of(name), name):
                try:
                    netnsocket.remove_netns(ns)
                except FileNotFoundError:
                    pass
        self.vms.clear()
        self.veths.clear()
