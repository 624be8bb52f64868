"""Bounds of the ttrpc server: connections overall, requests in flight per connection (issue 11 item 8)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from cloudadaptor.protocols import ttrpc_pb2
from cloudadaptor.ttrpc import CallContext, Code, Server
from cloudadaptor.ttrpc.client import Client

HDR = ">IIBB"


async def echo(payload: bytes, ctx: CallContext) -> bytes:
    return b"echo:" + payload


class Gate:
    """A handler that blocks until ``release`` is set; ``entered`` counts the calls inside."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0

    async def __call__(self, payload: bytes, ctx: CallContext) -> bytes:
        self.entered += 1
        await self.release.wait()
        return b"done"


async def serve(tmp_path, **bounds) -> tuple[Server, str, Gate]:
    server = Server(**bounds)
    gate = Gate()
    server.register("t.S", "Echo", echo)
    server.register("t.S", "Wait", gate)
    path = str(tmp_path / "t.sock")
    await server.serve_unix(path)
    return server, path, gate


def request(stream_id: int, method: str) -> bytes:
    data = ttrpc_pb2.Request(service="t.S", method=method).SerializeToString()
    return struct.pack(HDR, len(data), stream_id, 1, 0) + data


async def read_status(reader: asyncio.StreamReader) -> tuple[int, ttrpc_pb2.Response]:
    length, stream_id, _, _ = struct.unpack(HDR, await asyncio.wait_for(reader.readexactly(10), 5))
    return stream_id, ttrpc_pb2.Response.FromString(await reader.readexactly(length))


async def test_requests_past_the_in_flight_cap_are_resource_exhausted(tmp_path):
    server, path, gate = await serve(tmp_path, max_requests=3)
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(b"".join(request(2 * n + 1, "Wait") for n in range(4)))
        await writer.drain()
        stream_id, response = await read_status(reader)
        assert (stream_id, response.status.code) == (7, Code.RESOURCE_EXHAUSTED), "the 4th request is refused"
        assert "3 requests already in flight" in response.status.message
        assert gate.entered == 3
        gate.release.set()
        answered = {(await read_status(reader))[0] for _ in range(3)}
        assert answered == {1, 3, 5}
        writer.write(request(9, "Echo"))  # in flight went back down: served again
        await writer.drain()
        stream_id, response = await read_status(reader)
        assert stream_id == 9 and response.payload == b"echo:"
    finally:
        writer.close()
        await server.close()


async def test_idle_connections_make_room_for_a_real_call(tmp_path):
    server, path, _ = await serve(tmp_path, max_connections=4)
    idle = [await asyncio.open_unix_connection(path) for _ in range(4)]
    try:
        async with await Client.connect_unix(path) as client:
            assert await client.call("t.S", "Echo", b"hi", timeout=5) == b"echo:hi"
        assert server.evicted >= 1
        first_reader = idle[0][0]
        assert await asyncio.wait_for(first_reader.read(), 5) == b"", "the longest-idle connection was closed"
    finally:
        for _, writer in idle:
            writer.close()
        await server.close()


async def test_when_every_connection_is_busy_a_new_one_is_closed_and_the_busy_ones_finish(tmp_path):
    server, path, gate = await serve(tmp_path, max_connections=2)
    busy = [await Client.connect_unix(path) for _ in range(2)]
    calls = [asyncio.create_task(c.call("t.S", "Wait", b"", timeout=10)) for c in busy]
    try:
        while gate.entered < 2:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_unix_connection(path)
        assert await asyncio.wait_for(reader.read(), 5) == b"", "no slot: closed at once"
        writer.close()
        assert server.refused == 1
        gate.release.set()
        assert await asyncio.gather(*calls) == [b"done", b"done"]
    finally:
        for client in busy:
            await client.close()
        await server.close()


@pytest.mark.parametrize("bounds", [{}, {"max_connections": None, "max_requests": None}])
async def test_no_bounds_by_default(tmp_path, bounds):
    server, path, _ = await serve(tmp_path, **bounds)
    conns = [await asyncio.open_unix_connection(path) for _ in range(50)]
    try:
        async with await Client.connect_unix(path) as client:
            assert await client.call("t.S", "Echo", b"", timeout=5) == b"echo:"
        assert server.evicted == 0 and server.refused == 0
    finally:
        for _, writer in conns:
            writer.close()
        await server.close()
