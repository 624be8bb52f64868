"""Our ttrpc server seen through an independent raw client.

The client below is written from the wire facts (docs/ARCHITECTURE.md, "Wire facts") with ``struct`` only (it does not
use cloudadaptor.ttrpc's framing or client): 10-byte big-endian header
``>IIBB`` (length, stream id, type, flags) followed by the data.
"""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from cloudadaptor.protocols import ttrpc_pb2
from cloudadaptor.ttrpc import CallContext, Code, Server, TtrpcError

HDR = ">IIBB"
REQUEST, RESPONSE = 1, 2
LIMIT = 4 * 1024 * 1024


class RawConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: str) -> RawConn:
        return cls(*await asyncio.open_unix_connection(path))

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_frame(self, stream_id: int, data: bytes, ftype: int = REQUEST, flags: int = 0) -> None:
        await self.send_raw(struct.pack(HDR, len(data), stream_id, ftype, flags) + data)

    async def send_request(self, stream_id: int, service: str, method: str, payload: bytes = b"", **kw) -> None:
        req = ttrpc_pb2.Request(service=service, method=method, payload=payload, **kw)
        await self.send_frame(stream_id, req.SerializeToString())

    async def read_frame(self, timeout: float = 5.0) -> tuple[int, int, int, bytes]:
        header = await asyncio.wait_for(self.reader.readexactly(10), timeout)
        length, stream_id, ftype, flags = struct.unpack(HDR, header)
        assert length <= LIMIT, f"server sent a {length}-byte frame, over the 4 MiB limit"
        data = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return stream_id, ftype, flags, data

    async def read_response(self) -> tuple[int, ttrpc_pb2.Response, bytes]:
        stream_id, ftype, _flags, data = await self.read_frame()
        assert ftype == RESPONSE, f"expected a response frame, got type {ftype}"
        return stream_id, ttrpc_pb2.Response.FromString(data), data

    async def at_eof(self, timeout: float = 2.0) -> bool:
        """True when the server closed the connection (read returns b"")."""
        rest = await asyncio.wait_for(self.reader.read(), timeout)
        return rest == b""

    def close(self) -> None:
        self.writer.close()


async def echo(payload: bytes, ctx: CallContext) -> bytes:
    return b"echo:" + payload


async def huge(payload: bytes, ctx: CallContext) -> bytes:
    return b"x" * (LIMIT + 1)


async def boom(payload: bytes, ctx: CallContext) -> bytes:
    raise RuntimeError("handler exploded")


async def not_found(payload: bytes, ctx: CallContext) -> bytes:
    raise TtrpcError(Code.NOT_FOUND, "no such sandbox")


@pytest.fixture
async def server(tmp_path):
    srv = Server()
    srv.register("test.Echo", "Echo", echo)
    srv.register("test.Echo", "Huge", huge)
    srv.register("test.Echo", "Boom", boom)
    srv.register("test.Echo", "NotFound", not_found)
    path = str(tmp_path / "s.sock")
    await srv.serve_unix(path)
    srv.path = path  # type: ignore[attr-defined]
    yield srv
    await srv.close()


async def test_unary_call_is_one_response_frame_on_the_same_stream_with_payload_only(server):
    conn = await RawConn.open(server.path)
    await conn.send_request(1, "test.Echo", "Echo", b"hi")
    stream_id, ftype, flags, data = await conn.read_frame()
    assert (stream_id, ftype, flags) == (1, RESPONSE, 0)
    # Only field 2 (payload): tag 0x12, length, bytes. No status field at all.
    assert data == b"\x12\x07echo:hi"
    assert not ttrpc_pb2.Response.FromString(data).HasField("status")
    conn.close()


async def test_error_response_carries_only_status(server):
    conn = await RawConn.open(server.path)
    await conn.send_request(1, "test.Echo", "NotFound")
    _, resp, _ = await conn.read_response()
    assert resp.status.code == Code.NOT_FOUND and resp.status.message == "no such sandbox"
    assert resp.payload == b""
    conn.close()


