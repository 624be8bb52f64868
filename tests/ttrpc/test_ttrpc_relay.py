"""relay() and relayproto.FrameRelay: frames copied both ways, requests optionally rewritten.

Every harness test runs against both: the stream relay and the protocol relay
the forwarder uses, which share the frame handling and must behave alike.

Downstream is a raw struct client, upstream a raw struct peer that records
every frame byte for byte and answers with the request's envelope bytes as
payload, so both directions can be checked exactly.
"""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from cloudadaptor.protocols import ttrpc_pb2
from cloudadaptor.ttrpc import Code, TtrpcError, relay
from cloudadaptor.ttrpc.relayproto import FrameRelay

HDR = ">IIBB"
LIMIT = 4 << 20


def frame(stream_id: int, data: bytes, ftype: int = 1, flags: int = 0) -> bytes:
    return struct.pack(HDR, len(data), stream_id, ftype, flags) + data


async def read_raw(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, int, int, bytes]:
    length, sid, ftype, flags = struct.unpack(HDR, await asyncio.wait_for(reader.readexactly(10), timeout))
    assert length <= LIMIT, f"relay sent a {length}-byte frame"
    return sid, ftype, flags, await asyncio.wait_for(reader.readexactly(length), timeout)


class Harness:
    """front unix socket --relay--> raw upstream unix socket."""

    def __init__(self, tmp_path, rewrite=None, close_upstream_after: int | None = None, kind: str = "streams",
                 local=None, rewritten_methods=None) -> None:
        self.kind = kind
        self.local = local
        self.rewritten_methods = rewritten_methods
        self.up_path = str(tmp_path / "up.sock")
        self.down_path = str(tmp_path / "down.sock")
        self.rewrite = rewrite
        self.close_upstream_after = close_upstream_after
        self.upstream_frames: list[bytes] = []
        self.upstream_eof = asyncio.Event()
        self.reasons: list[str] = []
        self.relay_done = asyncio.Event()

    async def start(self) -> None:
        self.up = await asyncio.start_unix_server(self._upstream, self.up_path)
        if self.kind == "streams":
            self.front = await asyncio.start_unix_server(self._front, self.down_path)
        else:
            self.front = await asyncio.get_running_loop().create_unix_server(self._front_protocol, self.down_path)
            self.tasks: set[asyncio.Task[None]] = set()

    def _front_protocol(self) -> asyncio.Protocol:
        pair = FrameRelay(self.rewrite, local=self.local, rewritten_methods=self.rewritten_methods)
        task = asyncio.get_running_loop().create_task(self._run_protocols(pair))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return pair.down

    async def _run_protocols(self, pair: FrameRelay) -> None:
        await asyncio.get_running_loop().create_unix_connection(lambda: pair.up, self.up_path)
        pair.start()
        self.reasons.append(await pair.ended)
        self.relay_done.set()

    async def _front(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self.up_path)
        self.reasons.append(await relay(reader, writer, up_reader, up_writer, self.rewrite, local=self.local,
                                          rewritten_methods=self.rewritten_methods))
        self.relay_done.set()

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(10)
                length, sid, _ftype, _flags = struct.unpack(HDR, header)
                data = await reader.readexactly(length)
                self.upstream_frames.append(header + data)
                answer = ttrpc_pb2.Response(payload=data).SerializeToString()
                writer.write(frame(sid, answer, ftype=2))
                await writer.drain()
                if self.close_upstream_after and len(self.upstream_frames) >= self.close_upstream_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            self.upstream_eof.set()
        writer.close()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(self.down_path)

    async def close(self) -> None:
        self.front.close()
        self.up.close()


@pytest.fixture(params=["streams", "protocols"])
async def harness(tmp_path, request):
    created: list[Harness] = []

    async def make(**kw) -> Harness:
        h = Harness(tmp_path, kind=request.param, **kw)
        await h.start()
        created.append(h)
        return h

    yield make
    for h in created:
        await h.close()


def envelope(service: str, method: str, payload: bytes = b"") -> bytes:
    return ttrpc_pb2.Request(service=service, method=method, payload=payload).SerializeToString()


