"""Tag names on Azure: one mapping, used both when tagging and when listing.

Azure tag names cannot contain ``< > % & \\ ? /``, so ``peerpods.io/node``
is stored as ``peerpods.io_node``. Every tag name we write and every tag
filter goes through ``azure_tag_name``; ``from_azure_tags`` maps the
``base.TAG_*`` names back so callers see the names they asked for.
"""

from __future__ import annotations

import re
from typing import Mapping

from cloudadaptor.providers import base

_FORBIDDEN = re.compile(r"[<>%&\\?/]")
MAX_NAME = 512
MAX_VALUE = 256

# The names the lifecycle reads back from Instance.tags.
_KNOWN = (base.TAG_OWNER, base.TAG_NODE, base.TAG_SANDBOX, base.TAG_POD)


def azure_tag_name(name: str) -> str:
    """``name`` with every character Azure forbids replaced by ``_`` (cut to 512)."""
    return _FORBIDDEN.sub("_", name)[:MAX_NAME]


def to_azure_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Tags as written on a resource: names mapped, values cut to Azure's 256 characters."""
    return {azure_tag_name(name): value[:MAX_VALUE] for name, value in tags.items()}


def from_azure_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    """Tags read from a resource, with our ``TAG_*`` names restored; others unchanged."""
    back = {azure_tag_name(name): name for name in _KNOWN}
    return {back.get(name, name): value for name, value in (tags or {}).items()}


def matches(resource_tags: Mapping[str, str] | None, wanted: Mapping[str, str]) -> bool:
    """True when a resource's (Azure) tags carry every one of ``wanted`` (our names)."""
    have = resource_tags or {}
    return all(have.get(azure_tag_name(name)) == value[:MAX_VALUE] for name, value in wanted.items())
