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
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from cloudadaptor.adaptor.hooks import LifecycleRecorder, NoopRecorder
from cloudadaptor.eventloop import HeldProtocol
from cloudadaptor.protocols import health_pb2
from cloudadaptor.retry import Backoff, RetryTimeout, retry_until
from cloudadaptor.ttrpc.client import Client
from cloudadaptor.wire import AGENT_PORT

log = logging.getLogger(__name__)

# wait_ready's polling. A refused dial costs a connect and a RST, so the first second polls every 10–60 ms:
# a local VM or a claimed pool VM serves within a few hundred ms, and StartVM returns as soon as it does (issue
# 16). It slows to twice a second (never less) for a cloud VM's 20–60 s boot.
READINESS_BACKOFF = Backoff(initial=0.01, factor=1.25, maximum=0.5)

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
        self.recorder = recorder or NoopRecorder()  # metrics: dials, open connections, bytes each way
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()

    async def wait_ready(self, timeout: float, backoff: Backoff | None = None) -> None:
        """Block until the agent answers Health.Check through the forwarder.

        Retries with ``backoff`` (default ``READINESS_BACKOFF``: growing from 0.01 s to 0.5 s); raises
        ``AgentUnreachable`` naming the endpoint and the last failure once
        ``timeout`` seconds have passed.
        """

        async def check() -> None:
            try:
                reader, writer = await self.endpoint.open()
            except BaseException:
                self.recorder.proxy_dial(False)
                raise
            self.recorder.proxy_dial(True)
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

        began = time.monotonic()
        try:
            # The default (READINESS_BACKOFF) polls at least twice a second; a claimed pool VM gets a tighter
            # one (delivery.readiness_poll).
            await retry_until(timeout, check, backoff=backoff or READINESS_BACKOFF)
            # The phase the benchmark subtracts from StartVM (bench/pods.py reads this line).
            log.info("agent proxy %s: agent answered after %.3fs", self.socket_path, time.monotonic() - began)
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
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._accept, path=str(path))
        os.chmod(path, 0o600)
        log.info("agent proxy listening on %s → %s", self.socket_path, self.endpoint)

    async def close(self) -> None:
        """Stop listening, cut every piped connection, remove the socket. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.abort()
        if pipes:
            await asyncio.wait([asyncio.ensure_future(pipe.closed) for pipe in pipes], timeout=2)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    def _accept(self) -> asyncio.Protocol:
        pipe = _Pipe(self)
        self._pipes.add(pipe)
        pipe.closed.add_done_callback(lambda _: self._pipes.discard(pipe))
        return pipe.down


class _End(HeldProtocol):
    """One side of a byte pipe: bytes it receives are written to the other side.

    Flow control crosses over: when the other side's send buffer fills, this
    side stops reading until it drains. End of stream or loss on either side
    closes both (after writing what is buffered), as one ttrpc connection should.
    """

    def __init__(self, pipe: _Pipe, direction: str) -> None:
        self.pipe = pipe
        self.direction = direction  # metrics: what this end receives is piped "to_vm" or "from_vm"
        self.other: _End | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.pipe.made(self)

    def received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
            self.pipe.proxy.recorder.proxy_bytes(self.direction, len(data))

    def eof_received(self) -> bool:
        self.pipe.finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pipe.finish()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class _Pipe:
    """One shim connection piped to one TLS connection to the VM's forwarder.

    Two protocols writing into each other, not two copy tasks: each chunk costs
    one callback and one write, which keeps a proxied agent call close to a
    direct one (``python -m bench``, agent path). ``closed`` resolves once both
    connections are gone and no dial is in progress.
    """

    def __init__(self, proxy: AgentProxy) -> None:
        self.proxy = proxy
        self.down, self.up = _End(self, "to_vm"), _End(self, "from_vm")
        self._counted = False  # an open piped connection in the metrics
        self.down.other, self.up.other = self.up, self.down
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._dial: asyncio.Task[None] | None = None

    def made(self, end: _End) -> None:
        if end is self.down and self._dial is None:
            end.hold()  # until the upstream connection is there
            self._dial = asyncio.get_running_loop().create_task(self._connect())
            self._dial.add_done_callback(lambda _: self.finish() if self.down.transport is None else None)

    async def _connect(self) -> None:
        endpoint = self.proxy.endpoint
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: self.up, endpoint.host, endpoint.port, ssl=endpoint.ssl_context,
                server_hostname=endpoint.server_hostname if endpoint.ssl_context else None,
            )
        except (OSError, ssl.SSLError) as exc:
            self.proxy.recorder.proxy_dial(False)
            log.warning("agent proxy %s: cannot reach agent at %s: %s", self.proxy.socket_path, endpoint, exc)
            self.finish()
            return
        self.proxy.recorder.proxy_dial(True)
        self.proxy.recorder.proxy_connections(1)
        self._counted = True
        if self.down.transport is None or self.down.transport.is_closing():
            self.finish()  # the shim hung up while we dialled
        else:
            self.down.release()

    def finish(self) -> None:
        """Close both ends (buffered bytes are still sent); idempotent."""
        for end in (self.down, self.up):
            if end.transport is not None and not end.transport.is_closing():
                end.transport.close()
        self._settle()

    def abort(self) -> None:
        """Cut both connections now (``AgentProxy.close``)."""
        if self._dial is not None:
            self._dial.cancel()
        for end in (self.down, self.up):
            if end.transport is not None:
                end.transport.abort()
        self._settle()

    def _settle(self) -> None:
        dialling = self._dial is not None and not self._dial.done()
        if self.down.transport is None and self.up.transport is None and not dialling and not self.closed.done():
            if self._counted:
                self.proxy.recorder.proxy_connections(-1)
            self.closed.set_result(None)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "none"
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds, 3), 60)
    return f"{int(minutes)}m{secs:g}s" if minutes else f"{secs:g}s"