async def test_several_requests_answered_on_their_own_stream_ids(server):
    conn = await RawConn.open(server.path)
    for sid in (1, 3, 5):
        await conn.send_request(sid, "test.Echo", "Echo", str(sid).encode())
    got = {}
    for _ in range(3):
        sid, resp, _ = await conn.read_response()
        got[sid] = resp.payload
    assert got == {1: b"echo:1", 3: b"echo:3", 5: b"echo:5"}
    conn.close()


async def test_response_and_data_frames_from_a_client_are_ignored(server):
    conn = await RawConn.open(server.path)
    await conn.send_frame(1, b"stray response", ftype=RESPONSE)
    await conn.send_frame(1, b"stray data", ftype=3)
    await conn.send_request(3, "test.Echo", "Echo", b"z")
    sid, resp, _ = await conn.read_response()
    assert (sid, resp.payload) == (3, b"echo:z"), "only the request should be answered"
    conn.close()


async def test_unknown_method_and_service_are_unimplemented_naming_them(server):
    conn = await RawConn.open(server.path)
    await conn.send_request(1, "test.Echo", "Nope")
    await conn.send_request(3, "no.Such", "Echo")
    answers = dict([(await conn.read_response())[:2] for _ in range(2)])
    assert answers[1].status.code == Code.UNIMPLEMENTED
    assert "test.Echo" in answers[1].status.message and "Nope" in answers[1].status.message
    assert answers[3].status.code == Code.UNIMPLEMENTED and "no.Such" in answers[3].status.message
    conn.close()


async def test_undecodable_envelope_is_invalid_argument(server):
    conn = await RawConn.open(server.path)
    await conn.send_frame(1, b"\xff\xff\xff\xff")  # not a protobuf message
    sid, resp, _ = await conn.read_response()
    assert sid == 1 and resp.status.code == Code.INVALID_ARGUMENT
    await conn.send_request(3, "test.Echo", "Echo", b"ok")
    assert (await conn.read_response())[1].payload == b"echo:ok"
    conn.close()


async def test_even_stream_id_is_invalid_argument(server):
    conn = await RawConn.open(server.path)
    await conn.send_request(2, "test.Echo", "Echo", b"x")
    sid, resp, _ = await conn.read_response()
    assert sid == 2 and resp.status.code == Code.INVALID_ARGUMENT
    conn.close()


async def test_request_over_4mib_is_resource_exhausted_and_connection_survives(server):
    conn = await RawConn.open(server.path)
    big = ttrpc_pb2.Request(service="test.Echo", method="Echo", payload=b"a" * (5 << 20)).SerializeToString()
    await conn.send_frame(1, big)
    sid, resp, _ = await conn.read_response()
    assert sid == 1 and resp.status.code == Code.RESOURCE_EXHAUSTED
    await conn.send_request(3, "test.Echo", "Echo", b"after")
    sid, resp, _ = await conn.read_response()
    assert (sid, resp.payload) == (3, b"echo:after")
    conn.close()


async def test_response_over_4mib_becomes_resource_exhausted(server):
    conn = await RawConn.open(server.path)
    await conn.send_request(1, "test.Echo", "Huge")
    sid, resp, _ = await conn.read_response()  # read_frame asserts no frame > 4 MiB
    assert sid == 1 and resp.status.code == Code.RESOURCE_EXHAUSTED
    await conn.send_request(3, "test.Echo", "Echo", b"still")
    assert (await conn.read_response())[1].payload == b"echo:still"
    conn.close()


async def test_handler_exception_is_unknown_logged_with_traceback_and_server_keeps_going(server, caplog):
    caplog.set_level(logging.ERROR, logger="cloudadaptor.ttrpc")
    conn = await RawConn.open(server.path)
    await conn.send_request(1, "test.Echo", "Boom")
    _, resp, _ = await conn.read_response()
    assert resp.status.code == Code.UNKNOWN and "handler exploded" in resp.status.message
    assert any(r.exc_info for r in caplog.records), "the handler's traceback should be logged"
    await conn.send_request(3, "test.Echo", "Echo", b"x")
    assert (await conn.read_response())[1].payload == b"echo:x"
    conn.close()


