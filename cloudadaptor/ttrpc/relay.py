"""Copy ttrpc frames between two connections, optionally rewriting requests.

``downstream`` is the side that sends requests (the client); ``upstream``
serves them. Frames pass verbatim, except request frames the rewrite hook
changed. Used by the pod VM's agent-protocol-forwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from google.protobuf.message import DecodeError

from cloudadaptor.protocols import ttrpc_pb2
from cloudadaptor.ttrpc.errors import Code, TtrpcError, error_response
from cloudadaptor.ttrpc.framing import (
    MAX_MESSAGE_LENGTH,
    Frame,
    FrameError,
    FrameType,
    OversizedFrame,
    close_writer,
    read_frame,
)

log = logging.getLogger("cloudadaptor.ttrpc")

RewriteRequest = Callable[[ttrpc_pb2.Request], bool]


async def relay(
    down_reader: asyncio.StreamReader,
    down_writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    rewrite_request: RewriteRequest | None = None,
) -> str:
    """Relay frames both ways until either side closes; blocks; returns why it ended.

    ``rewrite_request(req)`` sees each decodable request envelope from
    downstream, may edit it in place and returns True when it changed
    something (only then is the frame re-encoded). It may raise
    ``TtrpcError`` to answer the call downstream instead of forwarding it.
    Undecodable envelopes are forwarded untouched; a rewrite that grows a
    request past 4 MiB, and any frame over 4 MiB from either side, is
    answered RESOURCE_EXHAUSTED downstream on its stream. Unparseable
    framing on either side ends the relay (logged on ``cloudadaptor.ttrpc``).

    Cleanup: on return, error or cancellation both writers are closed and
    no task is left running.
    """
    session = _Relay(down_reader, down_writer, up_reader, up_writer, rewrite_request)
    return await session.run()


class _Relay:
    def __init__(
        self,
        down_reader: asyncio.StreamReader,
        down_writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        rewrite_request: RewriteRequest | None,
    ) -> None:
        self.down_reader = down_reader
        self.down_writer = down_writer
        self.up_reader = up_reader
        self.up_writer = up_writer
        self.rewrite_request = rewrite_request
        self.down_lock = asyncio.Lock()  # both pumps write downstream
        self.up_lock = asyncio.Lock()  # only one pump writes upstream; a lock keeps the pumps alike

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
            ("downstream", self.down_reader), ("upstream", self.up_writer, self.up_lock),
            "request refused", self._forward_request,
        )

    async def _upstream_to_downstream(self) -> str:
        return await self._pump(
            ("upstream", self.up_reader), ("downstream", self.down_writer, self.down_lock),
            "upstream answer dropped", None,
        )

    async def _pump(
        self,
        source: tuple[str, asyncio.StreamReader],
        target: tuple[str, asyncio.StreamWriter, asyncio.Lock],
        oversized: str,
        transform: Callable[[Frame], Awaitable[Frame | None]] | None,
    ) -> str:
        """Copy frames from ``source`` to ``target`` until either side ends; returns why.

        A frame over the limit is answered RESOURCE_EXHAUSTED downstream (``oversized``
        says what happened to it) and the pump goes on; ``transform`` may change a
        frame or, returning None, drop it because it was answered here.
        """
        source_name, reader = source
        target_name, writer, lock = target
        while True:
            try:
                frame = await read_frame(reader)
            except OversizedFrame as exc:
                await self._answer(exc.stream_id, Code.RESOURCE_EXHAUSTED, f"{oversized}: {exc}")
                continue
            except FrameError as exc:
                return _unparseable(source_name, exc)
            except OSError as exc:
                return f"{source_name} read failed: {exc}"
            if frame is None:
                return f"{source_name} closed the connection"
            if transform is not None:
                frame = await transform(frame)
                if frame is None:
                    continue
            async with lock:
                if not await _write(writer, frame.encode()):
                    return f"{target_name} connection lost while writing"

    async def _forward_request(self, frame: Frame) -> Frame | None:
        if frame.type == FrameType.REQUEST and self.rewrite_request is not None:
            return await self._rewrite(frame)
        return frame

    async def _rewrite(self, frame: Frame) -> Frame | None:
        """The frame to forward, or None when the call was answered here instead."""
        assert self.rewrite_request is not None
        try:
            request = ttrpc_pb2.Request.FromString(frame.data)
        except DecodeError:
            return frame  # upstream answers INVALID_ARGUMENT, as it would without us
        try:
            changed = self.rewrite_request(request)
        except TtrpcError as exc:
            await self._answer(frame.stream_id, exc.code, exc.message)
            return None
        except Exception as exc:  # noqa: BLE001 - a hook bug fails one call, not the relay
            log.error("rewriting %s/%s failed", request.service, request.method, exc_info=exc)
            await self._answer(frame.stream_id, Code.INTERNAL, f"rewriting request failed: {exc}")
            return None
        if not changed:
            return frame
        data = request.SerializeToString()
        if len(data) > MAX_MESSAGE_LENGTH:
            await self._answer(
                frame.stream_id,
                Code.RESOURCE_EXHAUSTED,
                f"rewritten request of {len(data)} bytes exceeds the {MAX_MESSAGE_LENGTH}-byte message limit",
            )
            return None
        return Frame(frame.stream_id, frame.type, frame.flags, data)

    async def _answer(self, stream_id: int, code: Code | int, message: str) -> None:
        """Send an error response downstream on ``stream_id`` (best effort)."""
        data = Frame(stream_id, FrameType.RESPONSE, 0, error_response(code, message)).encode()
        async with self.down_lock:
            await _write(self.down_writer, data)


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
