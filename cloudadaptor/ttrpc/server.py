"""An asyncio ttrpc server that behaves like containerd's reference server.

Unary calls only: one request frame in, one response frame out on the same
(odd) stream id. Every request runs in its own task; response writes are
serialized per connection. Problems with one request are answered with a
status on its stream; problems with the byte stream itself close that one
connection (logged on ``cloudadaptor.ttrpc``); the server keeps serving.

Bounds (both optional): ``max_connections`` open connections — past it the
connection idle the longest (no request in flight) is closed to make room, and
a new one is closed at once when all are busy — and ``max_requests`` in flight
per connection — past it a request is answered RESOURCE_EXHAUSTED. Clients
like the Kata shim dial once per call, so idle connections are the cheap ones
to drop; a flood of idle connections cannot starve a real call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import ssl as ssl_module
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError, Message

from cloudadaptor.protocols import ttrpc_pb2
from cloudadaptor.ttrpc.errors import Code, TtrpcError, error_response, success_response
from cloudadaptor.ttrpc.unixsocket import remove_stale_socket, unlink_if_same
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


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a handler knows about its call. ``deadline`` is in ``loop.time()`` units."""

    service: str
    method: str
    metadata: dict[str, list[str]] = field(default_factory=dict)
    deadline: float | None = None


Handler = Callable[[bytes, CallContext], Awaitable[bytes]]


def unary(request_cls: type[Message], fn: Callable[[Any, CallContext], Any]) -> Handler:
    """Wrap ``fn(request_msg, ctx) -> response_msg`` (sync or async) into a bytes handler.

    A payload that does not decode as ``request_cls`` is answered
    INVALID_ARGUMENT without calling ``fn``.
    """

    async def handler(payload: bytes, ctx: CallContext) -> bytes:
        try:
            request = request_cls.FromString(payload)
        except DecodeError as exc:
            raise TtrpcError(
                Code.INVALID_ARGUMENT, f"{ctx.service}.{ctx.method}: cannot decode request: {exc}"
            ) from None
        response = fn(request, ctx)
        if inspect.isawaitable(response):
            response = await response
        data: bytes = response.SerializeToString()
        return data

    return handler


async def _unimplemented(payload: bytes, ctx: CallContext) -> bytes:
    raise TtrpcError(Code.UNIMPLEMENTED, f"service {ctx.service}: method {ctx.method}: unimplemented")


