"""Our ttrpc client, against our server and against a raw frame recorder."""

from __future__ import annotations

import asyncio
import os
import stat
import struct

import pytest

from cloudadaptor.protocols import health_pb2, ttrpc_pb2
from cloudadaptor.ttrpc import CallContext, Client, Code, ConnectionClosed, Server, TtrpcError, unary

HDR = ">IIBB"


class Recorder:
    """A raw unix ttrpc peer (struct only) that records request frames and echoes payloads."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, int, int, ttrpc_pb2.Request]] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self, path: str) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length, sid, ftype, flags = struct.unpack(HDR, await reader.readexactly(10))
                req = ttrpc_pb2.Request.FromString(await reader.readexactly(length))
                self.frames.append((sid, ftype, flags, req))
                data = ttrpc_pb2.Response(payload=req.payload).SerializeToString()
                writer.write(struct.pack(HDR, len(data), sid, 2, 0) + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def recorder(tmp_path):
    rec = Recorder()
    path = str(tmp_path / "rec.sock")
    await rec.start(path)
    rec.path = path  # type: ignore[attr-defined]
    yield rec
    await rec.close()


async def test_client_uses_odd_increasing_stream_ids_and_sends_timeout_only_when_given(recorder):
    async with await Client.connect_unix(recorder.path) as client:
        assert await client.call("s.S", "A", b"1") == b"1"
        assert await client.call("s.S", "B", b"2", timeout=5) == b"2"
        assert await client.call("s.S", "C", b"3", metadata={"k": ["x", "y"], "j": "z"}) == b"3"
    sids = [f[0] for f in recorder.frames]
    assert sids == [1, 3, 5]
    assert all(f[1] == 1 and f[2] == 0 for f in recorder.frames), "request frames, no flags"
    reqs = [f[3] for f in recorder.frames]
    assert reqs[0].timeout_nano == 0, "no deadline: timeout_nano must not be sent"
    assert 0 < reqs[1].timeout_nano <= 5_000_000_000
    assert [(kv.key, kv.value) for kv in reqs[2].metadata] == [("k", "x"), ("k", "y"), ("j", "z")]


async def test_many_concurrent_calls_reach_the_wire_with_increasing_stream_ids(recorder):
    async with await Client.connect_unix(recorder.path) as client:
        payloads = [str(i).encode() * 5000 for i in range(40)]
        results = await asyncio.wait_for(asyncio.gather(*(client.call("s.S", "M", p) for p in payloads)), 10)
    assert results == payloads
    sids = [f[0] for f in recorder.frames]
    assert sids == list(range(1, 80, 2)), "stream ids must be odd and strictly increasing on the wire"


async def test_client_refuses_request_over_4mib_without_sending(recorder):
    async with await Client.connect_unix(recorder.path) as client:
        with pytest.raises(TtrpcError) as err:
            await client.call("s.S", "Big", b"a" * (5 << 20))
        assert err.value.code == Code.RESOURCE_EXHAUSTED
        assert await client.call("s.S", "Small", b"ok") == b"ok"
    assert [f[3].method for f in recorder.frames] == ["Small"], "the oversized request must not be sent"


@pytest.fixture
async def served(tmp_path):
    srv = Server()
    path = str(tmp_path / "srv.sock")
    srv.path = path  # type: ignore[attr-defined]
    yield srv
    await srv.close()


async def test_concurrent_calls_on_one_connection_complete_out_of_order(served):
    second_arrived = asyncio.Event()
    finished: list[str] = []

    async def handler(payload: bytes, ctx: CallContext) -> bytes:
        if payload == b"first":
            await second_arrived.wait()  # a client that serialized calls would deadlock here
        else:
            second_arrived.set()
        finished.append(payload.decode())
        return payload.upper()

    served.register("t.S", "M", handler)
    await served.serve_unix(served.path)
    async with await Client.connect_unix(served.path) as client:
        first = asyncio.create_task(client.call("t.S", "M", b"first"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(client.call("t.S", "M", b"second"))
        results = await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert results == [b"FIRST", b"SECOND"]
    assert finished == ["second", "first"], "responses should be able to arrive out of order"


async def test_slow_handler_with_deadline_gives_deadline_exceeded(served):
    async def slow(payload: bytes, ctx: CallContext) -> bytes:
        assert ctx.deadline is not None
        await asyncio.sleep(30)
        return b""

    served.register("t.S", "Slow", slow)
    await served.serve_unix(served.path)
    async with await Client.connect_unix(served.path) as client:
        with pytest.raises(TtrpcError) as err:
            await asyncio.wait_for(client.call("t.S", "Slow", b"", timeout=0.2), 5)
        assert err.value.code == Code.DEADLINE_EXCEEDED
        with pytest.raises(TtrpcError) as unimpl:
            await client.call("t.S", "Other", b"")  # the connection is still usable
        assert unimpl.value.code == Code.UNIMPLEMENTED


async def test_client_enforces_its_deadline_even_if_the_server_ignores_it(tmp_path):
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            writer.close()

    path = str(tmp_path / "mute.sock")
    mute = await asyncio.start_unix_server(never_answer, path)
    try:
        async with await Client.connect_unix(path) as client:
            with pytest.raises(TtrpcError) as err:
                await asyncio.wait_for(client.call("t.S", "M", b"", timeout=0.1), 5)
            assert err.value.code == Code.DEADLINE_EXCEEDED
    finally:
        mute.close()


async def test_connection_loss_fails_pending_calls_with_connection_closed(served):
    entered = asyncio.Event()

    async def hang(payload: bytes, ctx: CallContext) -> bytes:
        entered.set()
        await asyncio.sleep(30)
        return b""

    served.register("t.S", "Hang", hang)
    await served.serve_unix(served.path)
    client = await Client.connect_unix(served.path)
    pending = [asyncio.create_task(client.call("t.S", "Hang", b"")) for _ in range(3)]
    await asyncio.wait_for(entered.wait(), 5)
    await served.close()
    for task in pending:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(task, 5)
    with pytest.raises(ConnectionClosed):
        await client.call("t.S", "Hang", b"")
    await client.close()


async def test_close_fails_pending_calls(served):
    async def hang(payload: bytes, ctx: CallContext) -> bytes:
        await asyncio.sleep(30)
        return b""

    served.register("t.S", "Hang", hang)
    await served.serve_unix(served.path)
    client = await Client.connect_unix(served.path)
    pending = asyncio.create_task(client.call("t.S", "Hang", b""))
    await asyncio.sleep(0.05)
    await client.close()
    await client.close()  # idempotent
    with pytest.raises(ConnectionClosed):
        await pending


async def test_error_status_and_call_message(served):
    async def check(req: health_pb2.CheckRequest, ctx: CallContext) -> health_pb2.HealthCheckResponse:
        if req.service == "bad":
            raise TtrpcError(Code.FAILED_PRECONDITION, "bad service")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    served.register("grpc.Health", "Check", unary(health_pb2.CheckRequest, check))
    await served.serve_unix(served.path)
    async with await Client.connect_unix(served.path) as client:
        resp = await client.call_message(
            "grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(TtrpcError) as err:
            await client.call_message(
                "grpc.Health", "Check", health_pb2.CheckRequest(service="bad"), health_pb2.HealthCheckResponse
            )
        assert (err.value.code, err.value.message) == (Code.FAILED_PRECONDITION, "bad service")
        with pytest.raises(TtrpcError) as bad:
            await client.call("grpc.Health", "Check", b"\xff\xff")  # undecodable request message
        assert bad.value.code == Code.INVALID_ARGUMENT


async def test_serve_unix_creates_parent_dirs_mode_0600_and_close_removes_socket(tmp_path):
    path = tmp_path / "run" / "peerpod" / "pods" / "abc" / "agent.ttrpc"
    srv = Server()
    await srv.serve_unix(str(path))
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    await srv.close()
    assert not path.exists(), "close() should remove the socket file it created"
    await srv.close()  # idempotent


async def test_serve_unix_with_custom_mode_replaces_a_stale_socket(tmp_path):
    path = str(tmp_path / "stale.sock")
    first = Server()
    await first.serve_unix(path)
    for listener in first._listeners:  # simulate a crashed process: socket file left behind
        listener.close()
    first._socket_files.clear()
    assert os.path.exists(path)
    second = Server()
    second.register("t.S", "M", lambda p, c: _value(b"alive"))
    await second.serve_unix(path, mode=0o660)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    async with await Client.connect_unix(path) as client:
        assert await client.call("t.S", "M", b"") == b"alive"
    await second.close()
    await first.close()


async def test_serve_unix_refuses_a_socket_someone_serves_and_a_regular_file(tmp_path):
    path = str(tmp_path / "live.sock")
    live = Server()
    await live.serve_unix(path)
    with pytest.raises(OSError):
        await Server().serve_unix(path)
    await live.close()
    regular = tmp_path / "file.sock"
    regular.write_text("not a socket")
    with pytest.raises(FileExistsError):
        await Server().serve_unix(str(regular))
    assert regular.read_text() == "not a socket"


async def _value(data: bytes) -> bytes:
    return data
