"""The worker daemon (`cloud-api-adaptor serve`): wires settings to services.

Start-up order: provider checks → TLS → state store → recover what a previous
run left (VMs, tunnels) → listen. Shutdown stops listening and closes agent
sockets but deletes no VM and no tunnel: a restarted daemon re-serves the
sandboxes in its store.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from cloudadaptor.adaptor.lifecycle import LifecycleOptions, SandboxLifecycle
from cloudadaptor.adaptor.service import HypervisorService
from cloudadaptor.adaptor.store import SandboxStore
from cloudadaptor.config import Settings
from cloudadaptor.podnetwork.api import PodNetwork
from cloudadaptor.providers.base import Provider, create_provider
from cloudadaptor.tls import AdaptorTls, TlsError
from cloudadaptor.ttrpc.server import Server

if TYPE_CHECKING:  # both import heavy clients, only when configured
    from cloudadaptor.adaptor.grpc_binding import GrpcBinding
    from cloudadaptor.k8s.node import NodeIntegration

log = logging.getLogger(__name__)
BLOCKING_WORKERS = 64  # threads for blocking steps (netlink, cloud SDK calls), started only as needed


class StartupError(Exception):
    """The daemon cannot start; the message lists every problem, one per line."""


class Daemon:
    """The running adaptor. ``start()`` returns once every endpoint listens."""

    def __init__(self, settings: Settings, provider: Provider | None = None, pod_network: PodNetwork | None = None) -> None:
        self.settings = settings
        self.provider = provider
        self.pod_network = pod_network
        self.lifecycle: SandboxLifecycle | None = None
        # The shim dials once per call: idle connections past the cap are evicted, busy ones refused.
        self._ttrpc = Server(max_connections=settings.ttrpc_max_connections, max_requests=settings.ttrpc_max_requests)
        self._grpc: GrpcBinding | None = None
        self._store: SandboxStore | None = None
        self._k8s: NodeIntegration | None = None  # in a cluster
        self.closed = False

    async def _connect_kubernetes(self) -> None:
        """The node's Kubernetes integration; the client library is imported only in a cluster."""
        from cloudadaptor.k8s import cluster_configured

        if not cluster_configured(self.settings.provider_env):
            log.info("no Kubernetes configuration (KUBECONFIG, in-cluster): no PeerPods, no node capacity")
            return
        from cloudadaptor.k8s.client import KubeConfigError
        from cloudadaptor.k8s.node import connect_node

        try:
            self._k8s = await connect_node(self.settings)
        except KubeConfigError as exc:
            raise StartupError(f"Kubernetes: {exc}") from None

    async def start(self) -> None:
        # Tunnel set-up and blocking provider calls run in the default executor; asyncio's
        # default (CPUs + 4 workers) queues them when many pods start at once (bench: pods).
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=BLOCKING_WORKERS))
        settings = self.settings
        if self.provider is None:
            self.provider = create_provider(settings)
        problems = await self.provider.verify()
        if problems:
            raise StartupError("\n".join(f"{settings.cloud_provider}: {p}" for p in problems))
        try:
            tls = AdaptorTls.from_settings(settings)
        except TlsError as exc:
            raise StartupError(f"TLS: {exc}") from None
        self._store = SandboxStore(settings.state_dir / "state.db")
        await self._connect_kubernetes()
        if self.pod_network is None:
            from cloudadaptor.podnetwork.vxlan import VxlanPodNetwork

            self.pod_network = VxlanPodNetwork(settings.vxlan_worker_ip)
        self.lifecycle = SandboxLifecycle(
            options=LifecycleOptions(
                pods_dir=settings.pods_dir,
                node_name=settings.node_name,
                proxy_timeout=settings.proxy_timeout,
                extra_tags=settings.tags,
                tls_min_version=settings.tls_min_version,
                vxlan_port=settings.vxlan_port,
                vxlan_min_id=settings.vxlan_min_id,
                vm_limit=settings.peerpods_limit_per_node,
                getinfo_wait=settings.getinfo_wait_timeout,
                initdata=settings.initdata,
            ),
            store=self._store,
            provider=self.provider,
            pod_network=self.pod_network,
            tls=tls,
            observer=self._k8s.tracker if self._k8s else None,
            credentials=self._k8s.credentials if self._k8s else None,
        )
        await self.lifecycle.recover()
        service = HypervisorService(self.lifecycle)
        service.register_ttrpc(self._ttrpc)
        await self._ttrpc.serve_unix(str(settings.socket), mode=0o600)
        log.info("hypervisor service listening on %s (provider %s, node %s)", settings.socket, settings.cloud_provider, settings.node_name)
        if self._k8s is not None:
            await self._k8s.start()  # advertises kata.peerpods.io/vm; retries in the background
        if settings.grpc_endpoint:
            await self._serve_grpc(service)

    async def _serve_grpc(self, service: HypervisorService) -> None:
        """The optional gRPC binding (GRPC_ENDPOINT): loopback, a unix socket, or mutual TLS."""
        from cloudadaptor.adaptor.grpc_binding import GrpcBinding, GrpcTls

        settings = self.settings
        assert settings.grpc_endpoint is not None
        grpc_tls = None
        if settings.grpc_tls_cert and settings.grpc_tls_key and settings.grpc_tls_client_ca:
            grpc_tls = GrpcTls(settings.grpc_tls_cert, settings.grpc_tls_key, settings.grpc_tls_client_ca)
        try:
            self._grpc = GrpcBinding(service, settings.grpc_endpoint, grpc_tls)
            await self._grpc.start()
        except (ValueError, OSError) as exc:  # also re-checked here: Settings can be built without load_settings
            raise StartupError(str(exc)) from None

    async def close(self) -> None:
        """Stop listening; VMs and their records stay for the next start. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._grpc is not None:
            await self._grpc.close()
        await self._ttrpc.close()
        if self.lifecycle is not None:
            await self.lifecycle.close()
        if self._k8s is not None:
            await self._k8s.close()
        if self.provider is not None:
            await self.provider.close()
        if self._store is not None:
            self._store.close()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT."""
    from pyroute2 import config as pyroute2_config

    # pyroute2 enters network namespaces through forked helpers and stops them
    # with SIGTERM. A forked child shares asyncio's signal wakeup fd, so its
    # SIGTERM would reach our handler as if we had been asked to stop; with
    # this flag the helpers reset SIGTERM/SIGINT to the default before working.
    pyroute2_config.disable_mp_signal = True
    daemon = Daemon(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await daemon.start()
        await stop.wait()
        log.info("shutting down (VMs keep running; a restart re-serves them)")
    finally:
        try:
            await daemon.close()
        except Exception:  # shutting down anyway: report, VMs and records stay for the restart
            log.exception("error while shutting down")
