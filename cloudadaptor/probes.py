"""The HTTP endpoint on PROBE_ADDRESS:PROBE_PORT: /metrics, /healthz, /startup.

Served by the worker daemon and by the peerpod-controller, each with its own registry.

- ``/metrics``: the process's registry in Prometheus text format.
- ``/healthz``: 200 when the daemon's event loop answers (this handler runs on
  it, so an answer is the proof); the liveness probe.
- ``/startup``: 200 once the hypervisor socket is served and every sandbox
  running on this node at start-up has been re-served (the Go adaptor's
  meaning); 503 before. The startup probe.

Served by aiohttp on the daemon's loop; binding fails at start with one line
(port in use, address not on this host), so a misconfiguration never leaves a
daemon without probes.
"""

from __future__ import annotations

import errno
import logging
from typing import Callable, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST


log = logging.getLogger(__name__)


class Exposition(Protocol):
    def exposition(self) -> bytes: ...


class ProbeBindError(Exception):
    """The endpoint cannot listen; the message is one line naming the address and the cause."""


class ProbeServer:
    """``start()`` listens (or raises ``ProbeBindError``); ``close()`` stops. ``started`` answers /startup."""

    def __init__(self, address: str, port: int, metrics: Exposition, started: Callable[[], bool]) -> None:
        self.address = address
        self.port = port
        self._metrics = metrics
        self._started = started
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._get_metrics)
        app.router.add_get("/healthz", self._get_healthz)
        app.router.add_get("/startup", self._get_startup)
        return app

    async def _get_metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _get_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _get_startup(self, request: web.Request) -> web.Response:
        if self._started():
            return web.Response(text="started\n")
        return web.Response(status=503, text="starting: hypervisor socket not served or sandboxes not re-served yet\n")

    async def start(self) -> int:
        """Listen; returns the bound port. Raises ``ProbeBindError`` (one line) when it cannot."""
        runner = web.AppRunner(self._app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.address, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            cause = "port already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise ProbeBindError(
                f"PROBE_ADDRESS:PROBE_PORT {self.address}:{self.port}: cannot listen: {cause}"
            ) from None
        self._runner = runner
        log.info("probe endpoint listening on http://%s:%d (/metrics, /healthz, /startup)", self.address, self.port)
        return self.port

    async def close(self) -> None:
        """Stop serving. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
