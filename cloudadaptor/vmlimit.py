"""The pod VMs this node may run now: ``PEERPODS_LIMIT_PER_NODE``, or the limit a PeerPodConfig set.

One ``VmLimit`` per daemon, shared by the lifecycle (StartVM refuses beyond
it), the warm pool (it holds at most the limit minus the VMs pods use) and, in
a cluster, the node follower (``cloudadaptor.k8s.capacity.NodeLimitFollower``),
which switches it to the value the peerpod-controller wrote on the node while
a PeerPodConfig manages the node, and back to the fallback when none does.
It lives in the foundation so both sides can use it without importing each
other. Not thread-safe: read and written on the daemon's event loop only.
"""

from __future__ import annotations

from typing import Callable

FALLBACK_SOURCE = "PEERPODS_LIMIT_PER_NODE"


class VmLimit:
    """A limit that can change while the daemon runs; ``None`` is no limit."""

    def __init__(self, fallback: int | None) -> None:
        self.fallback = fallback
        self._managed: tuple[int, str] | None = None  # (limit, "PeerPodConfig ns/name")
        self._listeners: list[Callable[[], None]] = []

    def current(self) -> int | None:
        return self._managed[0] if self._managed is not None else self.fallback

    @property
    def source(self) -> str:
        """Where ``current()`` comes from, for messages: the key, or the PeerPodConfig."""
        return self._managed[1] if self._managed is not None else FALLBACK_SOURCE

    @property
    def managed(self) -> bool:
        return self._managed is not None

    def follow(self, limit: int, source: str) -> bool:
        """Use ``limit`` (set by ``source``) from now on. True when that changed anything."""
        return self._set((limit, source))

    def use_fallback(self) -> bool:
        """Back to ``PEERPODS_LIMIT_PER_NODE``. True when that changed anything."""
        return self._set(None)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """``listener()`` is called after every change (the warm pool re-sizes itself)."""
        self._listeners.append(listener)

    def _set(self, managed: tuple[int, str] | None) -> bool:
        if managed == self._managed:
            return False
        self._managed = managed
        for listener in self._listeners:
            listener()
        return True
