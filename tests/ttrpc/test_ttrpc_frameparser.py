"""FrameParser: the relay's chunked frame cutter agrees with read_frame, however the bytes arrive."""

from __future__ import annotations

import struct

import pytest

from cloudadaptor.ttrpc.framing import MAX_MESSAGE_LENGTH, FrameError, FrameParser, OversizedFrame, whole_frames

HDR = ">IIBB"


def frame(stream_id: int, data: bytes, ftype: int = 1, flags: int = 0) -> bytes:
    return struct.pack(HDR, len(data), stream_id, ftype, flags) + data


def feed_in_pieces(stream: bytes, size: int, max_length: int = MAX_MESSAGE_LENGTH) -> list:
    parser = FrameParser(max_length)
    out = []
    for i in range(0, len(stream), size):
        out += parser.feed(stream[i:i + size])
    parser.end()
    return out


@pytest.mark.parametrize("size", [1, 3, 10, 11, 64, 1 << 20])
def test_frames_come_out_whole_and_in_order_whatever_the_chunk_size(size):
    frames = [frame(1, b"a" * 5), frame(3, b"", ftype=2, flags=4), frame(5, bytes(range(256)) * 40, ftype=3)]
    out = feed_in_pieces(b"".join(frames), size)
    assert [header + data for header, data in out] == frames, f"chunks of {size} bytes"


@pytest.mark.parametrize("size", [1, 7, 100, 1 << 20])
def test_an_oversized_frame_is_skipped_and_reported_once_its_data_is_gone(size):
    stream = frame(1, b"x" * 20) + frame(3, b"y" * 300) + frame(5, b"z")
    out = feed_in_pieces(stream, size, max_length=100)
    assert out[0] == (stream[:10], b"x" * 20)
    assert isinstance(out[1], OversizedFrame) and (out[1].stream_id, out[1].length) == (3, 300)
    assert out[2] == (frame(5, b"z")[:10], b"z"), "the frame after the oversized one is intact"
    assert len(out) == 3


def test_an_unknown_frame_type_is_refused_at_once():
    with pytest.raises(FrameError, match="unknown frame type 0x16"):
        FrameParser().feed(b"\x00\x00\x01\x00\x00\x00\x00\x01\x16\x00")


def test_an_absurd_length_is_refused_not_skipped():
    tls_hello_like = struct.pack(HDR, 369 << 20, 1, 1, 0)
    with pytest.raises(FrameError, match="not a ttrpc peer"):
        FrameParser().feed(tls_hello_like)


@pytest.mark.parametrize(("stream", "message"), [
    (frame(1, b"abc")[:6], r"inside a frame header \(6 of 10 bytes\)"),
    (frame(7, b"abcdef")[:13], r"inside a frame on stream 7 \(3 of 6 bytes\)"),
    (frame(9, b"q" * 300)[:50], r"inside an oversized frame \(300 bytes announced\)"),
])
def test_the_stream_ending_inside_a_frame_is_an_error(stream, message):
    parser = FrameParser(max_length=100)
    parser.feed(stream)
    with pytest.raises(FrameError, match=message):
        parser.end()


def test_a_clean_end_between_frames_is_fine():
    parser = FrameParser()
    assert len(parser.feed(frame(1, b"done"))) == 1
    parser.end()


def test_whole_frames_says_which_chunks_the_relay_may_forward_as_they_came():
    request, response = frame(1, b"\x12\x05Check"), frame(1, b"CreateContainer", ftype=2)
    watched = (b"CreateContainer",)
    assert whole_frames(request + response + frame(3, b"", ftype=3), 100, watched)
    assert whole_frames(b"", 100, watched)
    assert not whole_frames(frame(3, b"\x12\x0fCreateContainer"), 100, watched), "a watched request needs a look"
    assert not whole_frames(request[:-1], 100, watched), "a frame cut short"
    assert not whole_frames(request + response[:4], 100, watched), "a header cut short"
    assert not whole_frames(frame(1, b"x" * 101), 100, watched), "over the limit"
    assert not whole_frames(frame(1, b"x", ftype=9), 100, watched), "an unknown type"