async def test_frames_pass_verbatim_both_ways_without_a_hook(harness):
    h = await harness()
    reader, writer = await h.connect()
    # Non-canonical field order (method before service) would change if re-encoded.
    odd_order = b"\x12\x01M" + b"\x0a\x03s.S" + b"\x1a\x02hi"
    sent = frame(1, odd_order, flags=0)
    writer.write(sent)
    sid, ftype, _, data = await read_raw(reader)
    assert h.upstream_frames == [sent]
    assert (sid, ftype) == (1, 2)
    assert ttrpc_pb2.Response.FromString(data).payload == odd_order
    writer.close()


async def test_rewrite_hook_changes_only_requests_it_reports_changed(harness):
    calls: list[str] = []

    def hook(req: ttrpc_pb2.Request) -> bool:
        calls.append(req.method)
        if req.method == "Edit":
            req.payload = b"edited"
            return True
        req.payload = b"ignored because the hook says nothing changed"
        return False

    h = await harness(rewrite=hook)
    reader, writer = await h.connect()
    untouched = b"\x12\x04Keep" + b"\x0a\x03s.S"  # non-canonical order survives only if not re-encoded
    writer.write(frame(1, untouched) + frame(3, envelope("s.S", "Edit", b"orig")))
    await read_raw(reader)
    await read_raw(reader)
    assert calls == ["Keep", "Edit"]
    assert h.upstream_frames[0] == frame(1, untouched)
    edited = ttrpc_pb2.Request.FromString(h.upstream_frames[1][10:])
    assert (edited.method, edited.payload) == ("Edit", b"edited")
    writer.close()


async def test_with_rewritten_methods_the_hook_sees_only_those(harness):
    calls: list[str] = []

    def hook(req: ttrpc_pb2.Request) -> bool:
        calls.append(req.method)
        req.payload = b"edited"
        return True

    h = await harness(rewrite=hook, rewritten_methods={"Edit"})
    reader, writer = await h.connect()
    keep = b"\x12\x04Keep" + b"\x0a\x03s.S"  # non-canonical order survives only if not re-encoded
    mentions = envelope("s.S", "Look", b"Edit")  # names a listed method in its payload only
    edit = frame(5, envelope("s.S", "Edit", b"orig"))
    writer.write(frame(1, keep) + frame(3, mentions))
    writer.write(edit[:7])  # a listed request cut across two chunks is still seen
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(edit[7:])
    for _ in range(3):
        await read_raw(reader)
    assert calls == ["Edit"]
    assert h.upstream_frames[:2] == [frame(1, keep), frame(3, mentions)]
    assert ttrpc_pb2.Request.FromString(h.upstream_frames[2][10:]).payload == b"edited"
    writer.close()


async def test_undecodable_envelope_is_forwarded_untouched(harness):
    seen: list[ttrpc_pb2.Request] = []
    h = await harness(rewrite=lambda req: seen.append(req) or False)
    reader, writer = await h.connect()
    garbage_envelope = b"\xff\xff\xff"
    writer.write(frame(1, garbage_envelope))
    await read_raw(reader)
    assert h.upstream_frames == [frame(1, garbage_envelope)]
    assert seen == [], "the hook only sees decodable envelopes"
    writer.close()


async def test_rewrite_over_4mib_is_answered_resource_exhausted_not_forwarded(harness):
    def inflate(req: ttrpc_pb2.Request) -> bool:
        if req.method == "Inflate":
            req.payload = b"z" * (LIMIT + 10)
            return True
        return False

    h = await harness(rewrite=inflate)
    reader, writer = await h.connect()
    writer.write(frame(1, envelope("s.S", "Inflate", b"small")))
    sid, _, _, data = await read_raw(reader)
    assert sid == 1 and ttrpc_pb2.Response.FromString(data).status.code == Code.RESOURCE_EXHAUSTED
    assert h.upstream_frames == []
    writer.write(frame(3, envelope("s.S", "Normal")))
    assert (await read_raw(reader))[0] == 3, "the relay keeps working after refusing one call"
    writer.close()


async def test_hook_raising_ttrpc_error_answers_that_status(harness):
    def refuse(req: ttrpc_pb2.Request) -> bool:
        raise TtrpcError(Code.INVALID_ARGUMENT, "cannot rewrite")

    h = await harness(rewrite=refuse)
    reader, writer = await h.connect()
    writer.write(frame(1, envelope("s.S", "X")))
    sid, _, _, data = await read_raw(reader)
    status = ttrpc_pb2.Response.FromString(data).status
    assert (sid, status.code, status.message) == (1, Code.INVALID_ARGUMENT, "cannot rewrite")
    assert h.upstream_frames == []
    writer.close()


