"""``relay`` as two asyncio protocols: ttrpc frames between two transports, no streams, no tasks.

The stream relay (``relay.relay``) wakes a reader task for every burst of
bytes and awaits a drain after each write; here the bytes of a burst are cut
into frames and written to the other transport inside the event loop's own
read callback: one wakeup and one send per burst and direction. The frame
handling is the same code (``relay.FrameRewriter``): unchanged frames pass
as they came, requests the hook changes are re-encoded, calls of ``local``
methods are answered here, frames over 4 MiB are answered RESOURCE_EXHAUSTED
downstream, bad framing ends the relay; with ``rewritten_methods`` a burst of
whole frames that needs no look is written on as it came.
Used by the pod VM's agent-protocol-forwarder, on its agent call path
(issue 16).

Use: make a ``FrameRelay``; connect ``relay.down`` (the client side, which
pauses its reading until ``start()``) and ``relay.up`` (the server side) as
the protocols of two connections; call ``start()``; await ``relay.ended``
(the reason, once both connections are gone). ``end(reason)`` closes both
(buffered bytes are still sent), ``abort()`` cuts both now.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

from cloudadaptor.eventloop import HeldProtocol
from cloudadaptor.ttrpc.framing import FrameError, FrameParser
from cloudadaptor.ttrpc.relay import FrameRewriter, LocalMethods, RewriteRequest, _unparseable


class FrameRelay(FrameRewriter):
    """One relayed connection pair (see the module docstring)."""

    def __init__(self, rewrite_request: RewriteRequest | None = None, local: LocalMethods | None = None,
                 rewritten_methods: Collection[str] | None = None) -> None:
        self._hooks(rewrite_request, local, rewritten_methods)
        self.down = _Side(self, "downstream", "request refused", self._forward_request)
        self.up = _Side(self, "upstream", "upstream answer dropped", None)
        self.down.other, self.up.other = self.up, self.down
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._started = False
        self._reason: str | None = None

    def start(self) -> None:
        """Both sides are connected: let the downstream side's bytes flow (first what came early)."""
        self._started = True
        self.down.release()

    def end(self, reason: str) -> None:
        """Close both connections (writing what is buffered); the first reason is kept. Idempotent."""
        if self._reason is None:
            self._reason = reason
        for side in (self.down, self.up):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()
        self._settle()

    def abort(self) -> None:
        """Cut both connections now (cancellation, shutdown)."""
        if self._reason is None:
            self._reason = "relay cancelled"
        for side in (self.down, self.up):
            if side.transport is not None:
                side.transport.abort()
        self._settle()

    def _send_down(self, data: bytes) -> None:
        transport = self.down.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _settle(self) -> None:
        if self.down.transport is None and self.up.transport is None and not self.ended.done():
            self.ended.set_result(self._reason or "closed")


class _Side(HeldProtocol):
    """One connection of the pair: frames it receives go to the other side's transport.

    Flow control crosses over: when the other side's send buffer fills, this
    side stops reading until it drains.
    """

    def __init__(self, relay: FrameRelay, name: str, oversized: str,
                 transform: Callable[[bytes, bytes], bytes | None] | None) -> None:
        self.relay = relay
        self.name = name  # "downstream" | "upstream", in the end reasons
        self.oversized = oversized
        self.transform = transform
        self.parser = FrameParser()
        self.other: _Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self is self.relay.down and not self.relay._started:
            self.hold()  # until the upstream connection is there (FrameRelay.start)

    def received(self, data: bytes) -> None:
        try:
            out = self.relay.process(self.parser, data, self.oversized, self.transform)
        except FrameError as exc:
            self.relay.end(_unparseable(self.name, exc))
            return
        target = self.other.transport if self.other is not None else None
        if out and target is not None and not target.is_closing():
            target.write(out)

    def eof_received(self) -> bool:
        try:
            self.parser.end()
            reason = f"{self.name} closed the connection"
        except FrameError as exc:
            reason = _unparseable(self.name, exc)
        self.relay.end(reason)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.relay.end(f"{self.name} connection lost: {exc}" if exc else f"{self.name} closed the connection")

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None and not self.other.transport.is_closing():
            if self.other is not self.relay.down or self.relay._started:
                self.other.transport.resume_reading()
