"""The error the lifecycle (and its helpers) raise for the shim."""

from __future__ import annotations

import asyncio

from cloudadaptor.ttrpc.errors import Code


class LifecycleError(Exception):
    """A lifecycle call failed; ``code`` is the gRPC status for the shim."""

    def __init__(self, code: Code, message: str, console: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.console = console  # the VM's last console lines when the agent never answered (not for the shim)


def reason_of(exc: BaseException) -> str:
    """One line saying why a lifecycle step failed (for the record and the shim)."""
    if isinstance(exc, LifecycleError):
        return exc.message
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled (the caller gave up or StopVM was called)"
    return f"{type(exc).__name__}: {exc}"
