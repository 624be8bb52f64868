"""Cloud-init user data: what CreateVM renders and what process-user-data reads.

The adaptor hands each pod VM a ``#cloud-config`` document whose
``write_files`` carries at most three files, and only these (``ALLOWED_PATHS``):

- ``/run/peerpod/apf.json``: the forwarder's configuration (``ForwarderConfig``:
  pod network (``PodNetworkConfig``), pod name, TLS server material), mode 0600;
- ``/run/peerpod/auth.json``: registry credentials (optional), mode 0600;
- ``/run/peerpod/initdata``: the pod's ``cc_init_data`` (optional).

Clouds cap user data (AWS 16 KiB, Azure 64 KiB): ``check_size`` refuses
clearly instead of letting the cloud API fail obscurely.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import yaml

from cloudadaptor.tls import ServerTlsMaterial

APF_CONFIG_PATH = "/run/peerpod/apf.json"
AUTH_JSON_PATH = "/run/peerpod/auth.json"
INITDATA_PATH = "/run/peerpod/initdata"
ALLOWED_PATHS = frozenset({APF_CONFIG_PATH, AUTH_JSON_PATH, INITDATA_PATH})

# Mode written for each allowed path when the user data does not say.
DEFAULT_PERMISSIONS = {APF_CONFIG_PATH: "0600", AUTH_JSON_PATH: "0600", INITDATA_PATH: "0644"}

AWS_USER_DATA_LIMIT = 16384
AZURE_USER_DATA_LIMIT = 65536

CLOUD_CONFIG_HEADER = "#cloud-config"


class UserDataError(ValueError):
    """User data (or apf.json) is malformed; the message says where."""


class UserDataTooLarge(ValueError):
    """Rendered user data exceeds the cloud's limit."""

    def __init__(self, size: int, limit: int, provider_name: str):
        self.size, self.limit, self.provider_name = size, limit, provider_name
        super().__init__(
            f"{provider_name} user data is limited to {_human(limit)}; "
            f"this pod's user data is {size} bytes"
        )


def _human(n: int) -> str:
    return f"{n // 1024} KiB" if n % 1024 == 0 else f"{n} bytes"


# ------------------------------------------------------------ pod network

MAX_VNI = 16777215
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


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
    vxlan_port: int = 9000

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
        """Parse and validate; raises ``UserDataError`` naming the bad field
        (``apf.json: field 'network.vni': expected ...``)."""
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
            vxlan_port=f.get("vxlan_port", _int_in(1, 65535), "a UDP port from 1 to 65535", 9000),
        )


class _Fields:
    """Reads fields of one JSON object; every failure names ``apf.json: field '<where>.<name>'``."""

    def __init__(self, doc: Mapping[str, Any], where: str) -> None:
        self.doc, self.where = doc, where

    def fail(self, name: str, expected: str) -> UserDataError:
        return UserDataError(f"apf.json: field '{self.where}.{name}': expected {expected}")

    def get(self, name: str, parse: Callable[[Any], Any], expected: str, default: Any = ...) -> Any:
        value = self.doc.get(name)
        if value is None:
            if default is ...:
                raise self.fail(name, expected)
            return default
        try:
            return parse(value)
        except (ValueError, TypeError):
            raise self.fail(name, expected) from None

    def items(self, name: str, parse: Callable[[Any], Any], expected: str, default: Any = ...) -> list[Any]:
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


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(value)
    return value


def _ifname(value: Any) -> str:
    name = _str(value)
    if len(name) > 15 or re.search(r"[\s/:]", name) or name in (".", ".."):
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


def _route(value: Any) -> PodRoute:
    if not isinstance(value, dict):
        raise TypeError(value)
    gateway, src, metric = value.get("gateway"), value.get("src"), value.get("metric")
    onlink = value.get("onlink", False)
    if not isinstance(onlink, bool):
        raise TypeError(onlink)
    return PodRoute(
        dst=str(ipaddress.ip_network(_str(value.get("dst")), strict=False)),
        gateway=None if gateway is None else _ip(gateway),
        scope=_int_in(0, 255)(value.get("scope", 0)),
        src=None if src is None else _ip(src),
        metric=None if metric is None else _int_in(0, 2**32 - 1)(metric),
        onlink=onlink,
    )


def _neighbour(value: Any) -> PodNeighbour:
    if not isinstance(value, dict):
        raise TypeError(value)
    return PodNeighbour(address=_ip(value.get("address")), mac=_mac(value.get("mac")))


# ------------------------------------------------------------- ForwarderConfig


