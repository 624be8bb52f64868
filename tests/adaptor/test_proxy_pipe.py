"""AgentProxy's byte pipe: shim connection ⇄ agent connection, verbatim, with flow control and clean ends.

Each case runs over plain TCP and over mutual TLS, as the VM's forwarder serves it."""

from __future__ import annotations

import asyncio
import os
import ssl

import pytest

from cloudadaptor.adaptor.proxy import AgentEndpoint, AgentProxy
from cloudadaptor.tls import ServerTlsMaterial, client_context, server_context
from cloudadaptor.tlscerts import CertificateAuthority

SERVER_NAME = "podvm-test"


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = CertificateAuthority.create("pipe test CA")
    cert, key = ca.issue(SERVER_NAME, server=True, dns_names=[SERVER_NAME])
    client_cert, client_key = ca.issue("pipe test adaptor", server=False)
    return server_context(ServerTlsMaterial(cert, key, ca.cert_pem)), client_context(client_cert, client_key, ca.cert_pem)


@pytest.fixture(params=["tcp", "mtls"])
def tls(request) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(the agent's server context, the proxy's client context), or neither."""
    return _contexts() if request.param == "mtls" else (None, None)


def endpoint(port: int, tls) -> AgentEndpoint:
    return AgentEndpoint("127.0.0.1", port, tls[1], SERVER_NAME if tls[1] else None)


async def echo_server(tls=(None, None)) -> tuple[asyncio.Server, int, list[asyncio.StreamWriter]]:
    """A TCP (or mTLS) echo 'agent' on loopback; the list holds its open connections."""
    conns: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls[0])
    return server, server.sockets[0].getsockname()[1], conns


async def proxy_to(serve, tls, tmp_path) -> tuple[asyncio.Server, AgentProxy]:
    """A started AgentProxy in front of an 'agent' on loopback that runs ``serve`` for each connection."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls[0])
    proxy = AgentProxy(str(tmp_path / "agent.ttrpc"), endpoint(server.sockets[0].getsockname()[1], tls))
    await proxy.start()
    return server, proxy


async def test_bytes_pass_both_ways_unchanged_even_past_the_buffers(tmp_path, tls):
    server, port, _ = await echo_server(tls)
    proxy = AgentProxy(str(tmp_path / "agent.ttrpc"), endpoint(port, tls))
    await proxy.start()
    try:
        reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
        payload = os.urandom(8 << 20)  # far beyond every socket buffer: pause/resume must work

        async def send() -> None:
            writer.write(payload)
            await writer.drain()

        sender = asyncio.create_task(send())
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
        await sender
        assert echoed == payload, "the pipe must be byte-exact"
        writer.close()
    finally:
        await proxy.close()
        server.close()


async def test_agent_hanging_up_closes_the_shim_connection(tmp_path, tls):
    server, port, conns = await echo_server(tls)
    proxy = AgentProxy(str(tmp_path / "agent.ttrpc"), endpoint(port, tls))
    await proxy.start()
    try:
        reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        conns[0].close()
        assert await asyncio.wait_for(reader.read(), 5) == b"", "the shim must see the end of the connection"
        await asyncio.sleep(0.05)
        assert not proxy._pipes, "a finished pipe is forgotten"
    finally:
        await proxy.close()
        server.close()


async def test_shim_hanging_up_closes_the_agent_connection(tmp_path, tls):
    ended = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        ended.set()
        writer.close()

    server, proxy = await proxy_to(serve, tls, tmp_path)
    try:
        _, writer = await asyncio.open_unix_connection(proxy.socket_path)
        writer.write(b"x")
        await writer.drain()
        writer.close()
        await asyncio.wait_for(ended.wait(), 5)
    finally:
        await proxy.close()
        server.close()


async def test_close_cuts_open_connections_and_removes_the_socket(tmp_path, tls):
    server, port, _ = await echo_server(tls)
    proxy = AgentProxy(str(tmp_path / "agent.ttrpc"), endpoint(port, tls))
    await proxy.start()
    reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
    await proxy.close()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert not os.path.exists(proxy.socket_path)
    assert not proxy._pipes
    server.close()


