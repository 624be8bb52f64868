"""Cloud-init user data: what CreateVM renders and what process-user-data reads.

The adaptor hands each pod VM a ``#cloud-config`` document whose
``write_files`` carries at most three files, and only these (``ALLOWED_PATHS``):

- ``/run/peerpod/apf.json``: the forwarder's configuration
  (``cloudadaptor.podconfig.ForwarderConfig``: pod network, pod name, TLS
  server material), mode 0600;
- ``/run/peerpod/auth.json``: registry credentials (optional), mode 0600;
- ``/run/peerpod/initdata``: the pod's initdata as given (base64 of gzip or
  plain TOML; ``cloudadaptor.initdata``), optional, mode 0600; process-user-data
  unpacks its entries and digest next to it.

Clouds cap user data (``cloudadaptor.wire``: AWS 16 KiB, Azure 64 KiB):
``check_size`` refuses clearly instead of letting the cloud API fail obscurely.
"""

from __future__ import annotations

import base64
import binascii
import functools
import gzip
from dataclasses import dataclass, field
from typing import Any, Mapping


# Re-exported: providers check sizes against the limits through this module.
from cloudadaptor.wire import AWS_USER_DATA_LIMIT, AZURE_USER_DATA_LIMIT

__all__ = [
    "ALLOWED_PATHS", "APF_CONFIG_PATH", "AUTH_JSON_PATH", "AWS_USER_DATA_LIMIT", "AZURE_USER_DATA_LIMIT",
    "CLOUD_CONFIG_HEADER", "DEFAULT_PERMISSIONS", "INITDATA_PATH", "UserDataError", "UserDataTooLarge",
    "WriteFile", "check_size", "parse", "parse_entries", "render",
]

APF_CONFIG_PATH = "/run/peerpod/apf.json"
AUTH_JSON_PATH = "/run/peerpod/auth.json"
INITDATA_PATH = "/run/peerpod/initdata"
ALLOWED_PATHS = frozenset({APF_CONFIG_PATH, AUTH_JSON_PATH, INITDATA_PATH})

# Mode written for each allowed path when the user data does not say.
DEFAULT_PERMISSIONS = {APF_CONFIG_PATH: "0600", AUTH_JSON_PATH: "0600", INITDATA_PATH: "0600"}

CLOUD_CONFIG_HEADER = "#cloud-config"


class UserDataError(ValueError):
    """User data is malformed (not cloud-config, bad YAML, a bad write_files entry); the message says where."""


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


# ------------------------------------------------------------ render / parse


@functools.cache
def _dumper(compiled: bool = True) -> Any:
    """A SafeDumper writing multi-line and long strings as literal blocks: readable and compact.

    ``compiled``: libyaml's emitter (PyYAML's ``CSafeDumper``) when PyYAML has it, which writes
    the same text (``_dump`` drops the one difference) in a twentieth of the CPU:
    the PEM blocks of every pod's user data went through the pure-Python emitter character by
    character (issue 16). PyYAML is imported here and in ``parse``, not with the module: the
    daemon imports this module at start and needs YAML only for its first VM (idle memory, issue 16)."""
    import yaml

    def represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value or len(value) > 80 else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    base = getattr(yaml, "CSafeDumper", yaml.SafeDumper) if compiled else yaml.SafeDumper

    class Dumper(base):  # type: ignore[valid-type,misc]
        pass

    Dumper.add_representer(str, represent_str)
    return Dumper


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
    return f"{CLOUD_CONFIG_HEADER}\n{_dump({'write_files': entries})}"


def _dump(doc: Any, compiled: bool = True) -> str:
    import yaml

    body: str = yaml.dump(doc, Dumper=_dumper(compiled), sort_keys=False, default_flow_style=False,
                          allow_unicode=True, width=2**30)
    # libyaml ends the stream with a document end marker after a block scalar that keeps its final
    # newlines ("|+"), where PyYAML's own emitter does not: the same document, written as PyYAML writes it.
    return body[:-4] if body.endswith("\n...\n") else body


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
    doc = _load(text)
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


def _load(text: str, compiled: bool = True) -> Any:
    """``yaml.safe_load``, through libyaml's parser when PyYAML has it (each VM parses its user data;
    in a twentieth of the CPU of the pure-Python scanner). A document libyaml refuses is parsed
    again by PyYAML's own parser, so every error message stays PyYAML's."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", None) if compiled else None
    if loader is not None:
        try:
            return yaml.load(text, Loader=loader)  # noqa: S506 - CSafeLoader is the safe loader
        except yaml.YAMLError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserDataError(f"user data is not valid YAML: {' '.join(str(exc).split())}") from None


def parse(text: str) -> dict[str, str]:
    """``write_files`` as {path: content} (a later entry for a path wins)."""
    return {entry.path: entry.content for entry in parse_entries(text)}


def check_size(text: str, limit_bytes: int, provider_name: str) -> None:
    """Raise ``UserDataTooLarge`` when ``text`` (UTF-8) exceeds ``limit_bytes``."""
    size = len(text.encode("utf-8"))
    if size > limit_bytes:
        raise UserDataTooLarge(size, limit_bytes, provider_name)
