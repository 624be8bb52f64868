"""Cloud-init user data: what CreateVM renders and what process-user-data reads.

The adaptor hands each pod VM a ``#cloud-config`` document whose
``write_files`` carries at most three files, and only these (``ALLOWED_PATHS``):

- ``/run/peerpod/apf.json``: the forwarder's configuration (``ForwarderConfig``:
  pod network, pod name, TLS server material), mode 0600;
- ``/run/peerpod/auth.json``: registry credentials (optional), mode 0600;
- ``/run/peerpod/initdata``: the pod's ``cc_init_data`` (optional).

Clouds cap user data (AWS 16 KiB, Azure 64 KiB): ``check_size`` refuses
clearly instead of letting the cloud API fail obscurely.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

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
    network: Mapping[str, Any] | None = field(default=None, hash=False)

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
            "network": None if self.network is None else dict(self.network),
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
            network=get("network", dict, "an object", None),
        )


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
