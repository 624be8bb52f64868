"""How a provider's SDK hooks report cloud API calls, without knowing who counts them.

Providers install the SDK's own hooks (botocore events, an azure-core pipeline
policy) that report to a ``CloudCalls`` sink; the daemon points the sink at its
metrics (``cloudadaptor.metrics.Metrics`` is a ``CloudCallRecorder``). Without
a recorder the sink drops everything, so tools and tests need no metrics.

Outcomes are classes, not raw error codes, so the label set stays small.
"""

from __future__ import annotations

from typing import Protocol

# The outcome classes a cloud API call is counted under.
OUTCOMES = ("ok", "throttled", "auth", "not_found", "client_error", "server_error", "connection_error")


class CloudCallRecorder(Protocol):
    def cloud_call(self, provider: str, operation: str, outcome: str, retries: int = 0) -> None:
        """One API call finished with ``outcome`` (one of ``OUTCOMES``) after ``retries`` SDK retries."""
        ...

    def cloud_throttled(self, provider: str, operation: str) -> None:
        """One attempt of ``operation`` was refused as throttled (retried or not)."""
        ...


class CloudCalls:
    """A provider's reporting point; ``recorder`` is set by whoever counts (the daemon)."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.recorder: CloudCallRecorder | None = None

    def call(self, operation: str, outcome: str, retries: int = 0) -> None:
        if self.recorder is not None:
            self.recorder.cloud_call(self.provider, operation, outcome, retries)

    def throttled(self, operation: str) -> None:
        if self.recorder is not None:
            self.recorder.cloud_throttled(self.provider, operation)


def outcome_of_status(status: int | None, *, throttled: bool = False, auth: bool = False) -> str:
    """The outcome class of an HTTP status (None: no response at all)."""
    if status is None:
        return "connection_error"
    if status < 300:
        return "ok"
    if throttled or status == 429:
        return "throttled"
    if auth or status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    return "server_error" if status >= 500 else "client_error"
