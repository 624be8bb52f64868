"""apf.json: what the pod VM's forwarder and pod-network setup are told.

The adaptor reads the pod's interface at CreateVM (``PodInterface``), adds the
VXLAN tunnel to the worker (``PodNetworkConfig``) and the forwarder's TLS
material (``ForwarderConfig``); ``cloudadaptor.userdata`` carries the JSON to
the VM as ``/run/peerpod/apf.json``. Parsing is strict and every refusal names
the field (``apf.json: field 'network.vni': expected ...``) through one
reader, ``_Fields``; unknown fields are ignored so an older VM image can meet
a newer adaptor.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

from cloudadaptor.tls import ServerTlsMaterial
from cloudadaptor.wire import AGENT_PORT, DEFAULT_TLS_MIN_VERSION, MAX_VNI, TLS_VERSIONS, VXLAN_PORT

T = TypeVar("T")

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IFNAME_FORBIDDEN = re.compile(r"[\s/:]")  # compiled at import: a forked VM init does not compile it again
_MISSING: Any = object()


class ApfConfigError(ValueError):
    """apf.json is malformed; the message names the field (``apf.json: field 'x.y': ...``)."""


@dataclass(frozen=True)
class PodRoute:
    """One route of the pod netns. ``dst`` is a network (``0.0.0.0/0`` for the
    default route); ``scope`` is the kernel's RT_SCOPE (0 universe, 253 link)."""

    dst: str
    gateway: str | None = None
    scope: int = 0
    src: str | None = None
    metric: int | None = None
    onlink: bool = False


@dataclass(frozen=True)
class PodNeighbour:
    """A permanent neighbour entry (IP → MAC) of the pod interface."""

    address: str
    mac: str


@dataclass(frozen=True)
class PodInterface:
    """What CNI gave the pod: its interface in the pod netns, as read at CreateVM.

    ``addresses`` are interface addresses with prefix (``198.51.100.10/24``,
    ``2001:db8::a/64``), link-local ones excluded.
    """

    name: str
    mac: str
    mtu: int
    addresses: tuple[str, ...]
    routes: tuple[PodRoute, ...] = ()
    neighbours: tuple[PodNeighbour, ...] = ()


@dataclass(frozen=True)
class PodNetworkConfig:
    """apf.json ``network``: the pod interface and the VXLAN tunnel to the worker.

    Serialized flat: ``interface`` (name), ``mac``, ``mtu``, ``addresses``,
    ``routes``, ``neighbours``, ``worker_ip``, ``vni``, ``vxlan_port``.
    """

    pod: PodInterface
    worker_ip: str
    vni: int
    vxlan_port: int = VXLAN_PORT

    def to_dict(self) -> dict[str, Any]:
        pod = self.pod
        return {
            "interface": pod.name,
            "mac": pod.mac,
            "mtu": pod.mtu,
            "addresses": list(pod.addresses),
            "routes": [dict(r.__dict__) for r in pod.routes],
            "neighbours": [dict(n.__dict__) for n in pod.neighbours],
            "worker_ip": self.worker_ip,
            "vni": self.vni,
            "vxlan_port": self.vxlan_port,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "network") -> PodNetworkConfig:
        """Parse and validate; raises ``ApfConfigError`` naming the bad field."""
        f = _Fields(doc, where)
        pod = PodInterface(
            name=f.get("interface", _ifname, "an interface name of 1 to 15 characters"),
            mac=f.get("mac", _mac, "a MAC address like 02:00:00:00:00:01"),
            mtu=f.get("mtu", _int_in(68, 65535), "an MTU from 68 to 65535"),
            addresses=tuple(f.items("addresses", _address, "addresses like 198.51.100.10/24")),
            routes=tuple(f.items("routes", _route, "routes: objects with dst, gateway, scope, src, metric, onlink", [])),
            neighbours=tuple(f.items("neighbours", _neighbour, "objects with address and mac", [])),
        )
        return cls(
            pod=pod,
            worker_ip=f.get("worker_ip", _ip, "an IP address"),
            vni=f.get("vni", _int_in(1, MAX_VNI), f"a VNI from 1 to {MAX_VNI}"),
            vxlan_port=f.get("vxlan_port", _int_in(1, 65535), "a UDP port from 1 to 65535", VXLAN_PORT),
        )


