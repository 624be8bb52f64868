"""ttrpc frames: a 10-byte big-endian header followed by ``length`` bytes.

Header layout (containerd/ttrpc): ``uint32 length, uint32 stream_id,
uint8 type, uint8 flags``. ``length`` counts the data only.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">IIBB")
HEADER_LENGTH = HEADER.size  # 10
MAX_MESSAGE_LENGTH = 4 << 20  # 4 MiB, containerd's messageLengthMax


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


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
        if len(self.data) > MAX_MESSAGE_LENGTH:
            raise ValueError(
                f"refusing to send {len(self.data)} bytes: ttrpc frames are "
                f"limited to {MAX_MESSAGE_LENGTH} bytes"
            )
        return HEADER.pack(len(self.data), self.stream_id, self.type, self.flags) + self.data


async def read_frame(reader: asyncio.StreamReader, max_length: int = MAX_MESSAGE_LENGTH) -> Frame | None:
    """Read one frame; ``None`` on a clean end of stream between frames.

    Raises ``FrameError`` when the stream ends inside a frame, and
    ``OversizedFrame`` (after discarding the data) for a frame over the limit.
    """
    try:
        header = await reader.readexactly(HEADER_LENGTH)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError(f"connection closed inside a frame header ({len(exc.partial)} of {HEADER_LENGTH} bytes)") from None
    length, stream_id, frame_type, flags = HEADER.unpack(header)
    if length > max_length:
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


async def _discard(reader: asyncio.StreamReader, length: int) -> None:
    remaining = length
    while remaining:
        chunk = await reader.read(min(remaining, 1 << 16))
        if not chunk:
            raise FrameError(f"connection closed inside an oversized frame ({length} bytes announced)")
        remaining -= len(chunk)
