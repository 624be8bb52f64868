"""The peer-pod mutating admission webhook's HTTPS server (run by `cloud-api-adaptor webhook`).

``POST /mutate-pods`` takes an AdmissionReview v1 and answers with one
(``cloudadaptor.webhook.mutate``); anything that is not a review is answered
400 with a one-line reason — never a crash, never a 500 for bad input.
``GET /healthz`` answers ``ok`` (the Deployment's probes).

TLS: the certificate and key are read from files (``WEBHOOK_TLS_CERT_FILE``,
``WEBHOOK_TLS_KEY_FILE``; the Deployment mounts the serving-certificate
secret there) and re-read when they change, so a rotated certificate is
served without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from cloudadaptor.webhook.mutate import BadReview, MutationOptions, admission_response
from cloudadaptor.wire import DEFAULT_TLS_MIN_VERSION, TLS_VERSIONS

log = logging.getLogger(__name__)

MUTATE_PATH = "/mutate-pods"
MAX_BODY = 8 * 1024 * 1024  # the API server sends at most ~3 MiB objects (twice, old and new, on updates)
# A Pod nests about 15 levels deep; anything far deeper is an attack on the
# parser (RecursionError) or on every walk of the review after it.
MAX_DEPTH = 64


class CertificateReloader:
    """A server SSLContext over a cert/key file pair, reloaded when either file changes."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = TLS_VERSIONS[DEFAULT_TLS_MIN_VERSION]
        self._stamp = self._mtimes()
        self.context.load_cert_chain(cert_file, key_file)

    def _mtimes(self) -> tuple[float, float]:
        return (os.stat(self.cert_file).st_mtime, os.stat(self.key_file).st_mtime)

    def reload_if_changed(self) -> bool:
        """Load the pair again if a file changed; True when reloaded. A bad pair keeps the old one (logged)."""
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return False
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            log.error("keeping the current certificate: cannot load %s / %s: %s", self.cert_file, self.key_file, exc)
            return False
        self._stamp = stamp
        log.info("serving certificate reloaded from %s", self.cert_file)
        return True


def _bad_request(reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=400)


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when ``value`` nests lists/objects deeper than ``limit`` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def make_app(options: MutationOptions) -> web.Application:
    """The aiohttp application (routes ``/mutate-pods`` and ``/healthz``)."""

    async def mutate(request: web.Request) -> web.Response:
        try:
            review: Any = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return _bad_request("the body is not JSON (expected an AdmissionReview v1)")
        except RecursionError:  # the parser's own limit, before ours
            return _bad_request(f"the JSON nests deeper than {MAX_DEPTH} levels (expected an AdmissionReview v1)")
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": f"the body is larger than {MAX_BODY} bytes"}, status=413)
        if too_deep(review):
            return _bad_request(f"the JSON nests deeper than {MAX_DEPTH} levels (expected an AdmissionReview v1)")
        try:
            answer = admission_response(review, options)
        except BadReview as exc:
            return _bad_request(str(exc))
        response = answer["response"]
        log.debug("review %s: allowed=%s patched=%s", response["uid"], response["allowed"], "patch" in response)
        return web.json_response(answer)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(MUTATE_PATH, mutate)
    app.router.add_get("/healthz", healthz)
    return app


@dataclass
class WebhookServer:
    """The webhook listening with TLS; ``await start()`` returns the bound port."""

    options: MutationOptions
    certificates: CertificateReloader
    host: str = ""
    port: int = 8443
    reload_interval: float = 60.0

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._reloader: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self._runner = web.AppRunner(make_app(self.options), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host or None, self.port, ssl_context=self.certificates.context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._reloader = asyncio.create_task(self._reload_loop(), name="webhook-cert-reload")
        log.info("webhook listening on %s:%d%s (runtime class %s; system namespaces %s)", self.host or "*", self.port,
                 MUTATE_PATH, self.options.runtime_class, ",".join(self.options.system_namespaces))
        return self.port

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            self.certificates.reload_if_changed()

    async def close(self) -> None:
        if self._reloader is not None:
            self._reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloader
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
