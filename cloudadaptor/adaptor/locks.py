"""Per-key asyncio locks that exist only while someone holds or waits for them.

The lifecycle serializes calls per sandbox id. A plain ``dict`` of locks grows
with every id ever seen (including ids of refused or unknown sandboxes); this
map drops a key's lock when its last user leaves, so its size is bounded by the
calls in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyedLocks:
    """``async with locks.hold(key):`` serializes the holders of one key. Not thread-safe."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        """Keys with a holder or a waiter right now."""
        return len(self._entries)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._entries.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._entries[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            current, users = self._entries[key]
            if users <= 1:
                del self._entries[key]
            else:
                self._entries[key] = (current, users - 1)