@dataclass(frozen=True)
class ForwarderConfig:
    """apf.json: everything the pod VM's forwarder needs. Its repr never shows the key."""

    sandbox_id: str
    pod_name: str
    pod_namespace: str
    listen_port: int = AGENT_PORT
    tls: ServerTlsMaterial | None = None
    tls_min_version: str = DEFAULT_TLS_MIN_VERSION
    network: PodNetworkConfig | None = None

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "sandbox_id": self.sandbox_id,
            "pod_name": self.pod_name,
            "pod_namespace": self.pod_namespace,
            "listen_port": self.listen_port,
            "tls": None if self.tls is None else {
                "cert_pem": self.tls.cert_pem,
                "key_pem": self.tls.key_pem,
                "client_ca_pem": self.tls.client_ca_pem,
            },
            "tls_min_version": self.tls_min_version,
            "network": None if self.network is None else self.network.to_dict(),
        }
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ForwarderConfig:
        """Parse apf.json; raises ``ApfConfigError`` naming the bad field. Unknown
        fields are ignored (an older VM image may meet a newer adaptor)."""
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApfConfigError(f"apf.json: not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ApfConfigError("apf.json: expected a JSON object")
        f = _Fields(doc)
        versions = " or ".join(f'"{v}"' for v in TLS_VERSIONS)
        network = f.get("network", _object, "an object", None)
        return cls(
            sandbox_id=f.get("sandbox_id", _text, "a string"),
            pod_name=f.get("pod_name", _text, "a string"),
            pod_namespace=f.get("pod_namespace", _text, "a string"),
            listen_port=f.get("listen_port", _int_in(1, 65535), "a port number from 1 to 65535", AGENT_PORT),
            tls=f.get("tls", _tls, "an object with cert_pem, key_pem, client_ca_pem", None),
            tls_min_version=f.get("tls_min_version", _one_of(TLS_VERSIONS), versions, DEFAULT_TLS_MIN_VERSION),
            network=None if network is None else PodNetworkConfig.from_dict(network),
        )


class _Fields:
    """Reads the fields of one JSON object; every failure names ``apf.json: field '<where>.<name>'``.

    A parser raises ``ValueError`` or ``TypeError`` to refuse a value; a nested
    reader's ``ApfConfigError`` (already naming its field) passes through.
    """

    def __init__(self, doc: Mapping[str, Any], where: str = "") -> None:
        self.doc, self.where = doc, where

    def fail(self, name: str, expected: str, missing: bool = False) -> ApfConfigError:
        field = f"{self.where}.{name}" if self.where else name
        return ApfConfigError(f"apf.json: field '{field}'{' is missing' if missing else ''}: expected {expected}")

    def get(self, name: str, parse: Callable[[Any], T], expected: str, default: Any = _MISSING) -> T:
        value = self.doc.get(name)
        if value is None:
            if default is _MISSING:
                raise self.fail(name, expected, missing=True)
            return default  # type: ignore[no-any-return]
        try:
            return parse(value)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, ApfConfigError):
                raise
            raise self.fail(name, expected) from None

    def items(self, name: str, parse: Callable[[Any], T], expected: str, default: Any = _MISSING) -> list[T]:
        values = self.get(name, _list, f"a list of {expected}", default)
        parsed = []
        for i, value in enumerate(values):
            try:
                parsed.append(parse(value))
            except (ValueError, TypeError):
                raise self.fail(f"{name}[{i}]", expected) from None
        return parsed


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(value)
    return value


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(value)
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _str(value: Any) -> str:
    text = _text(value)
    if not text:
        raise ValueError(value)
    return text


def _one_of(choices: Mapping[str, Any]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _text(value)
        if text not in choices:
            raise ValueError(value)
        return text

    return parse


def _ifname(value: Any) -> str:
    name = _str(value)
    if len(name) > 15 or _IFNAME_FORBIDDEN.search(name) or name in (".", ".."):
        raise ValueError(name)
    return name


def _mac(value: Any) -> str:
    mac = _str(value).lower()
    if not _MAC.fullmatch(mac):
        raise ValueError(mac)
    return mac


def _ip(value: Any) -> str:
    return str(ipaddress.ip_address(_str(value)))


def _address(value: Any) -> str:
    text = _str(value)
    if "/" not in text:
        raise ValueError(text)
    return str(ipaddress.ip_interface(text))


def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(value)
        return value

    return parse


def _tls(value: Any) -> ServerTlsMaterial:
    f = _Fields(_object(value), "tls")
    pem = "a PEM string"
    return ServerTlsMaterial(f.get("cert_pem", _str, pem), f.get("key_pem", _str, pem), f.get("client_ca_pem", _str, pem))


def _route(value: Any) -> PodRoute:
    f = _Fields(_object(value))
    return PodRoute(
        dst=str(ipaddress.ip_network(_str(value.get("dst")), strict=False)),
        gateway=f.get("gateway", _ip, "", None),
        scope=f.get("scope", _int_in(0, 255), "", 0),
        src=f.get("src", _ip, "", None),
        metric=f.get("metric", _int_in(0, 2**32 - 1), "", None),
        onlink=f.get("onlink", _bool, "", False),
    )


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(value)
    return value


def _neighbour(value: Any) -> PodNeighbour:
    f = _Fields(_object(value))
    return PodNeighbour(address=f.get("address", _ip, ""), mac=f.get("mac", _mac, ""))