class Server:
    """A set of handlers served on any number of listeners and stream pairs.

    Not thread-safe; use from one event loop. ``close()`` is idempotent.
    """

    unary = staticmethod(unary)

    def __init__(self, *, max_connections: int | None = None, max_requests: int | None = None) -> None:
        self._handlers: dict[tuple[str, str], Handler] = {}
        self._fallback: Handler = _unimplemented
        self._listeners: list[asyncio.AbstractServer] = []
        self._socket_files: list[tuple[str, int, int]] = []  # path, st_dev, st_ino
        # Ordered least recently active first (``touched`` moves a connection to the end).
        self._connections: dict[_Connection, None] = {}
        self._closed = False
        self.max_connections = max_connections
        self.max_requests = max_requests
        self.evicted = 0  # idle connections closed to make room
        self.refused = 0  # connections closed at once because every slot was busy

    def register(self, service: str, method: str, handler: Handler) -> None:
        """Serve ``service``/``method`` with ``handler``. Registering a pair twice is a ``ValueError``."""
        if (service, method) in self._handlers:
            raise ValueError(f"{service}/{method} is already registered")
        self._handlers[(service, method)] = handler

    def set_fallback(self, handler: Handler) -> None:
        """Answer every unregistered method with ``handler`` (default: UNIMPLEMENTED)."""
        self._fallback = handler

    def handler_for(self, service: str, method: str) -> Handler:
        return self._handlers.get((service, method), self._fallback)

    async def serve_unix(self, path: str | os.PathLike[str], mode: int = 0o600) -> None:
        """Listen on a unix socket; returns once listening.

        Creates missing parent directories and replaces a stale socket file
        (one nobody listens on). Refuses (``FileExistsError``) to replace a
        file that is not a socket, and (``OSError`` EADDRINUSE) a socket
        someone still serves. The socket gets ``mode`` before it accepts any
        connection. ``close()`` removes the file if it is still ours.
        """
        self._check_open()
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        await remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        try:
            os.chmod(path, mode)  # before listen(): nobody can connect yet
            st = os.stat(path)
            listener = await asyncio.start_unix_server(self._accepted, sock=sock, backlog=1024)  # floods must not fill it
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)  # ours: bind() created it
            raise
        self._socket_files.append((path, st.st_dev, st.st_ino))
        self._listeners.append(listener)
        log.debug("ttrpc server listening on unix:%s", path)

    async def serve_tcp(self, host: str, port: int, ssl: ssl_module.SSLContext | None = None) -> int:
        """Listen on TCP (TLS when ``ssl`` is given); returns the bound port once listening."""
        self._check_open()
        listener = await asyncio.start_server(self._accepted, host, port, ssl=ssl)
        self._listeners.append(listener)
        bound: int = listener.sockets[0].getsockname()[1]
        log.debug("ttrpc server listening on tcp:%s:%s", host, bound)
        return bound

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one stream pair until it ends; blocks. Always closes ``writer``.

        Returns normally when the peer goes away, the stream is unparseable,
        or ``close()`` is called; cancelling the caller also ends the
        connection and cancels its in-flight handlers.
        """
        if self._closed or not self._make_room():
            await close_writer(writer)
            return
        task = self._start_connection(reader, writer)
        try:
            await asyncio.wait({task})  # close() cancelling ``task`` is a normal end for us
        except asyncio.CancelledError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise

    async def close(self) -> None:
        """Stop listening, end every connection, cancel running handlers, remove our socket files.

        Idempotent; returns when all connection tasks have finished.
        """
        self._closed = True
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.close()
        connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(Exception):
                connection.writer.close()  # even if its task never got to run
            connection.task.cancel()
        await asyncio.gather(*(c.task for c in connections), return_exceptions=True)
        for listener in listeners:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.wait_closed(), 1.0)
        files, self._socket_files = self._socket_files, []
        for path, dev, ino in files:
            unlink_if_same(path, dev, ino)

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Listener callback; synchronous so every accepted connection is registered at once."""
        if self._closed or not self._make_room():
            writer.close()
            return
        self._start_connection(reader, writer)

    def _make_room(self) -> bool:
        """True when one more connection may start: under the cap, or after closing the longest-idle one."""
        if self.max_connections is None or len(self._connections) < self.max_connections:
            return True
        idle = next((c for c in self._connections if not c.busy), None)
        if idle is None:
            self.refused += 1
            log.warning("ttrpc: refusing a connection: all %d connections have requests in flight", self.max_connections)
            return False
        self.evicted += 1
        log.debug("ttrpc: closing idle connection from %s to make room (cap %d)", idle.peer, self.max_connections)
        self._connections.pop(idle, None)
        with contextlib.suppress(Exception):
            idle.writer.close()
        idle.task.cancel()
        return True

    def touched(self, connection: _Connection) -> None:
        """``connection`` was just active: it becomes the last to be evicted."""
        if connection in self._connections:
            del self._connections[connection]
            self._connections[connection] = None

    def _start_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> asyncio.Task[None]:
        connection = _Connection(self, reader, writer)
        self._connections[connection] = None
        connection.task = asyncio.create_task(connection.run())
        connection.task.add_done_callback(lambda task: self._connection_done(connection, task))
        return connection.task

    def _connection_done(self, connection: _Connection, task: asyncio.Task[None]) -> None:
        self._connections.pop(connection, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("ttrpc connection from %s failed", connection.peer, exc_info=exc)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ttrpc server is closed")


class _Connection:
    """One served stream pair: a read loop plus one task per request."""

    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.task: asyncio.Task[None]  # set by Server._start_connection
        self.peer = _peer_name(writer)
        self._write_lock = asyncio.Lock()
        self._calls: set[asyncio.Task[None]] = set()
        self._in_flight = 0  # dispatched requests not yet answered
        self._last_stream_id = 0

    @property
    def busy(self) -> bool:
        return self._in_flight > 0

    async def run(self) -> None:
        try:
            reason = await self._read_loop()
            if reason:
                log.warning("closing ttrpc connection from %s: %s", self.peer, reason)
        finally:
            with contextlib.suppress(Exception):
                self.writer.close()  # at once: later awaits may be cancelled
            calls = list(self._calls)
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await close_writer(self.writer)

    async def _read_loop(self) -> str | None:
        """Dispatch frames until the stream ends; returns why it ended when that is worth a warning."""
        while True:
            try:
                frame = await read_frame(self.reader)
            except OversizedFrame as exc:
                await self.send_status(exc.stream_id, Code.RESOURCE_EXHAUSTED, str(exc))
                continue
            except FrameError as exc:
                return str(exc)
            except OSError as exc:
                return f"read failed: {exc}"
            if frame is None:
                log.debug("ttrpc connection from %s closed by peer", self.peer)
                return None
            self.server.touched(self)
            if frame.type != FrameType.REQUEST:
                log.debug("ignoring frame type %d on stream %d from %s", frame.type, frame.stream_id, self.peer)
                continue
            self._accept_request(frame)

    def _accept_request(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        if stream_id % 2 != 1:
            self._refuse(stream_id, "StreamID must be odd for client initiated streams")
            return
        if stream_id <= self._last_stream_id:
            self._refuse(stream_id, "StreamID cannot be re-used and must increment")
            return
        self._last_stream_id = stream_id
        try:
            request = ttrpc_pb2.Request.FromString(frame.data)
        except DecodeError as exc:
            self._refuse(stream_id, f"unmarshal request error: {exc}")
            return
        limit = self.server.max_requests
        if limit is not None and self._in_flight >= limit:
            message = f"{request.service}/{request.method}: {limit} requests already in flight on this connection"
            self._spawn(self.send_status(stream_id, Code.RESOURCE_EXHAUSTED, message))
            return
        self._in_flight += 1
        self._spawn(self._dispatch(stream_id, request))

    def _refuse(self, stream_id: int, message: str) -> None:
        self._spawn(self.send_status(stream_id, Code.INVALID_ARGUMENT, message))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _dispatch(self, stream_id: int, request: ttrpc_pb2.Request) -> None:
        try:
            await self._answer(stream_id, request)
        finally:
            self._in_flight -= 1

    async def _answer(self, stream_id: int, request: ttrpc_pb2.Request) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        metadata: dict[str, list[str]] = {}
        for kv in request.metadata:
            metadata.setdefault(kv.key, []).append(kv.value)
        ctx = CallContext(request.service, request.method, metadata, deadline)
        handler = self.server.handler_for(request.service, request.method)
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                payload = await handler(request.payload, ctx)
            data = success_response(payload)
        except TtrpcError as exc:
            data = error_response(exc.code, exc.message)
        except TimeoutError as exc:
            if not timeout.expired():
                data = self._unexpected(ctx, exc)
            else:
                data = error_response(Code.DEADLINE_EXCEEDED, f"{ctx.service}/{ctx.method}: deadline exceeded")
        except Exception as exc:  # noqa: BLE001 - a handler bug must not stop the server
            data = self._unexpected(ctx, exc)
        if len(data) > MAX_MESSAGE_LENGTH:
            log.error("%s/%s response of %d bytes exceeds the ttrpc limit", ctx.service, ctx.method, len(data))
            data = error_response(
                Code.RESOURCE_EXHAUSTED,
                f"response of {len(data)} bytes exceeds the {MAX_MESSAGE_LENGTH}-byte message limit",
            )
        await self._send(Frame(stream_id, FrameType.RESPONSE, 0, data))

    def _unexpected(self, ctx: CallContext, exc: BaseException) -> bytes:
        log.error("ttrpc handler %s/%s failed", ctx.service, ctx.method, exc_info=exc)
        return error_response(Code.UNKNOWN, str(exc) or type(exc).__name__)

    async def send_status(self, stream_id: int, code: Code, message: str) -> None:
        log.debug("answering %s on stream %d to %s: %s", code.name, stream_id, self.peer, message)
        await self._send(Frame(stream_id, FrameType.RESPONSE, 0, error_response(code, message)))

    async def _send(self, frame: Frame) -> None:
        data = frame.encode()
        async with self._write_lock:
            try:
                self.writer.write(data)
                await self.writer.drain()
            except (OSError, RuntimeError) as exc:
                log.debug("cannot answer stream %d on %s: %s", frame.stream_id, self.peer, exc)


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if peer:
        return str(peer) if not isinstance(peer, tuple) else f"{peer[0]}:{peer[1]}"
    sockname = writer.get_extra_info("sockname")
    return f"unix:{sockname}" if sockname else "unknown peer"