async def test_http_garbage_closes_only_that_connection(server, caplog):
    caplog.set_level(logging.WARNING, logger="cloudadaptor.ttrpc")
    good = await RawConn.open(server.path)
    bad = await RawConn.open(server.path)
    await bad.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await bad.at_eof(), "the server should close a connection that speaks HTTP"
    assert any("frame type" in r.getMessage() for r in caplog.records), "the reason should be logged"
    await good.send_request(1, "test.Echo", "Echo", b"fine")
    assert (await good.read_response())[1].payload == b"echo:fine"
    fresh = await RawConn.open(server.path)
    await fresh.send_request(1, "test.Echo", "Echo", b"new")
    assert (await fresh.read_response())[1].payload == b"echo:new"
    for c in (good, bad, fresh):
        c.close()


async def test_tls_client_hello_to_plain_server_closes_connection(server):
    conn = await RawConn.open(server.path)
    await conn.send_raw(_client_hello("podvm"))
    assert await conn.at_eof()
    conn.close()


async def test_header_announcing_absurd_length_closes_at_once_instead_of_discarding(server, caplog):
    """A valid type byte with ~1.2 GB announced is garbage, not an oversized message."""
    caplog.set_level(logging.WARNING, logger="cloudadaptor.ttrpc")
    conn = await RawConn.open(server.path)
    await conn.send_raw(struct.pack(HDR, 0x47455420, 1, REQUEST, 0) + b"x" * 100)
    assert await conn.at_eof(timeout=2.0), "the server should not wait to discard 1.2 GB"
    assert any("announces" in r.getMessage() for r in caplog.records)
    conn.close()


def _client_hello(server_hostname: str) -> bytes:
    import ssl

    outgoing = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def test_unknown_frame_type_closes_connection(server):
    conn = await RawConn.open(server.path)
    await conn.send_frame(1, b"", ftype=9)
    assert await conn.at_eof()
    conn.close()


async def test_connection_closed_mid_frame_is_dropped_and_server_keeps_serving(server, caplog):
    caplog.set_level(logging.WARNING, logger="cloudadaptor.ttrpc")
    conn = await RawConn.open(server.path)
    await conn.send_raw(struct.pack(HDR, 100, 1, REQUEST, 0) + b"only part")
    conn.writer.write_eof()
    assert await conn.at_eof()
    conn.close()
    other = await RawConn.open(server.path)
    await other.send_request(1, "test.Echo", "Echo", b"y")
    assert (await other.read_response())[1].payload == b"echo:y"
    other.close()
    assert any("inside a frame" in r.getMessage() for r in caplog.records)


async def test_timeout_nano_cancels_slow_handler_with_deadline_exceeded(tmp_path):
    started, cancelled = asyncio.Event(), asyncio.Event()
    seen: list[CallContext] = []

    async def slow(payload: bytes, ctx: CallContext) -> bytes:
        seen.append(ctx)
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"late"

    srv = Server()
    srv.register("t.S", "Slow", slow)
    path = str(tmp_path / "d.sock")
    await srv.serve_unix(path)
    try:
        conn = await RawConn.open(path)
        await conn.send_request(1, "t.S", "Slow", timeout_nano=200_000_000)
        sid, resp, _ = await conn.read_response()
        assert sid == 1 and resp.status.code == Code.DEADLINE_EXCEEDED
        assert cancelled.is_set(), "the handler should be cancelled when its deadline passes"
        assert seen[0].deadline is not None
        conn.close()
    finally:
        await srv.close()


async def test_metadata_reaches_handler_as_lists(tmp_path):
    seen: list[CallContext] = []

    async def record(payload: bytes, ctx: CallContext) -> bytes:
        seen.append(ctx)
        return b""

    srv = Server()
    srv.set_fallback(record)
    path = str(tmp_path / "m.sock")
    await srv.serve_unix(path)
    try:
        conn = await RawConn.open(path)
        md = [ttrpc_pb2.KeyValue(key="k", value="1"), ttrpc_pb2.KeyValue(key="k", value="2")]
        await conn.send_request(1, "any.Svc", "Any", metadata=md)
        await conn.read_response()
        assert seen[0].metadata == {"k": ["1", "2"]}
        assert (seen[0].service, seen[0].method, seen[0].deadline) == ("any.Svc", "Any", None)
        conn.close()
    finally:
        await srv.close()
