"""The HTTP endpoint on PROBE_ADDRESS:PROBE_PORT: /metrics, /healthz, /startup.

Served by the worker daemon and by the peerpod-controller, each with its own registry.

- ``/metrics``: the process's registry in Prometheus text format.
- ``/healthz``: 200 when the daemon's event loop answers (every answer is
  computed on it, so an answer is the proof; 503 when it has not answered
  within ``LOOP_TIMEOUT``); the liveness probe.
- ``/startup``: 200 once the hypervisor socket is served and every sandbox
  running on this node at start-up has been re-served (the Go adaptor's
  meaning); 503 before. The startup probe.

Served by the standard library's threading WSGI server (the one
prometheus_client's own ``start_http_server`` uses) in a daemon thread:
aiohttp and its dependencies cost the idle daemon about 9 MiB, and three GET
routes need none of it. The HTTP thread only parses and writes; each answer is
computed on the daemon's loop (the store's SQLite connection, read by the
gauges, belongs to that thread). Binding fails at start with one line (port
in use, address not on this host), so a misconfiguration never leaves a
daemon without probes.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable
from http import HTTPStatus
from socketserver import TCPServer, ThreadingMixIn
from typing import TYPE_CHECKING, Any, Callable, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)
LOOP_TIMEOUT = 10.0  # seconds the event loop may take to answer before /healthz says 503
TEXT = "text/plain; charset=utf-8"
NOT_STARTED = "starting: hypervisor socket not served or sandboxes not re-served yet\n"
Answer = tuple[int, str, bytes]  # status, content type, body


class Exposition(Protocol):
    def exposition(self) -> bytes: ...


class ProbeBindError(Exception):
    """The endpoint cannot listen; the message is one line naming the address and the cause."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a request stuck on a blocked loop never holds the process at exit

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the address (it would block the start)."""
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    timeout = 30  # seconds a silent client may hold its connection (and thread)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        """Probes every few seconds would flood the log; errors surface as status codes."""


class ProbeServer:
    """``start()`` listens (or raises ``ProbeBindError``); ``close()`` stops. ``started`` answers /startup."""

    def __init__(self, address: str, port: int, metrics: Exposition, started: Callable[[], bool]) -> None:
        self.address = address
        self.port = port
        self._metrics = metrics
        self._started = started
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._routes: dict[str, Callable[[], Answer]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, self._metrics.exposition()),
            "/healthz": lambda: (200, TEXT, b"ok\n"),
            "/startup": lambda: (200, TEXT, b"started\n") if self._started() else (503, TEXT, NOT_STARTED.encode()),
        }

    def _on_loop(self, route: Callable[[], Answer]) -> Answer:
        """``route()`` run on the daemon's loop; 503 when the loop does not answer (or has stopped)."""
        assert self._loop is not None
        result: list[Answer] = []
        answered = threading.Event()

        def run() -> None:
            try:
                result.append(route())
            except Exception:  # noqa: BLE001 - a broken collector is a 500 with a log line, never a dead thread
                log.exception("probe endpoint: answer failed")
            answered.set()

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop is closed
            return 503, TEXT, b"event loop stopped\n"
        if not answered.wait(LOOP_TIMEOUT):
            return 503, TEXT, f"event loop did not answer within {LOOP_TIMEOUT:.0f} s\n".encode()
        return result[0] if result else (500, TEXT, b"500: Internal Server Error (see the log)\n")

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        route = self._routes.get(environ.get("PATH_INFO", ""))
        method = environ.get("REQUEST_METHOD", "")
        if route is None:
            status, kind, body = 404, TEXT, b"404: Not Found"
        elif method not in ("GET", "HEAD"):
            status, kind, body = 405, TEXT, b"405: Method Not Allowed"
        else:
            status, kind, body = self._on_loop(route)
        headers = [("Content-Type", kind), ("Content-Length", str(len(body)))]
        if status == 405:
            headers.append(("Allow", "GET, HEAD"))
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [b"" if method == "HEAD" else body]

    async def start(self) -> int:
        """Listen; returns the bound port. Raises ``ProbeBindError`` (one line) when it cannot."""
        kind = _Server6 if ipaddress.ip_address(self.address).version == 6 else _Server
        try:
            server = kind((self.address, self.port), _Quiet)
        except OSError as exc:
            cause = "port already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise ProbeBindError(
                f"PROBE_ADDRESS:PROBE_PORT {self.address}:{self.port}: cannot listen: {cause}"
            ) from None
        server.set_app(self._app)
        self._loop = asyncio.get_running_loop()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="probes", daemon=True)
        self._thread.start()
        log.info("probe endpoint listening on http://%s:%d (/metrics, /healthz, /startup)", self.address, self.port)
        return int(server.server_port)

    async def close(self) -> None:
        """Stop serving (the listening socket is closed when this returns). Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)  # waits for serve_forever's next poll (≤ 0.5 s)
            server.server_close()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()  # serve_forever has returned: immediate