@dataclass(frozen=True)
class ForwarderConfig:
    """apf.json: everything the pod VM's forwarder needs. Its repr never shows the key."""

    sandbox_id: str
    pod_name: str
    pod_namespace: str
    listen_port: int = 15150
    tls: ServerTlsMaterial | None = None
    tls_min_version: str = "1.2"
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
        """Parse apf.json; raises ``UserDataError`` naming the bad field. Unknown
        fields are ignored (an older VM image may meet a newer adaptor)."""
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserDataError(f"apf.json: not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise UserDataError("apf.json: expected a JSON object")

        def get(name: str, kind: type | tuple[type, ...], expected: str, default: Any = ...) -> Any:
            if name not in doc or doc[name] is None:
                if default is ...:
                    raise UserDataError(f"apf.json: field {name!r} is missing: expected {expected}")
                return default
            value = doc[name]
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise UserDataError(f"apf.json: field {name!r}: expected {expected}")
            return value

        port = get("listen_port", int, "a port number from 1 to 65535", 15150)
        if not 1 <= port <= 65535:
            raise UserDataError("apf.json: field 'listen_port': expected a port number from 1 to 65535")
        version = get("tls_min_version", str, '"1.2" or "1.3"', "1.2")
        if version not in ("1.2", "1.3"):
            raise UserDataError("apf.json: field 'tls_min_version': expected \"1.2\" or \"1.3\"")
        tls_doc = get("tls", dict, "an object with cert_pem, key_pem, client_ca_pem", None)
        tls = None
        if tls_doc is not None:
            parts = {}
            for part in ("cert_pem", "key_pem", "client_ca_pem"):
                value = tls_doc.get(part)
                if not isinstance(value, str) or not value:
                    raise UserDataError(f"apf.json: field 'tls.{part}': expected a PEM string")
                parts[part] = value
            tls = ServerTlsMaterial(**parts)
        return cls(
            sandbox_id=get("sandbox_id", str, "a string"),
            pod_name=get("pod_name", str, "a string"),
            pod_namespace=get("pod_namespace", str, "a string"),
            listen_port=port,
            tls=tls,
            tls_min_version=version,
            network=_network(get("network", dict, "an object", None)),
        )


def _network(doc: Mapping[str, Any] | None) -> PodNetworkConfig | None:
    return None if doc is None else PodNetworkConfig.from_dict(doc)


# ------------------------------------------------------------ render / parse


class _Dumper(yaml.SafeDumper):
    """Multi-line and long strings as literal blocks: readable and compact."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value or len(value) > 80 else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def render(files: Mapping[str, str]) -> str:
    """``#cloud-config`` with one ``write_files`` entry per file.

    Raises ``ValueError`` for a path outside ``ALLOWED_PATHS``.
    """
    entries = []
    for path, content in files.items():
        if path not in ALLOWED_PATHS:
            raise ValueError(
                f"user data may not write {path!r}; allowed: {', '.join(sorted(ALLOWED_PATHS))}"
            )
        entries.append({"path": path, "content": content, "permissions": DEFAULT_PERMISSIONS[path]})
    body = yaml.dump(
        {"write_files": entries}, Dumper=_Dumper, sort_keys=False,
        default_flow_style=False, allow_unicode=True, width=2**30,
    )
    return f"{CLOUD_CONFIG_HEADER}\n{body}"


@dataclass(frozen=True)
class WriteFile:
    """One ``write_files`` entry, content decoded. ``permissions`` is None when unset."""

    path: str
    content: str = field(repr=False)
    permissions: str | None = None


def _decode(content: Any, encoding: Any, index: int) -> str:
    where = f"write_files[{index}]"
    if isinstance(content, bytes):  # YAML !!binary
        try:
            return content.decode("utf-8")
        except UnicodeDecodeError:
            raise UserDataError(f"{where}.content: not UTF-8 text") from None
    if not isinstance(content, str):
        raise UserDataError(f"{where}.content: expected a string")
    if encoding is not None and not isinstance(encoding, str):
        raise UserDataError(f"{where}.encoding: expected a string such as b64")
    enc = (encoding or "text/plain").strip().lower()
    try:
        if enc in ("text/plain", ""):
            return content
        compact = "".join(content.split())  # b64 may be wrapped over several lines
        if enc in ("b64", "base64"):
            raw = base64.b64decode(compact, validate=True)
        elif enc in ("gz+b64", "gzip+b64", "gz+base64", "gzip+base64"):
            raw = gzip.decompress(base64.b64decode(compact, validate=True))
        elif enc in ("gz", "gzip"):
            raise UserDataError(f"{where}.encoding: raw gzip cannot be carried in YAML text")
        else:
            raise UserDataError(f"{where}.encoding: expected b64 or gz+b64, not {encoding!r}")
        return raw.decode("utf-8")
    except (binascii.Error, OSError, EOFError) as exc:
        raise UserDataError(f"{where}.content: cannot decode {encoding}: {exc}") from None
    except UnicodeDecodeError:
        raise UserDataError(f"{where}.content: decoded content is not UTF-8 text") from None


def parse_entries(text: str) -> list[WriteFile]:
    """Every ``write_files`` entry of a ``#cloud-config`` document, in order.

    Accepts what ``render`` produces and plain cloud-config from other tools
    (no ``write_files`` gives an empty list). Does not filter paths: callers
    decide what to write. Raises ``UserDataError`` when the text is not
    ``#cloud-config`` or is malformed.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    first_line = text.split("\n", 1)[0].rstrip()
    if first_line != CLOUD_CONFIG_HEADER:
        shown = first_line[:40]
        raise UserDataError(f"user data is not cloud-config: first line is {shown!r}, "
                            f"expected {CLOUD_CONFIG_HEADER!r}")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserDataError(f"user data is not valid YAML: {' '.join(str(exc).split())}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise UserDataError("user data: expected a YAML mapping at the top level")
    items = doc.get("write_files")
    if items is None:
        return []
    if not isinstance(items, list):
        raise UserDataError("user data: write_files: expected a list")
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"]:
            raise UserDataError(f"write_files[{i}]: expected a mapping with a path")
        content = _decode(item.get("content", ""), item.get("encoding"), i)
        perms = item.get("permissions")
        if perms is not None and not isinstance(perms, str):
            # YAML reads an unquoted 0600 as the octal integer 384.
            perms = f"0{perms:o}" if isinstance(perms, int) else str(perms)
        entries.append(WriteFile(item["path"], content, perms))
    return entries


def parse(text: str) -> dict[str, str]:
    """``write_files`` as {path: content} (a later entry for a path wins)."""
    return {entry.path: entry.content for entry in parse_entries(text)}


def check_size(text: str, limit_bytes: int, provider_name: str) -> None:
    """Raise ``UserDataTooLarge`` when ``text`` (UTF-8) exceeds ``limit_bytes``."""
    size = len(text.encode("utf-8"))
    if size > limit_bytes:
        raise UserDataTooLarge(size, limit_bytes, provider_name)
