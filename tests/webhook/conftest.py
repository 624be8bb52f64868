"""The webhook served over real HTTPS on 127.0.0.1, and a client that trusts its test CA."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from cloudadaptor.tlscerts import CertificateAuthority
from cloudadaptor.webhook.mutate import MutationOptions
from cloudadaptor.webhook.server import MUTATE_PATH, CertificateReloader, WebhookServer


@dataclass
class Tls:
    ca: CertificateAuthority
    ca_file: Path
    cert_file: Path
    key_file: Path

    def issue(self, common_name: str = "peer-pods-webhook") -> None:
        cert, key = self.ca.issue(common_name, server=True, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        self.cert_file.write_text(cert)
        self.key_file.write_text(key)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    ca = CertificateAuthority.create("webhook test CA")
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    material = Tls(ca, tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key")
    material.issue()
    return material


@dataclass
class WebhookClient:
    url: str
    tls: Tls
    server: WebhookServer

    async def post(self, body: Any, *, raw: bytes | None = None, path: str = MUTATE_PATH) -> tuple[int, Any]:
        """POST a review (JSON-encoded unless ``raw``); returns (HTTP status, decoded JSON or text)."""
        data = raw if raw is not None else json.dumps(body).encode()
        async with aiohttp.ClientSession() as session:
            async with session.post(self.url + path, data=data, ssl=self.tls.client_context(),
                                    headers={"Content-Type": "application/json"}) as response:
                text = await response.text()
                try:
                    return response.status, json.loads(text)
                except ValueError:
                    return response.status, text


@pytest.fixture
async def start_webhook(tls: Tls) -> AsyncIterator[Callable[[MutationOptions], Awaitable[WebhookClient]]]:
    """Factory: ``await start_webhook(options)`` -> a client of a webhook serving those options."""
    servers: list[WebhookServer] = []

    async def start(options: MutationOptions) -> WebhookClient:
        server = WebhookServer(options, CertificateReloader(tls.cert_file, tls.key_file), "127.0.0.1", 0)
        servers.append(server)
        port = await server.start()
        return WebhookClient(f"https://127.0.0.1:{port}", tls, server)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def webhook(start_webhook) -> WebhookClient:
    """The webhook with default options (runtime class kata-remote)."""
    return await start_webhook(MutationOptions())
