"""Lifecycle fixtures: a fake provider whose "VMs" are a health server on loopback,
and a fake pod network that records tunnel calls (both in ``fakes.lifecycle``)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
from fakes.lifecycle import FakePodNetwork, FakeProvider

from cloudadaptor.adaptor.lifecycle import LifecycleOptions, ProxyFactory, SandboxLifecycle
from cloudadaptor.adaptor.store import SandboxStore
from cloudadaptor.protocols import health_pb2
from cloudadaptor.adaptor.proxy import AgentEndpoint, AgentProxy
from cloudadaptor.ttrpc.server import Server, unary
from cloudadaptor.vmlimit import VmLimit


class ProxyProbe:
    """A proxy factory that builds real ``AgentProxy``s and reports when StartVM
    reaches its blocking point (waiting for the agent) and with which timeout."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.timeouts: list[float] = []

    def __call__(self, socket_path: str, endpoint: AgentEndpoint) -> AgentProxy:
        proxy = AgentProxy(socket_path, endpoint)
        wait_ready = proxy.wait_ready

        async def probed_wait_ready(timeout: float, backoff=None) -> None:
            self.timeouts.append(timeout)
            self.waiting.set()
            await wait_ready(timeout, backoff)

        proxy.wait_ready = probed_wait_ready  # type: ignore[method-assign]
        return proxy


class FakeAgent:
    """A ttrpc grpc.Health server on a loopback port, standing in for the forwarder."""

    def __init__(self) -> None:
        self.server = Server()
        self.checks = 0

        async def check(request, ctx):
            self.checks += 1
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

        self.server.register("grpc.Health", "Check", unary(health_pb2.CheckRequest, check))
        self.port = 0

    async def start(self) -> int:
        self.port = await self.server.serve_tcp("127.0.0.1", 0)
        return self.port


@pytest.fixture
async def agent():
    fake = FakeAgent()
    await fake.start()
    yield fake
    await fake.server.close()


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def proxy_probe() -> ProxyProbe:
    return ProxyProbe()


@pytest.fixture
def pod_network() -> FakePodNetwork:
    return FakePodNetwork()


@pytest.fixture
def netns_file(tmp_path: Path) -> str:
    # CreateVM checks that the path exists; the fake pod network reads nothing.
    path = tmp_path / "netns-pod"
    path.write_text("")
    return str(path)


@pytest.fixture
def short_dir():
    """A short directory: agent sockets need paths under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def lifecycle_factory(tmp_path: Path, short_dir: Path, provider: FakeProvider, pod_network: FakePodNetwork):
    made: list[tuple[SandboxLifecycle, SandboxStore]] = []

    def make(agent_port: int, proxy_timeout: float = 5.0, vm_limit: int | None = None, observer=None,
             proxy_factory: ProxyFactory = AgentProxy, initdata=None, credentials=None,
             cluster_id: str = "cluster-a") -> SandboxLifecycle:
        store = SandboxStore(tmp_path / "state" / "state.db")
        lifecycle = SandboxLifecycle(
            options=LifecycleOptions(pods_dir=short_dir / "pods", node_name="node-a", cluster_id=cluster_id,
                                     proxy_timeout=proxy_timeout, agent_port=agent_port, vm_limit=VmLimit(vm_limit),
                                     initdata=initdata),
            store=store,
            provider=provider,
            pod_network=pod_network,
            tls=None,
            observer=observer,
            credentials=credentials,
            proxy_factory=proxy_factory,
        )
        made.append((lifecycle, store))
        return lifecycle

    yield make
    for lifecycle, store in made:
        await lifecycle.close()
        store.close()
