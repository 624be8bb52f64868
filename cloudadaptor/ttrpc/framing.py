"""ttrpc frames: a 10-byte big-endian header followed by ``length`` bytes.

Header layout (containerd/ttrpc): ``uint32 length, uint32 stream_id,
uint8 type, uint8 flags``. ``length`` counts the data only and may not exceed
``MAX_MESSAGE_LENGTH``. There is no preface or handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">IIBB")
HEADER_LENGTH = HEADER.size  # 10
MAX_MESSAGE_LENGTH = 4 << 20  # 4 MiB, containerd's messageLengthMax
# An announced length beyond this is garbage, not an oversized message: a TLS
# ClientHello reads as ~369 MB, any ASCII text as >= 512 MB. Discarding that
# much would hang the connection, so it is a FrameError instead.
MAX_DISCARD_LENGTH = 64 << 20
_DISCARD_CHUNK = 1 << 16


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


KNOWN_FRAME_TYPES = frozenset(int(t) for t in FrameType)


class Flags(enum.IntFlag):
    REMOTE_CLOSED = 1
    REMOTE_OPEN = 2
    NO_DATA = 4


class FrameError(Exception):
    """The byte stream cannot be read as ttrpc frames; the connection is unusable."""


class OversizedFrame(Exception):
    """A well-formed header announced more than ``MAX_MESSAGE_LENGTH`` bytes.

    The data was read and discarded so the connection stays in sync; the
    receiver answers RESOURCE_EXHAUSTED on ``stream_id``.
    """

    def __init__(self, stream_id: int, frame_type: int, length: int) -> None:
        super().__init__(
            f"frame of {length} bytes on stream {stream_id} exceeds the "
            f"{MAX_MESSAGE_LENGTH}-byte limit"
        )
        self.stream_id = stream_id
        self.frame_type = frame_type
        self.length = length


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    data: bytes

    def encode(self) -> bytes:
        """Header + data. Raises ``ValueError`` rather than build a frame over the limit."""
        if len(self.data) > MAX_MESSAGE_LENGTH:
            raise ValueError(
                f"refusing to send {len(self.data)} bytes: ttrpc frames are "
                f"limited to {MAX_MESSAGE_LENGTH} bytes"
            )
        return HEADER.pack(len(self.data), self.stream_id, self.type, self.flags) + self.data


async def read_frame(reader: asyncio.StreamReader, max_length: int = MAX_MESSAGE_LENGTH) -> Frame | None:
    """Read one frame; ``None`` on a clean end of stream between frames.

    Blocks until a whole frame (or the end of the stream) arrived. Raises
    ``FrameError`` for an unknown frame type or an absurd length (over
    ``MAX_DISCARD_LENGTH``; both checked before anything else is read, so
    garbage such as an HTTP request line or a TLS ClientHello is refused at
    once) or when the stream ends inside a frame, and ``OversizedFrame``
    (after reading and discarding the data) for a frame over ``max_length``. Transport errors
    (``OSError``, including ``ssl.SSLError``) propagate unchanged.
    """
    try:
        header = await reader.readexactly(HEADER_LENGTH)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError(
            f"connection closed inside a frame header ({len(exc.partial)} of {HEADER_LENGTH} bytes)"
        ) from None
    length, stream_id, frame_type, flags = HEADER.unpack(header)
    if frame_type not in KNOWN_FRAME_TYPES:
        raise FrameError(f"unknown frame type {frame_type:#04x} (header {header!r}); not a ttrpc peer?")
    if length > max_length:
        if length > MAX_DISCARD_LENGTH:
            raise FrameError(
                f"frame header announces {length} bytes on stream {stream_id} (header {header!r}); "
                "not a ttrpc peer?"
            )
        await _discard(reader, length)
        raise OversizedFrame(stream_id, frame_type, length)
    try:
        data = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise FrameError(
            f"connection closed inside a frame on stream {stream_id} "
            f"({len(exc.partial)} of {length} bytes)"
        ) from None
    return Frame(stream_id, frame_type, flags, data)


class FrameParser:
    """Frames out of a byte stream fed in chunks, without awaiting per frame (the relay's fast path).

    ``feed(data)`` returns, in order, ``(header, data)`` pairs of complete frames
    (``header`` being the raw 10 bytes, so a frame can be forwarded without being
    re-encoded) and ``OversizedFrame`` values for frames over ``max_length``
    once their data has been skipped. Raises ``FrameError`` as ``read_frame``
    does for an unknown type or an absurd length; ``end()`` raises it when
    the stream stopped inside a frame.
    """

    def __init__(self, max_length: int = MAX_MESSAGE_LENGTH) -> None:
        self.max_length = max_length
        self._buffer = bytearray()
        self._skip = 0  # data of an oversized frame still to drop
        self._oversized: OversizedFrame | None = None

    def feed(self, data: bytes) -> list[tuple[bytes, bytes] | OversizedFrame]:
        out: list[tuple[bytes, bytes] | OversizedFrame] = []
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
            if self._skip:
                return out
            assert self._oversized is not None
            out.append(self._oversized)
            self._oversized = None
        buffer = self._buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= HEADER_LENGTH:
            length, stream_id, frame_type, _ = HEADER.unpack_from(buffer, offset)
            header = bytes(buffer[offset:offset + HEADER_LENGTH])
            if frame_type not in KNOWN_FRAME_TYPES:
                raise FrameError(f"unknown frame type {frame_type:#04x} (header {header!r}); not a ttrpc peer?")
            if length > self.max_length:
                if length > MAX_DISCARD_LENGTH:
                    raise FrameError(f"frame header announces {length} bytes on stream {stream_id} "
                                     f"(header {header!r}); not a ttrpc peer?")
                available = len(buffer) - offset - HEADER_LENGTH
                if available < length:
                    self._skip, self._oversized = length - available, OversizedFrame(stream_id, frame_type, length)
                    del buffer[:]
                    return out
                out.append(OversizedFrame(stream_id, frame_type, length))
                offset += HEADER_LENGTH + length
                continue
            end = offset + HEADER_LENGTH + length
            if end > len(buffer):
                break
            out.append((header, bytes(buffer[offset + HEADER_LENGTH:end])))
            offset = end
        del buffer[:offset]
        return out

    def pending(self) -> bool:
        """Part of a frame is buffered or being skipped: the next chunk does not start a frame."""
        return bool(self._buffer or self._skip)

    def end(self) -> None:
        """The stream ended: ``FrameError`` when it ended inside a frame."""
        if self._skip:
            assert self._oversized is not None
            raise FrameError(f"connection closed inside an oversized frame ({self._oversized.length} bytes announced)")
        if not self._buffer:
            return
        if len(self._buffer) < HEADER_LENGTH:
            raise FrameError(f"connection closed inside a frame header ({len(self._buffer)} of {HEADER_LENGTH} bytes)")
        length, stream_id, _, _ = HEADER.unpack_from(self._buffer)
        raise FrameError(f"connection closed inside a frame on stream {stream_id} "
                         f"({len(self._buffer) - HEADER_LENGTH} of {length} bytes)")


def whole_frames(data: bytes, max_length: int, watched: tuple[bytes, ...]) -> bool:
    """``data`` is whole frames of known types within ``max_length``, and no request among them
    contains a ``watched`` byte string (the relay's fast path: such a chunk is forwarded as is)."""
    offset, size = 0, len(data)
    while offset < size:
        if size - offset < HEADER_LENGTH:
            return False
        length, _, frame_type, _ = HEADER.unpack_from(data, offset)
        start = offset + HEADER_LENGTH
        offset = start + length
        if offset > size or length > max_length or frame_type not in KNOWN_FRAME_TYPES:
            return False
        if frame_type == FrameType.REQUEST:
            for name in watched:
                if data.find(name, start, offset) >= 0:
                    return False
    return True


async def _discard(reader: asyncio.StreamReader, length: int) -> None:
    remaining = length
    while remaining:
        chunk = await reader.read(min(remaining, _DISCARD_CHUNK))
        if not chunk:
            raise FrameError(f"connection closed inside an oversized frame ({length} bytes announced)")
        remaining -= len(chunk)


async def close_writer(writer: asyncio.StreamWriter, timeout: float = 1.0) -> None:
    """Close a stream and wait (bounded) for it to go away; never raises.

    Idempotent. When the peer does not finish a TLS shutdown within
    ``timeout`` seconds the transport is aborted so nothing lingers.
    """
    with contextlib.suppress(Exception):
        writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    except Exception:  # noqa: BLE001 - closing is best effort by contract
        with contextlib.suppress(Exception):
            writer.transport.abort()
