"""AgentProxy: the worker end of the shim → pod VM agent channel.

The shim dials ``agent.ttrpc`` (a unix socket in the sandbox's pod dir); each
connection is piped byte for byte to the VM's agent-protocol-forwarder over
(m)TLS on ``wire.AGENT_PORT``, so every AgentService and Health call reaches the agent
untouched. One TLS connection per shim connection keeps ttrpc stream ids and
flow exactly as the shim sent them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cloudadaptor.adaptor.hooks import LifecycleRecorder, NoopRecorder
from cloudadaptor.protocols import health_pb2
from cloudadaptor.retry import Backoff, RetryTimeout, retry_until
from cloudadaptor.ttrpc.client import Client
from cloudadaptor.ttrpc.framing import close_writer
from cloudadaptor.wire import AGENT_PORT

log = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 16


class AgentUnreachable(Exception):
    """The agent did not answer within the proxy timeout."""


@dataclass(frozen=True)
class AgentEndpoint:
    host: str
    port: int = AGENT_PORT
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None  # name in the VM's server certificate

    def __str__(self) -> str:
        return f"{self.host}:{self.port} ({'mTLS' if self.ssl_context else 'plain TCP'})"

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            self.host,
            self.port,
            ssl=self.ssl_context,
            server_hostname=self.server_hostname if self.ssl_context else None,
        )


class AgentProxy:
    """Serves ``socket_path`` for one sandbox, forwarding to ``endpoint``."""

    def __init__(self, socket_path: str, endpoint: AgentEndpoint, recorder: LifecycleRecorder | None = None) -> None:
        self.socket_path = socket_path
        self.endpoint = endpoint
        self.recorder = recorder or NoopRecorder()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def wait_ready(self, timeout: float) -> None:
        """Block until the agent answers Health.Check through the forwarder.

        Retries with backoff; raises ``AgentUnreachable`` naming the endpoint
        and the last failure once ``timeout`` seconds have passed.
        """

        async def check() -> None:
            reader, writer = await self._dial()
            client = Client(reader, writer)
            try:
                reply = await client.call_message(
                    "grpc.Health", "Check", health_pb2.CheckRequest(),
                    health_pb2.HealthCheckResponse, timeout=10,
                )
            finally:
                await client.close()
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise ConnectionError(f"agent health is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")

        try:
            # Polls at least twice a second: a claimed pool VM serves within a second or two of its claim.
            await retry_until(timeout, check, backoff=Backoff(initial=0.05, maximum=0.5))
        except RetryTimeout as exc:
            raise AgentUnreachable(
                f"agent at {self.endpoint} did not answer within {_duration(timeout)} "
                f"({exc.attempts} attempts; last error: {_describe(exc.last_error)})"
            ) from None

    async def start(self) -> None:
        """Listen on the socket (mode 0600); returns once listening. Idempotent."""
        if self._server is not None:
            return
        path = Path(self.socket_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._server = await asyncio.start_unix_server(self._accept, path=str(path))
        os.chmod(path, 0o600)
        log.info("agent proxy listening on %s → %s", self.socket_path, self.endpoint)

    async def close(self) -> None:
        """Stop listening, cut every piped connection, remove the socket. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._pipes):
            task.cancel()
        if self._pipes:
            await asyncio.gather(*self._pipes, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            await self._pipe(reader, writer)
        except asyncio.CancelledError:
            pass  # close() cut this connection; asyncio's server callback must not see it
        finally:
            self._pipes.discard(task)

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            streams = await self.endpoint.open()
        except BaseException:
            self.recorder.proxy_dial(False)
            raise
        self.recorder.proxy_dial(True)
        return streams

    async def _pipe(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await self._dial()
        except (OSError, ssl.SSLError) as exc:
            log.warning("agent proxy %s: cannot reach agent at %s: %s", self.socket_path, self.endpoint, exc)
            await close_writer(down_w)
            return
        self.recorder.proxy_connections(1)
        to_vm = functools.partial(self.recorder.proxy_bytes, "to_vm")
        from_vm = functools.partial(self.recorder.proxy_bytes, "from_vm")
        try:
            done, pending = await _first_completed(_copy(down_r, up_w, to_vm), _copy(up_r, down_w, from_vm))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self.recorder.proxy_connections(-1)
            await asyncio.gather(close_writer(up_w), close_writer(down_w))


async def _first_completed(*coros: Awaitable[object]) -> tuple[set[asyncio.Future[object]], set[asyncio.Future[object]]]:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counted: Callable[[int], None]) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while data := await reader.read(_COPY_CHUNK):
            counted(len(data))
            writer.write(data)
            await writer.drain()


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "none"
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds, 3), 60)
    return f"{int(minutes)}m{secs:g}s" if minutes else f"{secs:g}s"
