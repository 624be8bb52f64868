"""An asyncio ttrpc client that behaves like containerd's reference client.

One connection carries any number of concurrent unary calls. Stream ids are
odd, start at 1 and grow by 2 per call; responses may arrive in any order.
A background task reads responses; when the connection ends every pending
call fails with ``ConnectionClosed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from cloudadaptor.protocols import ttrpc_pb2
from cloudadaptor.ttrpc.errors import Code, ConnectionClosed, TtrpcError
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

M = TypeVar("M", bound=Message)
Metadata = Mapping[str, str | Iterable[str]]
_MAX_STREAM_ID = 0xFFFFFFFF


class Client:
    """A ttrpc client over a connected stream pair.

    Construct inside a running event loop (it starts the reader task), or use
    ``connect_unix``/``connect_tcp``. ``close()`` is idempotent; the client
    is also an async context manager.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_stream_id = 1
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._write_lock = asyncio.Lock()
        self._closed_reason: str | None = None
        self._receiver = asyncio.get_running_loop().create_task(self._receive())

    @classmethod
    async def connect_unix(cls, path: str) -> Client:
        """Dial a unix socket; raises ``OSError`` when nobody listens."""
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    @classmethod
    async def connect_tcp(
        cls,
        host: str,
        port: int,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> Client:
        """Dial TCP (TLS when ``ssl`` is given); raises ``OSError``/``ssl.SSLError`` on failure."""
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl, server_hostname=server_hostname if ssl is not None else None
        )
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> bytes:
        """Make one unary call and return the response payload.

        ``timeout`` (seconds) is sent as ``timeout_nano`` and enforced here
        too. Raises ``TtrpcError`` for an error status (DEADLINE_EXCEEDED on
        local expiry, RESOURCE_EXHAUSTED without sending anything when the
        request exceeds the 4 MiB frame limit) and ``ConnectionClosed`` when
        the connection is or becomes unusable. Cancelling the caller only
        abandons the call; the connection stays usable.
        """
        if self._closed_reason is not None:
            raise ConnectionClosed(self._closed_reason)
        request = ttrpc_pb2.Request(service=service, method=method, payload=payload)
        if timeout is not None:
            if timeout <= 0:
                raise TtrpcError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: deadline already passed")
            request.timeout_nano = max(1, int(timeout * 1e9))
        for key, value in _metadata_pairs(metadata):
            request.metadata.add(key=key, value=value)
        data = request.SerializeToString()
        if len(data) > MAX_MESSAGE_LENGTH:
            raise TtrpcError(
                Code.RESOURCE_EXHAUSTED,
                f"{service}/{method}: request of {len(data)} bytes exceeds the {MAX_MESSAGE_LENGTH}-byte message limit",
            )
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        stream_id: int | None = None
        try:
            async with asyncio.timeout(timeout) as scope:
                stream_id = await self._send_request(data, future)
                return await future
        except TimeoutError:
            if scope.expired():
                raise TtrpcError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: deadline exceeded") from None
            raise
        finally:
            if stream_id is not None:
                self._pending.pop(stream_id, None)

    async def call_message(
        self,
        service: str,
        method: str,
        request_msg: Message,
        response_cls: type[M],
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> M:
        """``call`` with protobuf messages; an undecodable reply is ``TtrpcError(INTERNAL)``."""
        payload = await self.call(service, method, request_msg.SerializeToString(), timeout, metadata)
        try:
            return response_cls.FromString(payload)
        except DecodeError as exc:
            raise TtrpcError(Code.INTERNAL, f"{service}/{method}: cannot decode response: {exc}") from None

    async def close(self) -> None:
        """Close the connection and fail pending calls with ``ConnectionClosed``. Idempotent."""
        self._shut("client closed")
        with contextlib.suppress(Exception):
            self._writer.close()
        self._receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._receiver
        await close_writer(self._writer)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _send_request(self, data: bytes, future: asyncio.Future[bytes]) -> int:
        """Write one request frame; returns its stream id, registered in ``_pending``.

        Ids are allocated under the write lock, so they reach the wire in
        increasing order (containerd's server refuses a smaller id).
        """
        async with self._write_lock:
            if self._closed_reason is not None:
                raise ConnectionClosed(self._closed_reason)
            stream_id = self._next_stream_id
            if stream_id > _MAX_STREAM_ID:
                raise ConnectionClosed("stream ids exhausted on this connection; dial a new one")
            self._next_stream_id += 2
            self._pending[stream_id] = future
            try:
                self._writer.write(Frame(stream_id, FrameType.REQUEST, 0, data).encode())
                await self._writer.drain()
            except (OSError, RuntimeError) as exc:
                self._pending.pop(stream_id, None)
                self._shut(f"write failed: {exc}")
                raise ConnectionClosed(f"write failed: {exc}") from exc
            except BaseException:
                self._pending.pop(stream_id, None)
                raise
            return stream_id

    async def _receive(self) -> None:
        reason = "connection closed by peer"
        try:
            while True:
                try:
                    frame = await read_frame(self._reader)
                except OversizedFrame as exc:
                    self._resolve_error(exc.stream_id, Code.RESOURCE_EXHAUSTED, str(exc))
                    continue
                if frame is None:
                    break
                if frame.type == FrameType.RESPONSE:
                    self._resolve(frame)
                else:
                    log.debug("client ignoring frame type %d on stream %d", frame.type, frame.stream_id)
        except FrameError as exc:
            reason = f"unparseable response stream: {exc}"
            log.warning("ttrpc client closing connection: %s", reason)
        except OSError as exc:
            reason = f"read failed: {exc}"
        finally:
            self._shut(reason)
            self._writer.close()

    def _resolve(self, frame: Frame) -> None:
        future = self._pending.get(frame.stream_id)
        if future is None or future.done():
            log.debug("client dropping response for unknown or abandoned stream %d", frame.stream_id)
            return
        try:
            response = ttrpc_pb2.Response.FromString(frame.data)
        except DecodeError as exc:
            future.set_exception(TtrpcError(Code.INTERNAL, f"cannot decode response envelope: {exc}"))
            return
        if response.HasField("status") and response.status.code != Code.OK:
            future.set_exception(TtrpcError(response.status.code, response.status.message))
        else:
            future.set_result(response.payload)

    def _resolve_error(self, stream_id: int, code: Code, message: str) -> None:
        future = self._pending.get(stream_id)
        if future is not None and not future.done():
            future.set_exception(TtrpcError(code, message))

    def _shut(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionClosed(self._closed_reason))


def _metadata_pairs(metadata: Metadata | None) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for key, value in (metadata or {}).items():
        values = [value] if isinstance(value, str) else list(value)
        pairs.extend((key, v) for v in values)
    return pairs
