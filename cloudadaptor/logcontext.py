"""Fields that log records of one request carry (sandbox id, pod, instance id), without passing them around.

The hypervisor service binds the sandbox id and pod for the duration of a call
(``bind``); the lifecycle's tasks inherit the binding (asyncio copies the
context into tasks it creates), and the instance id is added to the same
mapping once the VM exists (``add``). ``LOG_FORMAT=json`` puts these fields
into every record (``commandline.JsonFormatter``); the text format ignores them.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

FIELDS = ("sandbox_id", "pod", "instance_id")

_current: ContextVar[dict[str, str] | None] = ContextVar("cloudadaptor_log_fields", default=None)


@contextlib.contextmanager
def bind(**fields: str) -> Iterator[dict[str, str]]:
    """Within the block (and tasks started in it), records carry ``fields`` (empty values left out)."""
    mapping = {**(_current.get() or {}), **{k: v for k, v in fields.items() if v}}
    token = _current.set(mapping)
    try:
        yield mapping
    finally:
        _current.reset(token)


def add(**fields: str) -> None:
    """Add fields to the current binding (seen by every task sharing it); nothing when none is bound."""
    mapping = _current.get()
    if mapping is not None:
        mapping.update({k: v for k, v in fields.items() if v})


def current() -> dict[str, str]:
    """The fields bound now (a copy)."""
    return dict(_current.get() or {})
