"""The error the lifecycle (and its helpers) raise for the shim."""

from __future__ import annotations

from cloudadaptor.ttrpc.errors import Code


class LifecycleError(Exception):
    """A lifecycle call failed; ``code`` is the gRPC status for the shim."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