async def test_unreachable_agent_closes_the_shim_connection(tmp_path, caplog, tls):
    server, port, _ = await echo_server()
    server.close()
    await server.wait_closed()  # nobody listens on ``port`` any more
    proxy = AgentProxy(str(tmp_path / "agent.ttrpc"), endpoint(port, tls))
    await proxy.start()
    try:
        reader, _ = await asyncio.open_unix_connection(proxy.socket_path)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert any("cannot reach agent" in r.getMessage() for r in caplog.records)
    finally:
        await proxy.close()


async def test_agent_with_an_untrusted_certificate_closes_the_shim_connection(tmp_path, caplog):
    server_tls, _ = _contexts()
    _, client_tls = _contexts()  # another CA: the handshake must fail
    server, port, conns = await echo_server((server_tls, None))
    proxy = AgentProxy(str(tmp_path / "agent.ttrpc"), endpoint(port, (None, client_tls)))
    await proxy.start()
    try:
        reader, _ = await asyncio.open_unix_connection(proxy.socket_path)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert any("cannot reach agent" in r.getMessage() and "CERTIFICATE_VERIFY_FAILED" in r.getMessage()
                   for r in caplog.records)
        assert not conns, "no relayed connection"
    finally:
        await proxy.close()
        server.close()


async def test_many_small_writes_arrive_in_order_over_mtls(tmp_path):
    """ttrpc-sized messages back to back: nothing lost, reordered or merged wrongly."""
    tls = _contexts()
    server, port, _ = await echo_server(tls)
    proxy = AgentProxy(str(tmp_path / "agent.ttrpc"), endpoint(port, tls))
    await proxy.start()
    try:
        reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
        messages = [os.urandom(1 + i % 300) for i in range(2000)]
        for message in messages:
            writer.write(message)
        await writer.drain()
        echoed = await asyncio.wait_for(reader.readexactly(sum(map(len, messages))), 30)
        assert echoed == b"".join(messages)
        writer.close()
    finally:
        await proxy.close()
        server.close()


async def test_an_agent_that_does_not_read_pauses_the_shim_and_then_gets_every_byte(tmp_path):
    """Over mTLS too, the proxy stops reading the shim while the agent's side cannot take more."""
    tls = _contexts()
    go, received = asyncio.Event(), bytearray()
    payload = os.urandom(32 << 20)  # more than the socket buffers and the proxy's queue can hold

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await go.wait()
        while len(received) < len(payload) and (data := await reader.read(1 << 16)):
            received.extend(data)
        writer.close()

    server, proxy = await proxy_to(serve, tls, tmp_path)
    try:
        reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
        writer.write(payload)
        sender = asyncio.create_task(writer.drain())
        await asyncio.sleep(0.5)
        assert not sender.done(), "the shim must be held back while the agent does not read"
        go.set()
        await asyncio.wait_for(sender, 30)
        assert await asyncio.wait_for(reader.read(), 30) == b"", "the agent's close reaches the shim"
        assert bytes(received) == payload
        writer.close()
    finally:
        await proxy.close()
        server.close()


def test_on_the_daemons_own_loop_a_request_sent_at_once_waits_for_the_vm_connection(tmp_path, tls):
    """The daemon runs on uvloop (``cloudadaptor.eventloop``), which starts reading an accepted socket after
    ``connection_made`` paused it: what the shim sends before the VM connection is up must wait, not vanish."""
    from cloudadaptor.eventloop import new_event_loop

    async def body() -> None:
        server, port, _ = await echo_server(tls)
        proxy = AgentProxy(str(tmp_path / "agent.ttrpc"), endpoint(port, tls))
        await proxy.start()
        try:
            for n in range(5):  # each connection's first bytes go out with the connect
                reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
                message = f"first bytes of connection {n}".encode()
                writer.write(message)
                assert await asyncio.wait_for(reader.readexactly(len(message)), 5) == message
                writer.close()
        finally:
            await proxy.close()
            server.close()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(body())
