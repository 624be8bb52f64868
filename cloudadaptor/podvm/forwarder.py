"""agent-protocol-forwarder: the pod VM's mTLS front door to the kata-agent.

Listens on TCP ``wire.AGENT_PORT`` (TLS with a required client certificate when TLS is
enabled). Each accepted connection gets its own unix connection to the
kata-agent socket and a ttrpc relay between the two (``ttrpc.relayproto``). Requests pass
verbatim except two rewrites:

- ``grpc.AgentService/CreateContainer``: the OCI spec gets the network
  namespace ``/run/netns/podns`` (the pod's network lives there);
- ``grpc.AgentService/CreateSandbox``: ``dns`` is cleared (the VM keeps its
  own resolver).

The forwarder answers one service itself, never relaying it: certificate
renewal (``podvm/certrenewal.py``, ``wire.CERT_SERVICE``), so the adaptor can
renew the server certificate of a long-lived pod without a restart. New
connections get the renewed certificate; open ones keep going.

Bounds, so a flood of connections cannot keep the adaptor out: at most
``max_handshakes`` connections wait in the TLS handshake (past it the oldest
waiting one is closed: a real client finishes its handshake in milliseconds),
each for at most ``handshake_timeout`` seconds, and at most
``max_connections`` connections are open in all (past it a new one is closed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import ssl
from pathlib import Path

from google.protobuf.message import DecodeError

from cloudadaptor.commandline import setup_logging
from cloudadaptor.eventloop import new_event_loop
from cloudadaptor.podvm.certrenewal import ServerCertificate
from cloudadaptor.protocols import agent_pb2, ttrpc_pb2
from cloudadaptor.ttrpc.errors import Code, TtrpcError
from cloudadaptor.ttrpc.relayproto import FrameRelay
from cloudadaptor.podconfig import ForwarderConfig
from cloudadaptor.userdata import APF_CONFIG_PATH
from cloudadaptor.wire import AGENT_PORT, PODNS_PATH

log = logging.getLogger("cloudadaptor.podvm.forwarder")

AGENT_SERVICE = "grpc.AgentService"
POD_NETNS_PATH = PODNS_PATH  # the agent runs the pod in the namespace pod-network set up
DEFAULT_KATA_AGENT_SOCKET = "/run/kata-containers/agent.sock"
HANDSHAKE_TIMEOUT = 10.0
MAX_HANDSHAKES = 64
MAX_CONNECTIONS = 256
AGENT_DIAL_TIMEOUT = 5.0


# ------------------------------------------------------------------ rewrites


def rewrite_agent_request(request: ttrpc_pb2.Request) -> bool:
    """The relay hook: edit ``request`` in place; True when something changed.

    Raises ``TtrpcError(INVALID_ARGUMENT)`` when an intercepted request does
    not decode, so it is answered rather than forwarded un-rewritten.
    """
    if request.service != AGENT_SERVICE or request.method not in _REWRITES:
        return False
    message_cls, edit = _REWRITES[request.method]
    return _rewrite_payload(request, message_cls, edit)


def _rewrite_payload(request: ttrpc_pb2.Request, message_cls: type, edit) -> bool:  # type: ignore[type-arg]
    try:
        message = message_cls.FromString(request.payload)
    except DecodeError as exc:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"{request.method}: cannot decode request: {exc}") from None
    if not edit(message):
        return False
    request.payload = message.SerializeToString()  # unknown (unmodelled) fields are kept
    return True


def _join_pod_netns(create: agent_pb2.CreateContainerRequest) -> bool:
    """Point the container's network namespace at the pod's; no duplicate entries."""
    namespaces = create.OCI.Linux.Namespaces
    network = [ns for ns in namespaces if ns.Type == "network"]
    if not network:
        namespaces.add(Type="network", Path=POD_NETNS_PATH)
        return True
    changed = False
    for ns in network:
        if ns.Path != POD_NETNS_PATH:
            ns.Path = POD_NETNS_PATH
            changed = True
    return changed


def _clear_dns(sandbox: agent_pb2.CreateSandboxRequest) -> bool:
    if not sandbox.dns:
        return False
    del sandbox.dns[:]
    return True


# method -> (its request message, the edit); the relay decodes only requests naming one of these
_REWRITES = {
    "CreateContainer": (agent_pb2.CreateContainerRequest, _join_pod_netns),
    "CreateSandbox": (agent_pb2.CreateSandboxRequest, _clear_dns),
}
REWRITTEN_METHODS = frozenset(_REWRITES)


# ----------------------------------------------------------------- forwarder


class AgentProtocolForwarder:
    """Accepts (m)TLS connections and relays each to the kata-agent socket.

    TLS comes from ``certificate`` (renewable: each new connection gets its
    current context) or a fixed ``ssl_context``; neither means plain TCP.
    ``start()`` returns once listening (``port`` is then the bound port);
    ``close()`` stops listening and ends every connection (idempotent).
    """

    def __init__(
        self,
        *,
        kata_agent_socket: str,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "0.0.0.0",
        port: int = AGENT_PORT,
        max_handshakes: int = MAX_HANDSHAKES,
        max_connections: int = MAX_CONNECTIONS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        certificate: ServerCertificate | None = None,
    ) -> None:
        if certificate is not None and ssl_context is not None:
            raise ValueError("give either certificate or ssl_context, not both")
        self.kata_agent_socket = kata_agent_socket
        self._fixed_context = ssl_context
        self.certificate = certificate
        self.host = host
        self.port = port
        self.max_handshakes = max_handshakes
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.evicted = 0  # pending handshakes closed to make room
        self.refused = 0  # connections closed at once: every slot held a relay
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._handshaking: dict[asyncio.Task[None], None] = {}  # oldest first
        self._closed = asyncio.Event()

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The context the next connection's handshake uses (a renewal replaces it)."""
        return self.certificate.context if self.certificate is not None else self._fixed_context

    async def start(self) -> None:
        """Bind and listen; raises ``OSError`` when the address is unavailable."""
        if self._listener is not None:
            raise RuntimeError("forwarder already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.create_server((self.host, self.port), family=family, backlog=1024)  # a flood must not fill it
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_task = asyncio.create_task(self._accept_loop(listener), name="forwarder-accept")
        log.info(
            "agent-protocol-forwarder listening on %s:%d (%s), kata-agent at %s",
            self.host, self.port, "mTLS" if self.ssl_context else "plain TCP, TLS disabled", self.kata_agent_socket,
        )

    async def serve_forever(self) -> None:
        """Start if needed and block until ``close()``."""
        if self._listener is None:
            await self.start()
        await self._closed.wait()

    async def close(self) -> None:
        """Stop accepting, end all relays and pending handshakes; idempotent."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._listener is not None:
            self._listener.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        self._closed.set()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                log.error("accept failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if not self._make_room():
                conn.close()
                continue
            started: list[bool] = []
            task = asyncio.create_task(self._serve(conn, _format_peer(peer), started))
            self._connections.add(task)
            self._handshaking[task] = None
            task.add_done_callback(lambda t, c=conn, s=started: self._connection_done(t, c, s))

    def _make_room(self) -> bool:
        """True when one more connection may start its handshake, after closing the oldest
        pending handshake when needed; False when every slot holds an established relay."""
        full = len(self._handshaking) >= self.max_handshakes or len(self._connections) >= self.max_connections
        if not full:
            return True
        if not self._handshaking:
            self.refused += 1
            log.warning("connection refused: %d relays are open (the limit)", len(self._connections))
            return False
        oldest = next(iter(self._handshaking))
        del self._handshaking[oldest]
        oldest.cancel()
        self.evicted += 1
        return True

    def _connection_done(self, task: asyncio.Task[None], conn: socket.socket, started: list[bool]) -> None:
        self._connections.discard(task)
        self._handshaking.pop(task, None)
        if not started:  # cancelled before its first step: nobody else will close the socket
            conn.close()

    async def _serve(self, conn: socket.socket, peer: str, started: list[bool]) -> None:
        """One client connection, start to end. Never raises (but honours cancellation).

        The relay is two protocols (``ttrpc.relayproto``): the TLS connection's bytes are cut into
        frames and written to the agent's socket in the loop's read callback, with no task per burst.
        """
        started.append(True)  # before any await: from here on _serve owns ``conn``
        local = self.certificate.methods() if self.certificate is not None else None
        relay = FrameRelay(rewrite_agent_request, local=local, rewritten_methods=REWRITTEN_METHODS)
        try:
            if not await self._handshake(conn, peer, relay):
                return
            self._handshaking.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            if not await self._dial_agent(relay, peer):
                return
            log.info("connection from %s relayed to kata-agent", peer)
            relay.start()
            reason = await asyncio.shield(relay.ended)
        except asyncio.CancelledError:
            relay.abort()
            raise
        log.info("connection from %s closed: %s", peer, reason)

    async def _handshake(self, conn: socket.socket, peer: str, relay: FrameRelay) -> bool:
        """The TLS handshake, ``relay.down`` becoming the client's protocol; False when refused."""
        loop = asyncio.get_running_loop()
        context = self.ssl_context  # read once: a renewal during this handshake applies to the next connection
        try:
            await loop.connect_accepted_socket(
                lambda: relay.down,
                conn,
                ssl=context,
                ssl_handshake_timeout=self.handshake_timeout if context else None,
            )
        except asyncio.CancelledError:
            conn.close()
            raise
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            conn.close()
            log.warning("connection from %s refused: TLS handshake failed: %s", peer, exc)
            return False
        except Exception:  # noqa: BLE001 - one bad connection must not go unnoticed or leak
            conn.close()
            log.exception("connection from %s failed before the relay started", peer)
            return False
        return True

    async def _dial_agent(self, relay: FrameRelay, peer: str) -> bool:
        """Connect ``relay.up`` to the kata-agent socket; False (client closed) when it cannot."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_unix_connection(lambda: relay.up, self.kata_agent_socket), AGENT_DIAL_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError) as exc:
            log.error("connection from %s closed: cannot reach kata-agent at %s: %s", peer, self.kata_agent_socket, exc)
            relay.end("kata-agent unreachable")
            return False
        if relay.down.transport is None or relay.ended.done():
            relay.end("downstream closed the connection")  # the client left while we dialled
            return False
        return True


def _format_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


# ----------------------------------------------------------------------- CLI


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the forwarder's options to ``parser`` (the CLI mounts it as ``forwarder``)."""
    parser.add_argument("--config", default=APF_CONFIG_PATH, help=f"apf.json (default {APF_CONFIG_PATH})")
    parser.add_argument(
        "--kata-agent-socket",
        default=DEFAULT_KATA_AGENT_SOCKET,
        help=f"kata-agent unix socket (default {DEFAULT_KATA_AGENT_SOCKET})",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None, help=f"TCP port (default: listen_port from the config, {AGENT_PORT})")
    parser.add_argument("--max-handshakes", type=_positive_int, default=MAX_HANDSHAKES,
                        help=f"connections waiting in the TLS handshake; past it the oldest is closed (default {MAX_HANDSHAKES})")
    parser.add_argument("--max-connections", type=_positive_int, default=MAX_CONNECTIONS,
                        help=f"open connections in all; past it new ones are closed (default {MAX_CONNECTIONS})")
    parser.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT,
                        help=f"seconds a client has to finish the TLS handshake (default {HANDSHAKE_TIMEOUT:g})")
    parser.add_argument("--log-level", default="info", help="debug | info | warning | error (default info)")
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, not {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 on a clean stop, 2 on bad configuration, 1 when it cannot listen."""
    setup_logging(args.log_level)
    try:
        config = ForwarderConfig.from_json(Path(args.config).read_bytes())
        certificate = ServerCertificate.from_config(config, Path(args.config))  # a renewal is written back there
    except (OSError, ValueError, ssl.SSLError) as exc:
        log.error("configuration refused: %s: %s", args.config, exc)
        return 2
    port = config.listen_port if args.port is None else args.port
    if certificate is None:
        log.warning("TLS is disabled in %s: the kata-agent is reachable without authentication", args.config)
    forwarder = AgentProtocolForwarder(
        kata_agent_socket=args.kata_agent_socket, certificate=certificate, host=args.host, port=port,
        max_handshakes=args.max_handshakes, max_connections=args.max_connections, handshake_timeout=args.handshake_timeout,
    )
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_serve_until_signalled(forwarder))
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", args.host, port, exc)
        return 1
    return 0


async def _serve_until_signalled(forwarder: AgentProtocolForwarder) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await forwarder.start()
    try:
        await stop.wait()
        log.info("stopping agent-protocol-forwarder")
    finally:
        await forwarder.close()


def main(argv: list[str] | None = None) -> int:
    """``agent-protocol-forwarder`` as a standalone command."""
    summary = (__doc__ or "").splitlines()[0]
    parser = build_parser(argparse.ArgumentParser(prog="agent-protocol-forwarder", description=summary))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
