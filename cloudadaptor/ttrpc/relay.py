"""Copy ttrpc frames between two connections, optionally rewriting requests.

``downstream`` is the side that sends requests (the client); ``upstream``
serves them. Frames pass verbatim, except request frames the rewrite hook
changed and calls of ``local`` methods, which are answered here and never
reach upstream. Used by the pod VM's agent-protocol-forwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Mapping

from google.protobuf.message import DecodeError

from cloudadaptor.protocols import ttrpc_pb2
from cloudadaptor.ttrpc.errors import Code, TtrpcError, error_response, success_response
from cloudadaptor.ttrpc.framing import (
    MAX_MESSAGE_LENGTH,
    Frame,
    FrameError,
    FrameParser,
    FrameType,
    OversizedFrame,
    close_writer,
    whole_frames,
)

log = logging.getLogger("cloudadaptor.ttrpc")

RewriteRequest = Callable[[ttrpc_pb2.Request], bool]
# A method answered by the relay itself: request payload in, response payload out (or TtrpcError).
LocalMethod = Callable[[bytes], bytes]
LocalMethods = Mapping[tuple[str, str], LocalMethod]
READ_CHUNK = 1 << 18  # what one wakeup takes from a stream; frames are cut out of it


async def relay(
    down_reader: asyncio.StreamReader,
    down_writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    rewrite_request: RewriteRequest | None = None,
    local: LocalMethods | None = None,
    rewritten_methods: Collection[str] | None = None,
) -> str:
    """Relay frames both ways until either side closes; blocks; returns why it ended.

    ``rewrite_request(req)`` sees each decodable request envelope from
    downstream, may edit it in place and returns True when it changed
    something (only then is the frame re-encoded). It may raise
    ``TtrpcError`` to answer the call downstream instead of forwarding it.
    ``rewritten_methods`` names the methods the hook may change: a request
    naming none of them (nor a ``local`` method) then passes undecoded,
    unseen by the hook; None shows the hook every request.
    Undecodable envelopes are forwarded untouched; a rewrite that grows a
    request past 4 MiB, and any frame over 4 MiB from either side, is
    answered RESOURCE_EXHAUSTED downstream on its stream. A request for a
    ``(service, method)`` in ``local`` is answered downstream with what the
    handler returns (synchronously, so keep it short; its ``TtrpcError`` is
    the answer's status) instead of being forwarded. Unparseable
    framing on either side ends the relay (logged on ``cloudadaptor.ttrpc``).

    Cleanup: on return, error or cancellation both writers are closed and
    no task is left running.
    """
    session = _Relay(down_reader, down_writer, up_reader, up_writer, rewrite_request, local or {}, rewritten_methods)
    return await session.run()


class FrameRewriter:
    """What a relay does to the bytes of one direction, without I/O (shared by ``relay`` and
    ``relayproto.FrameRelay``): cut frames out of a chunk, answer oversized ones, rewrite requests.

    Subclasses call ``_hooks`` and give ``_send_down`` (a write downstream that never awaits, so
    answers and relayed frames never interleave inside a frame).
    """

    rewrite_request: RewriteRequest | None
    local: LocalMethods
    _rewritten: frozenset[str] | None  # the methods the hook sees; None: all
    # Method names (UTF-8) a request must contain to be decoded; None: decode every request.
    _watched: tuple[bytes, ...] | None

    def _hooks(self, rewrite_request: RewriteRequest | None, local: LocalMethods | None,
               rewritten_methods: Collection[str] | None) -> None:
        self.rewrite_request = rewrite_request
        self.local = local or {}
        self._rewritten = None if rewritten_methods is None else frozenset(rewritten_methods)
        if rewrite_request is not None and rewritten_methods is None:
            self._watched = None
        else:
            names = {*(rewritten_methods or ()), *(method for _, method in self.local)}
            self._watched = tuple(name.encode() for name in names)

    def _send_down(self, data: bytes) -> None:
        raise NotImplementedError

    def process(self, parser: FrameParser, data: bytes, oversized: str,
                transform: Callable[[bytes, bytes], bytes | None] | None) -> bytes:
        """The bytes to forward for ``data`` (maybe empty); raises ``FrameError`` for bad framing.

        The common chunk, whole frames none of which needs a look, is forwarded as it came
        without being cut up: a method's name is in its request's bytes verbatim, so a request
        containing no watched name cannot be one the hooks change or answer.
        """
        if not parser.pending():
            watched = () if transform is None else self._watched
            if watched is not None and whole_frames(data, parser.max_length, watched):
                return data
        out = []
        for item in parser.feed(data):
            if isinstance(item, OversizedFrame):
                self._answer(item.stream_id, Code.RESOURCE_EXHAUSTED, f"{oversized}: {item}")
                continue
            header, payload = item
            forwarded = header + payload if transform is None else transform(header, payload)
            if forwarded is not None:
                out.append(forwarded)
        return out[0] if len(out) == 1 else b"".join(out)

    def _forward_request(self, header: bytes, data: bytes) -> bytes | None:
        if header[8] == FrameType.REQUEST and (self.rewrite_request is not None or self.local):
            stream_id = int.from_bytes(header[4:8], "big")
            return self._rewrite(stream_id, header, data)
        return header + data

    def _rewrite(self, stream_id: int, header: bytes, data: bytes) -> bytes | None:
        """The frame to forward, or None when the call was answered here instead."""
        try:
            request = ttrpc_pb2.Request.FromString(data)
        except DecodeError:
            return header + data  # upstream answers INVALID_ARGUMENT, as it would without us
        handler = self.local.get((request.service, request.method))
        if handler is not None:
            self._serve_here(stream_id, request, handler)
            return None
        if self.rewrite_request is None or (self._rewritten is not None and request.method not in self._rewritten):
            return header + data
        try:
            changed = self.rewrite_request(request)
        except TtrpcError as exc:
            self._answer(stream_id, exc.code, exc.message)
            return None
        except Exception as exc:  # noqa: BLE001 - a hook bug fails one call, not the relay
            log.error("rewriting %s/%s failed", request.service, request.method, exc_info=exc)
            self._answer(stream_id, Code.INTERNAL, f"rewriting request failed: {exc}")
            return None
        if not changed:
            return header + data
        rewritten = request.SerializeToString()
        if len(rewritten) > MAX_MESSAGE_LENGTH:
            self._answer(
                stream_id,
                Code.RESOURCE_EXHAUSTED,
                f"rewritten request of {len(rewritten)} bytes exceeds the {MAX_MESSAGE_LENGTH}-byte message limit",
            )
            return None
        return Frame(stream_id, FrameType.REQUEST, header[9], rewritten).encode()

    def _serve_here(self, stream_id: int, request: ttrpc_pb2.Request, handler: LocalMethod) -> None:
        try:
            payload = handler(request.payload)
        except TtrpcError as exc:
            self._answer(stream_id, exc.code, exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - a handler bug fails one call, not the relay
            log.error("serving %s/%s failed", request.service, request.method, exc_info=exc)
            self._answer(stream_id, Code.INTERNAL, f"{request.method} failed: {type(exc).__name__}")
            return
        data = Frame(stream_id, FrameType.RESPONSE, 0, success_response(payload)).encode()
        with contextlib.suppress(OSError, RuntimeError):
            self._send_down(data)

    def _answer(self, stream_id: int, code: Code | int, message: str) -> None:
        """Send an error response downstream on ``stream_id`` (best effort; whole frames are
        written without awaiting, so the two pumps' frames never interleave)."""
        data = Frame(stream_id, FrameType.RESPONSE, 0, error_response(code, message)).encode()
        with contextlib.suppress(OSError, RuntimeError):
            self._send_down(data)


class _Relay(FrameRewriter):
    def __init__(
        self,
        down_reader: asyncio.StreamReader,
        down_writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        rewrite_request: RewriteRequest | None,
        local: LocalMethods,
        rewritten_methods: Collection[str] | None,
    ) -> None:
        self.down_reader = down_reader
        self.down_writer = down_writer
        self.up_reader = up_reader
        self.up_writer = up_writer
        self._hooks(rewrite_request, local, rewritten_methods)

    def _send_down(self, data: bytes) -> None:
        self.down_writer.write(data)

    async def run(self) -> str:
        pumps = [
            asyncio.create_task(self._downstream_to_upstream(), name="ttrpc-relay-down-up"),
            asyncio.create_task(self._upstream_to_downstream(), name="ttrpc-relay-up-down"),
        ]
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            reason = _reason_of(done.pop())
        finally:
            # Close synchronously first: a second cancellation during the awaits
            # below must not leave either connection open.
            for writer in (self.down_writer, self.up_writer):
                with contextlib.suppress(Exception):
                    writer.close()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            await close_writer(self.down_writer)
            await close_writer(self.up_writer)
        return reason

    async def _downstream_to_upstream(self) -> str:
        return await self._pump(
            ("downstream", self.down_reader), ("upstream", self.up_writer),
            "request refused", self._forward_request,
        )

    async def _upstream_to_downstream(self) -> str:
        return await self._pump(
            ("upstream", self.up_reader), ("downstream", self.down_writer),
            "upstream answer dropped", None,
        )

    async def _pump(
        self,
        source: tuple[str, asyncio.StreamReader],
        target: tuple[str, asyncio.StreamWriter],
        oversized: str,
        transform: Callable[[bytes, bytes], bytes | None] | None,
    ) -> str:
        """Copy frames from ``source`` to ``target`` until either side ends; returns why.

        Reads whatever arrived (up to ``READ_CHUNK``), cuts it into frames and
        writes every frame of the chunk in one write, unchanged frames as they
        came (no decode, no re-encode): one wakeup and one send per burst, not
        two reads and a drain per frame. A frame over the limit is answered
        RESOURCE_EXHAUSTED downstream (``oversized`` says what happened to it)
        and the pump goes on; ``transform(header, data)`` may change a frame or,
        returning None, drop it because it was answered here.
        """
        source_name, reader = source
        target_name, writer = target
        parser = FrameParser()
        while True:
            try:
                data = await reader.read(READ_CHUNK)
            except OSError as exc:
                return f"{source_name} read failed: {exc}"
            try:
                if not data:
                    parser.end()
                    return f"{source_name} closed the connection"
                out = self.process(parser, data, oversized, transform)
            except FrameError as exc:
                return _unparseable(source_name, exc)
            if out and not await _write(writer, out):
                return f"{target_name} connection lost while writing"

async def _write(writer: asyncio.StreamWriter, data: bytes) -> bool:
    try:
        writer.write(data)
        await writer.drain()
    except (OSError, RuntimeError):
        return False
    return True


def _unparseable(side: str, exc: FrameError) -> str:
    reason = f"unparseable framing from {side}: {exc}"
    log.warning("closing relay: %s", reason)
    return reason


def _reason_of(task: asyncio.Task[str]) -> str:
    with contextlib.suppress(asyncio.CancelledError):
        exc = task.exception()
        if exc is None:
            return task.result()
        log.error("ttrpc relay failed", exc_info=exc)
        return f"relay failed: {exc!r}"
    return "relay cancelled"
