"""A local Azure Resource Manager endpoint for tests and demos (``FakeArm``).

The provider's ARM client (azure-mgmt-core's pipeline) and the generated
azure-mgmt-compute/-network clients (``image build azure``) talk to it over HTTPS on
127.0.0.1 (azure-core refuses bearer tokens over plain http) with a
certificate from a throw-away CA (``ca_file``: trust it through
``REQUESTS_CA_BUNDLE``). Requests must carry ``Bearer <token>``;
``StaticTokenCredential`` hands that token to the SDK. The cloud itself
(resources, long-running operations, faults) is ``armstate.ArmState``.

    with FakeArm() as arm:
        ids = arm.populate()          # resource group, subnet, NSG, image, sizes
        arm.throttle(2, retry_after="1")
        arm.fail_next("PUT", "virtualMachines", code="AllocationFailed", lro=True)
        provider = fast_provider(azure_env(arm, ids, ssh_key_path))
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping

from azure.core.credentials import AccessToken

from fakes.armstate import ArmState, Fault, Json

SUBSCRIPTION = "00000000-0000-4000-8000-000000000001"
TOKEN = "fake-arm-token"
DEFAULT_SIZES = (  # name, vCPUs, memory GiB, GPUs
    ("Standard_B2als_v2", 2, 4, 0),
    ("Standard_D2as_v5", 2, 8, 0),
    ("Standard_D4as_v5", 4, 16, 0),
    ("Standard_DC2as_v5", 2, 8, 0),
    ("Standard_NC4as_T4_v3", 4, 28, 1),
)


class StaticTokenCredential:
    """A ``TokenCredential`` returning a fixed token; records the scopes asked for."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.extend(scopes)
        return AccessToken(self.token, int(time.time()) + 3600)


