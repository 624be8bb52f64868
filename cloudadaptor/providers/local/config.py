"""The local provider's keys, declared on the typed ``LocalConfig``."""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudadaptor.config import Settings, parse_abs_path, parse_duration
from cloudadaptor.providers.config import ProviderConfig, option

DEFAULT_CIDR = ipaddress.IPv4Network("192.0.2.0/24")
DEFAULT_BRIDGE = "ppcloud0"
CLOUD_SUBDIR = "local-cloud"
VM_KINDS = ("namespace", "qemu")
ACCELS = ("auto", "kvm", "tcg")


def parse_cloud_cidr(text: str) -> ipaddress.IPv4Network:
    expected = "expected an IPv4 network like 192.0.2.0/24 with room for the gateway and VMs (/30 or larger)"
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError:
        raise ValueError(expected) from None
    if not isinstance(network, ipaddress.IPv4Network) or network.prefixlen > 30:
        raise ValueError(expected)
    return network


def parse_ifname(text: str) -> str:
    name = text.strip()
    if not 1 <= len(name) <= 15 or name in (".", "..") or re.search(r"[\s/:]", name):
        raise ValueError("expected an interface name of 1 to 15 characters without '/', ':' or spaces")
    return name


def parse_vm_kind(text: str) -> str:
    kind = text.strip().lower()
    if kind not in VM_KINDS:
        raise ValueError(f"expected one of {', '.join(VM_KINDS)}")
    return kind


def parse_accel(text: str) -> str:
    accel = text.strip().lower()
    if accel not in ACCELS:
        raise ValueError(f"expected one of {', '.join(ACCELS)}")
    return accel


def parse_count(low: int, high: int, what: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise ValueError(f"expected {what} from {low} to {high}")
        return value
    return parse


def parse_agent_command(text: str) -> str:
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"expected a shell-style command line ({exc})") from None
    if not words or not any("{socket}" in word for word in words):
        raise ValueError("expected a command line containing {socket} (the agent's unix socket path)")
    return text.strip()


@dataclass(frozen=True)
class LocalConfig(ProviderConfig):
    """The local cloud: its network, bridge and directory (``build`` puts an unset
    LOCAL_CLOUD_DIR under STATE_DIR, so after loading it is never None)."""

    cloud_dir: Path = option("LOCAL_CLOUD_DIR", parse_abs_path, None,
                             help="instance directories (default: <STATE_DIR>/local-cloud)")
    cidr: ipaddress.IPv4Network = option(
        "LOCAL_CLOUD_CIDR", parse_cloud_cidr, DEFAULT_CIDR,
        help="the local cloud's IPv4 network; the first host is the worker's gateway address")
    bridge: str = option("LOCAL_CLOUD_BRIDGE", parse_ifname, DEFAULT_BRIDGE, help="bridge the pod VMs are attached to")
    boot_delay: float = option("LOCAL_BOOT_DELAY", parse_duration, 0.0, help="imitated cloud boot time, e.g. 2s")
    agent_command: str | None = option(
        "LOCAL_AGENT_COMMAND", parse_agent_command, None,
        help="agent a namespace VM runs; {socket} becomes its socket path (default: the development agent; "
             "a QEMU VM runs its image's kata-agent)")
    vm: str = option("LOCAL_VM", parse_vm_kind, "namespace",
                     help="what a pod VM is: namespace (a netns running our processes) or qemu (a QEMU VM "
                          "booting the image of `image build local`)")
    qemu_image: Path | None = option("LOCAL_QEMU_IMAGE", parse_abs_path, None,
                                     help="qemu: the image directory to boot (default: the newest "
                                          "`image build local`, <LOCAL_IMAGE_CACHE>/current)")
    qemu_accel: str = option("LOCAL_QEMU_ACCEL", parse_accel, "auto",
                             help="qemu: kvm, tcg, or auto (KVM when a short probe boots a guest, else TCG)")
    qemu_memory: int = option("LOCAL_QEMU_MEMORY", parse_count(256, 65536, "MiB"), 1024, help="qemu: MiB per VM")
    qemu_cpus: int = option("LOCAL_QEMU_CPUS", parse_count(1, 64, "vCPUs"), 2, help="qemu: vCPUs per VM")

    @classmethod
    def build(cls, settings: Settings, **options: Any) -> LocalConfig:
        cloud_dir = options.pop("cloud_dir", None) or Path(settings.state_dir) / CLOUD_SUBDIR
        return cls(cloud_dir=Path(cloud_dir), **options)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.cidr.network_address + 1
