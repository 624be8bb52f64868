"""gRPC status codes as ttrpc carries them, and the error type for calls."""

from __future__ import annotations

import enum

from cloudadaptor.protocols import ttrpc_pb2


class Code(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(Exception):
    """A call ended with a non-OK status (raised by handlers, seen by clients)."""

    def __init__(self, code: Code | int, message: str) -> None:
        try:
            code = Code(code)
        except ValueError:
            pass
        super().__init__(f"{getattr(code, 'name', code)}: {message}")
        self.code = code
        self.message = message


class ConnectionClosed(Exception):
    """The connection ended before the call got its response (or was already closed)."""


def error_response(code: Code | int, message: str) -> bytes:
    """A serialized ttrpc ``Response`` carrying only ``status`` (no payload), as containerd sends."""
    response = ttrpc_pb2.Response()
    response.status.code = int(code)
    response.status.message = message
    return response.SerializeToString()


def success_response(payload: bytes) -> bytes:
    """A serialized ttrpc ``Response`` carrying only ``payload`` (status unset), as containerd sends."""
    return ttrpc_pb2.Response(payload=payload).SerializeToString()