@dataclass(frozen=True)
class Seeded:
    """Ids made by ``FakeArm.populate``."""

    resource_group: str
    subnet_id: str
    nsg_id: str
    image_id: str
    subnet_prefix: str


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        arm = self.server.arm
        if self.command == "GET" and self.path.startswith("/fakeblobs/"):
            self._blob(arm)
            return
        if self.headers.get("Authorization") != f"Bearer {arm.token}":
            status, headers, body = 401, {}, {"error": {"code": "InvalidAuthenticationToken",
                                                        "message": "The access token is invalid."}}
        else:
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
            status, headers, body = arm.state.handle(self.command, self.path, parsed)
        arm.record(self.command, self.path, status)
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", "fake")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_DELETE = do_PATCH = do_POST = _serve

    def _blob(self, arm: FakeArm) -> None:
        """A boot diagnostics blob by its SAS URI (no bearer token: the signature is the credential)."""
        name = self.path.split("/")[2]
        text = arm.state.consoles.get(name) if "sig=" in self.path else None
        data = (text or "").encode()
        arm.record("GET", self.path.split("?")[0], 200 if text is not None else 404)
        self.send_response(200 if text is not None else 404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    arm: FakeArm
    ssl_context: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        """TLS handshake in the connection's own thread, then serve it."""
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        self.arm.connections.add(tls)
        try:
            self.RequestHandlerClass(tls, client_address, self)
        except (ssl.SSLError, OSError):
            pass
        finally:
            self.arm.connections.discard(tls)
            tls.close()


class FakeArm:
    """The fake ARM endpoint: ``start()`` listens on 127.0.0.1 (random port), ``stop()`` closes.

    ``state`` is the cloud (see ``armstate``); ``requests`` lists
    ``(method, path, status)`` of every request served.
    """

    def __init__(self, *, subscription_id: str = SUBSCRIPTION, location: str = "eastus", token: str = TOKEN) -> None:
        self.token = token
        self.state = ArmState(subscription_id=subscription_id, location=location.lower())
        self.requests: list[tuple[str, str, int]] = []
        self.connections: set[ssl.SSLSocket] = set()
        self._dir = Path(tempfile.mkdtemp(prefix="fakearm-"))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def subscription_id(self) -> str:
        return self.state.subscription_id

    @property
    def location(self) -> str:
        return self.state.location

    @property
    def ca_file(self) -> str:
        return str(self._dir / "ca.pem")

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() first"
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeArm:
        # Imported here: bench.cloudserve loads this module into the daemon it measures (idle RSS).
        from cloudadaptor.tlscerts import CertificateAuthority

        ca = CertificateAuthority.create("fake ARM test CA")
        cert, key = ca.issue("127.0.0.1", server=True, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        (self._dir / "ca.pem").write_text(ca.cert_pem)
        (self._dir / "server.pem").write_text(cert)
        (self._dir / "server.key").write_text(key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._dir / "server.pem", self._dir / "server.key")
        server = _Server(("127.0.0.1", 0), _Handler)
        server.arm, server.ssl_context = self, context
        self._server = server
        self.state.base_url = self.base_url
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-arm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._server = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> FakeArm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, method: str, path: str, status: int) -> None:
        with self.state.lock:
            self.requests.append((method, path.split("?")[0], status))

    # ------------------------------------------------------------ seeding

    def _rg_id(self, rg: str) -> str:
        return f"/subscriptions/{self.subscription_id}/resourceGroups/{rg}"

    def _put(self, resource_id: str, body: Json) -> str:
        name = resource_id.rstrip("/").rsplit("/", 1)[1]
        body = {"id": resource_id, "name": name, **body}
        body.setdefault("properties", {}).setdefault("provisioningState", "Succeeded")
        with self.state.lock:
            self.state.resources[resource_id.lower()] = body
        return resource_id

    def add_resource_group(self, name: str) -> str:
        return self._put(self._rg_id(name), {"location": self.location})

    def add_subnet(self, rg: str, vnet: str, subnet: str, prefix: str) -> str:
        vnet_id = f"{self._rg_id(rg)}/providers/Microsoft.Network/virtualNetworks/{vnet}"
        self._put(vnet_id, {"type": "Microsoft.Network/virtualNetworks", "location": self.location,
                            "properties": {"addressSpace": {"addressPrefixes": [prefix]}}})
        return self._put(f"{vnet_id}/subnets/{subnet}", {"type": "Microsoft.Network/virtualNetworks/subnets",
                                                         "properties": {"addressPrefix": prefix}})

    def add_nsg(self, rg: str, name: str) -> str:
        return self._put(f"{self._rg_id(rg)}/providers/Microsoft.Network/networkSecurityGroups/{name}",
                         {"type": "Microsoft.Network/networkSecurityGroups", "location": self.location})

    def add_image(self, rg: str, name: str, location: str | None = None) -> str:
        return self._put(f"{self._rg_id(rg)}/providers/Microsoft.Compute/images/{name}",
                         {"type": "Microsoft.Compute/images", "location": location or self.location})

    def add_gallery_image_version(self, rg: str, gallery: str, image: str, version: str) -> str:
        return self._put(f"{self._rg_id(rg)}/providers/Microsoft.Compute/galleries/{gallery}/images/{image}"
                         f"/versions/{version}", {"type": "Microsoft.Compute/galleries/images/versions",
                                                  "location": self.location})

    def add_shared_gallery_image(self, gallery: str, image: str, version: str, *, community: bool = False) -> str:
        """A direct-shared (or community) gallery image version; returns the id a VM refers to it by."""
        kind = "communityGalleries" if community else "sharedGalleries"
        self._put(f"/subscriptions/{self.subscription_id}/providers/Microsoft.Compute/locations/{self.location}/"
                  f"{kind}/{gallery}/images/{image}/versions/{version}", {"location": self.location})
        prefix = "CommunityGalleries" if community else "SharedGalleries"
        return f"/{prefix}/{gallery}/Images/{image}/Versions/{version}"

    def add_size(self, name: str, vcpus: int, memory_gib: float, gpus: int = 0, *, restricted: bool = False) -> None:
        sku: Json = {
            "resourceType": "virtualMachines", "name": name, "tier": "Standard", "locations": [self.location],
            "capabilities": [{"name": "vCPUs", "value": str(vcpus)}, {"name": "MemoryGB", "value": str(memory_gib)},
                             {"name": "GPUs", "value": str(gpus)}],
            "restrictions": [{"type": "Location", "values": [self.location],
                              "reasonCode": "NotAvailableForSubscription"}] if restricted else [],
        }
        with self.state.lock:
            self.state.skus.append(sku)

    def populate(self, *, rg: str = "peerpods-rg", prefix: str = "203.0.113.0/24") -> Seeded:
        """A usable cloud: resource group, vnet/subnet (``prefix``), NSG, managed image, ``DEFAULT_SIZES``."""
        self.add_resource_group(rg)
        subnet = self.add_subnet(rg, "peerpods-vnet", "worker", prefix)
        nsg = self.add_nsg(rg, "peerpods-nsg")
        image = self.add_image(rg, "peer-pod-vmimage")
        for name, vcpus, memory, gpus in DEFAULT_SIZES:
            self.add_size(name, vcpus, memory, gpus)
        return Seeded(rg, subnet, nsg, image, prefix)

    # ------------------------------------------------------------ faults

    def fail_next(self, method: str, kind: str, *, status: int = 409, code: str = "Conflict",
                  message: str = "injected failure", lro: bool = False, times: int = 1) -> None:
        """The next ``times`` ``method`` requests on ``kind`` fail: at once with ``status``, or
        (``lro=True``) accepted, then their operation fails with ``code``."""
        with self.state.lock:
            self.state.faults.append(Fault(method, kind, status, code, message, lro=lro, times=times))

    def throttle(self, times: int, *, retry_after: str = "1", method: str | None = None, kind: str | None = None) -> None:
        """The next ``times`` matching requests get 429 with ``Retry-After``."""
        with self.state.lock:
            self.state.faults.append(Fault(method, kind, 429, "TooManyRequests", "throttled (injected)",
                                           retry_after=retry_after, times=times))

    # ------------------------------------------------------------ inspection

    def ids(self, kind: str) -> list[str]:
        """Ids of the resources whose type ends with ``/kind`` (e.g. ``virtualMachines``), sorted."""
        with self.state.lock:
            return sorted(r["id"] for r in self.state.resources.values()
                          if str(r.get("type", "")).lower().endswith("/" + kind.lower()))

    def resource(self, resource_id: str) -> Json | None:
        with self.state.lock:
            found = self.state.resources.get(resource_id.lower())
            return json.loads(json.dumps(found)) if found is not None else None

    def count(self, method: str, kind_in_path: str, status: int | None = None) -> int:
        """Requests served with ``method`` whose path contains ``kind_in_path`` (and ``status``)."""
        with self.state.lock:
            return sum(1 for m, p, s in self.requests
                       if m == method and kind_in_path.lower() in p.lower() and (status is None or s == status))


# ------------------------------------------------------------------ provider

# Tuning that keeps tests fast: no wait between LRO polls, tiny backoffs.
FAST_TUNING: Mapping[str, Any] = {
    "polling_interval": 0.0, "retry_backoff_factor": 0.01, "retry_backoff_max": 0.05,
    "in_use_timeout": 2.0, "in_use_backoff": 0.01,
}


def azure_env(arm: FakeArm, seeded: Seeded, ssh_pub_key_path: str | Path, **extra: str) -> dict[str, str]:
    """The peer-pods-cm/-secret keys pointing the azure provider at ``arm`` (``extra`` on top)."""
    return {
        "CLOUD_PROVIDER": "azure",
        "AZURE_SUBSCRIPTION_ID": arm.subscription_id,
        "AZURE_REGION": arm.location,
        "AZURE_RESOURCE_GROUP": seeded.resource_group,
        "AZURE_SUBNET_ID": seeded.subnet_id,
        "AZURE_NSG_ID": seeded.nsg_id,
        "AZURE_IMAGE_ID": seeded.image_id,
        "AZURE_INSTANCE_SIZE": "Standard_B2als_v2",
        "DISABLECVM": "true",
        "SSH_PUB_KEY_PATH": str(ssh_pub_key_path),
        "AZURE_RESOURCE_MANAGER_ENDPOINT": arm.base_url,
        **extra,
    }


def fast_provider(env: Mapping[str, str], credential: Any = None, **tuning: Any) -> Any:  # -> AzureProvider
    """An AzureProvider from ``env`` through the real key parsing, with ``FAST_TUNING``
    (and ``tuning``) and ``credential`` (default: a ``StaticTokenCredential``).
    Raises ``ConfigError`` like the daemon would."""
    from cloudadaptor.providers.azure.config import AzureConfig
    from cloudadaptor.providers.azure.provider import AzureProvider
    from cloudadaptor.providers.base import load_provider

    _, config = load_provider(env)
    assert isinstance(config, AzureConfig), "fast_provider needs CLOUD_PROVIDER=azure"
    config = dataclasses.replace(config, **{**FAST_TUNING, **tuning})
    return AzureProvider(config, credential=credential or StaticTokenCredential())