async def test_local_methods_are_answered_by_the_relay_never_forwarded(harness):
    def echo(payload: bytes) -> bytes:
        return b"here:" + payload

    def refuse(payload: bytes) -> bytes:
        raise TtrpcError(Code.INVALID_ARGUMENT, "refused here")

    def broken(payload: bytes) -> bytes:
        raise KeyError("secret-detail")

    local = {("l.L", "Echo"): echo, ("l.L", "Refuse"): refuse, ("l.L", "Broken"): broken}
    h = await harness(local=local)  # no rewrite hook: local methods alone make the relay decode requests
    reader, writer = await h.connect()
    writer.write(frame(1, envelope("l.L", "Echo", b"x")) + frame(3, envelope("l.L", "Refuse"))
                 + frame(5, envelope("l.L", "Broken")) + frame(7, envelope("l.L", "Other", b"y")))
    answers = {}
    for _ in range(4):
        sid, ftype, _, data = await read_raw(reader)
        answers[sid] = (ftype, ttrpc_pb2.Response.FromString(data))
    assert answers[1][0] == 2 and answers[1][1].payload == b"here:x" and answers[1][1].status.code == 0
    assert (answers[3][1].status.code, answers[3][1].status.message) == (Code.INVALID_ARGUMENT, "refused here")
    assert answers[5][1].status.code == Code.INTERNAL and "secret-detail" not in answers[5][1].status.message
    assert answers[7][1].payload == envelope("l.L", "Other", b"y"), "other methods reach upstream"
    assert h.upstream_frames == [frame(7, envelope("l.L", "Other", b"y"))]
    writer.close()


async def test_oversized_request_from_downstream_answered_resource_exhausted(harness):
    h = await harness()
    reader, writer = await h.connect()
    writer.write(frame(5, b"a" * (5 << 20)))
    sid, _, _, data = await read_raw(reader)
    assert sid == 5 and ttrpc_pb2.Response.FromString(data).status.code == Code.RESOURCE_EXHAUSTED
    assert h.upstream_frames == []
    writer.write(frame(7, envelope("s.S", "After")))
    assert (await read_raw(reader))[0] == 7
    writer.close()


async def test_garbage_from_downstream_closes_both_sides(harness, caplog):
    caplog.set_level(logging.WARNING, logger="cloudadaptor.ttrpc")
    h = await harness()
    reader, writer = await h.connect()
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await asyncio.wait_for(h.upstream_eof.wait(), 5)
    await asyncio.wait_for(h.relay_done.wait(), 5)
    assert "unparseable framing from downstream" in h.reasons[0]
    assert any("unparseable" in r.getMessage() for r in caplog.records)
    writer.close()


async def test_upstream_closing_closes_downstream_and_leaves_no_tasks(harness):
    h = await harness(close_upstream_after=1)
    reader, writer = await h.connect()
    writer.write(frame(1, envelope("s.S", "Last")))
    await read_raw(reader)
    assert await asyncio.wait_for(reader.read(), 5) == b"", "downstream should be closed after upstream went away"
    await asyncio.wait_for(h.relay_done.wait(), 5)
    assert h.reasons == ["upstream closed the connection"]
    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("ttrpc-relay")]
    assert leftovers == []
    writer.close()


async def test_downstream_closing_closes_upstream(harness):
    h = await harness()
    _reader, writer = await h.connect()
    writer.write(frame(1, envelope("s.S", "Bye")))
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    await asyncio.wait_for(h.upstream_eof.wait(), 5)
    await asyncio.wait_for(h.relay_done.wait(), 5)
    assert h.reasons == ["downstream closed the connection"]


async def test_cancelling_relay_closes_both_sides(tmp_path):
    up_eof = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        up_eof.set()
        writer.close()

    up = await asyncio.start_unix_server(sink, str(tmp_path / "u.sock"))
    relays: list[asyncio.Task[str]] = []

    async def front(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_unix_connection(str(tmp_path / "u.sock"))
        relays.append(asyncio.current_task())  # type: ignore[arg-type]
        await relay(reader, writer, ur, uw)

    down = await asyncio.start_unix_server(front, str(tmp_path / "d.sock"))
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "d.sock"))
    while not relays:
        await asyncio.sleep(0.01)
    relays[0].cancel()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await asyncio.wait_for(up_eof.wait(), 5)
    writer.close()
    down.close()
    up.close()
