"""AgentProxy's byte pipe: shim connection ⇄ agent connection, verbatim, with flow control and clean ends."""

from __future__ import annotations

import asyncio
import os

from cloudadaptor.adaptor.proxy import AgentEndpoint, AgentProxy


async def echo_server() -> tuple[asyncio.Server, int, list[asyncio.StreamWriter]]:
    """A TCP echo 'agent' on loopback; the list holds its open connections."""
    conns: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], conns


async def test_bytes_pass_both_ways_unchanged_even_past_the_buffers(tmp_path):
    server, port, _ = await echo_server()
    proxy = AgentProxy(str(tmp_path / "agent.ttrpc"), AgentEndpoint("127.0.0.1", port))
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


async def test_agent_hanging_up_closes_the_shim_connection(tmp_path):
    server, port, conns = await echo_server()
    proxy = AgentProxy(str(tmp_path / "agent.ttrpc"), AgentEndpoint("127.0.0.1", port))
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


async def test_shim_hanging_up_closes_the_agent_connection(tmp_path):
    ended = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        ended.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    proxy = AgentProxy(str(tmp_path / "agent.ttrpc"), AgentEndpoint("127.0.0.1", server.sockets[0].getsockname()[1]))
    await proxy.start()
    try:
        _, writer = await asyncio.open_unix_connection(proxy.socket_path)
        writer.write(b"x")
        await writer.drain()
        writer.close()
        await asyncio.wait_for(ended.wait(), 5)
    finally:
        await proxy.close()
        server.close()


async def test_close_cuts_open_connections_and_removes_the_socket(tmp_path):
    server, port, _ = await echo_server()
    proxy = AgentProxy(str(tmp_path / "agent.ttrpc"), AgentEndpoint("127.0.0.1", port))
    await proxy.start()
    reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
    await proxy.close()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert not os.path.exists(proxy.socket_path)
    assert not proxy._pipes
    server.close()


async def test_unreachable_agent_closes_the_shim_connection(tmp_path, caplog):
    server, port, _ = await echo_server()
    server.close()
    await server.wait_closed()  # nobody listens on ``port`` any more
    proxy = AgentProxy(str(tmp_path / "agent.ttrpc"), AgentEndpoint("127.0.0.1", port))
    await proxy.start()
    try:
        reader, _ = await asyncio.open_unix_connection(proxy.socket_path)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert any("cannot reach agent" in r.getMessage() for r in caplog.records)
    finally:
        await proxy.close()
