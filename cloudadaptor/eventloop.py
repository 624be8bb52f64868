"""The event loop of our long-running processes: uvloop's.

The daemon (``serve``), the pod VM's forwarder and the namespace VM's init all
relay agent calls. uvloop's socket and TLS callbacks are compiled; asyncio's
own SSL transport is pure Python. On the agent path (two relays, one each
side of the mutual-TLS hop) that is most of what a relay costs beyond the
kernel's own work (``python -m bench``, agent path, issue 16).

A loop, not the policy: pyroute2 (in worker threads) makes its own loops with
asyncio's policy, and uvloop's cannot open netlink sockets. uvloop starts
reading an accepted connection after its protocol's ``connection_made``, even
if that paused it: a protocol that waits for a second connection before it
may read is a ``HeldProtocol`` (``ttrpc.relayproto``, ``adaptor.proxy``).
"""

from __future__ import annotations

import asyncio
from typing import cast


def new_event_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


class HeldProtocol(asyncio.Protocol):
    """A protocol whose bytes must wait (``hold``) until something else is ready (``release``).

    Holding pauses reading; bytes the loop delivers anyway (uvloop, on a just-accepted connection)
    are kept and handed to ``received`` first on release, in order. Subclasses implement
    ``received`` instead of ``data_received``; ``transport`` is None until connected and after loss.
    """

    transport: asyncio.Transport | None = None
    _held: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def hold(self) -> None:
        if self._held is None:
            self._held = []
        if self.transport is not None:
            self.transport.pause_reading()

    def release(self) -> None:
        """Hand over what came while held, then read again (unless the connection is closing)."""
        held, self._held = self._held or [], None
        for data in held:
            self.received(data)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._held is not None:
            self.hold()
            self._held.append(data)
            return
        self.received(data)

    def received(self, data: bytes) -> None:
        raise NotImplementedError
