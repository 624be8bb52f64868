"""The worker daemon (`cloud-api-adaptor serve`): wires settings to services.

Start-up order: provider checks → TLS → state store → recover what a previous
run left (VMs, tunnels) → listen. Shutdown stops listening and closes agent
sockets but deletes no VM and no tunnel: a restarted daemon re-serves the
sandboxes in its store.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from cloudadaptor.adaptor.certrenewal import CertRenewal
from cloudadaptor.adaptor.delivery import BootDelivery
from cloudadaptor.adaptor.hooks import SandboxObserver
from cloudadaptor.adaptor.lifecycle import LifecycleOptions, SandboxLifecycle
from cloudadaptor.adaptor.observers import LogFieldsObserver, ObserverChain
from cloudadaptor.adaptor.pool import PoolOptions, WarmPool
from cloudadaptor.adaptor.proxy import AgentProxy
from cloudadaptor.adaptor.service import HypervisorService
from cloudadaptor.adaptor.store import SandboxStore
from cloudadaptor.adaptor.tlsstart import start_tls
from cloudadaptor.config import Settings
from cloudadaptor.metrics import Metrics
from cloudadaptor.probes import ProbeBindError, ProbeServer
from cloudadaptor.podnetwork.api import PodNetwork
from cloudadaptor.providers.base import TAG_CLUSTER, Provider, create_provider
from cloudadaptor.tls import AdaptorTls, TlsError
from cloudadaptor.ttrpc.server import Server
from cloudadaptor.vmlimit import VmLimit

if TYPE_CHECKING:  # both import heavy clients, only when configured
    from cloudadaptor.adaptor.grpc_binding import GrpcBinding
    from cloudadaptor.k8s.node import NodeIntegration

log = logging.getLogger(__name__)
BLOCKING_WORKERS = 64  # threads for blocking steps (netlink, cloud SDK calls), started only as needed


class StartupError(Exception):
    """The daemon cannot start; the message lists every problem, one per line."""


CLUSTER_ID_FACT = "cluster_id"


async def resolve_cluster_id(settings: Settings, store: SandboxStore, kube_api: Any | None) -> str:
    """This cluster's id, recorded in ``store``: ``CLUSTER_ID``; else (with
    Kubernetes) the kube-system namespace uid, or the recorded id while the API
    cannot be read; else the recorded id; else a new one (a node without
    Kubernetes keeps it across restarts). Raises ``StartupError`` when
    Kubernetes is configured, unreadable and nothing is recorded."""
    recorded = store.fact(CLUSTER_ID_FACT)
    if settings.cluster_id:
        chosen, source = settings.cluster_id, "CLUSTER_ID"
    elif kube_api is not None:
        from cloudadaptor.k8s.client import API_ERRORS, describe
        from cloudadaptor.k8s.peerpods import PeerPodApi

        try:
            chosen, source = await PeerPodApi(kube_api).cluster_uid(), "uid of namespace kube-system"
        except API_ERRORS as exc:
            if recorded is None:
                raise StartupError(f"cluster id: reading namespace kube-system failed ({describe(exc)}); "
                                   "set CLUSTER_ID or allow get on namespaces") from None
            chosen, source = recorded, f"recorded (namespace kube-system unreadable: {describe(exc)})"
    else:
        chosen, source = (recorded, "recorded") if recorded else (str(uuid.uuid4()), "generated")
    if recorded and recorded != chosen:
        log.warning("cluster id changed from %s to %s: VMs tagged with the old id are no longer this node's to sweep",
                    recorded, chosen)
    store.record_fact(CLUSTER_ID_FACT, chosen)
    log.info("cluster id %s (%s)", chosen, source)
    return chosen


class Daemon:
    """The running adaptor. ``start()`` returns once every endpoint listens."""

    def __init__(self, settings: Settings, provider: Provider | None = None, pod_network: PodNetwork | None = None) -> None:
        self.settings = settings
        self.provider = provider
        self.pod_network = pod_network
        self.lifecycle: SandboxLifecycle | None = None
        self.pool: WarmPool | None = None
        self.renewal: CertRenewal | None = None  # renews running VMs' certificates (None with DISABLE_TLS)
        # In a cluster the node integration moves it to a PeerPodConfig's limit and back.
        self.vm_limit = VmLimit(settings.peerpods_limit_per_node)
        # The shim dials once per call: idle connections past the cap are evicted, busy ones refused.
        self._ttrpc = Server(max_connections=settings.ttrpc_max_connections, max_requests=settings.ttrpc_max_requests)
        self._grpc: GrpcBinding | None = None
        self._store: SandboxStore | None = None
        self._k8s: NodeIntegration | None = None  # in a cluster
        self.metrics: Metrics | None = None
        self._probes: ProbeServer | None = None
        self.started = False  # /startup: socket served and running sandboxes re-served
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
            self._k8s = await connect_node(self.settings, self.vm_limit)
        except KubeConfigError as exc:
            raise StartupError(f"Kubernetes: {exc}") from None

    async def start(self) -> None:
        # Tunnel set-up and blocking provider calls run in the default executor; asyncio's
        # default (CPUs + 4 workers) queues them when many pods start at once (bench: pods).
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=BLOCKING_WORKERS))
        settings = self.settings
        if self.provider is None:
            self.provider = create_provider(settings)
        self.metrics = Metrics(self.provider.name, self._sandbox_states, self._pool_states)
        self.provider.report_cloud_calls(self.metrics)  # the provider's SDK hooks report to our counters
        # First, so a bad probe address stops the start before any cloud call;
        # /healthz answers during recovery, /startup only after it.
        self._probes = ProbeServer(settings.probe_address, settings.probe_port, self.metrics, lambda: self.started)
        try:
            await self._probes.start()
        except ProbeBindError as exc:
            raise StartupError(str(exc)) from None
        try:
            await self._start_serving(self.provider)
        except BaseException:
            await self._probes.close()  # a failed start leaves no listener behind
            raise

    async def _start_serving(self, provider: Provider) -> None:
        settings = self.settings
        problems = await provider.verify()
        if problems:
            raise StartupError("\n".join(f"{settings.cloud_provider}: {p}" for p in problems))
        try:
            tls = await start_tls(settings)  # in a child: the daemon loads cryptography only to sign
        except TlsError as exc:
            raise StartupError(f"TLS: {exc}") from None
        self._store = SandboxStore(settings.state_dir / "state.db")
        await self._connect_kubernetes()
        cluster_id = await resolve_cluster_id(settings, self._store, self._k8s.api if self._k8s else None)
        if self.pod_network is None:
            from cloudadaptor.podnetwork.vxlan import VxlanPodNetwork

            self.pod_network = VxlanPodNetwork(settings.vxlan_worker_ip)
        self.pool = self._warm_pool(self._store, provider, tls, cluster_id)
        self.vm_limit.subscribe(self.pool.kick)  # a new limit re-sizes the pool at once
        self.lifecycle = SandboxLifecycle(
            options=LifecycleOptions(
                pods_dir=settings.pods_dir,
                node_name=settings.node_name,
                cluster_id=cluster_id,
                proxy_timeout=settings.proxy_timeout,
                extra_tags=settings.tags,
                tls_min_version=settings.tls_min_version,
                vxlan_port=settings.vxlan_port,
                vxlan_min_id=settings.vxlan_min_id,
                vm_limit=self.vm_limit,
                getinfo_wait=settings.getinfo_wait_timeout,
                initdata=settings.initdata,
            ),
            store=self._store,
            provider=provider,
            pod_network=self.pod_network,
            tls=tls,
            observer=ObserverChain(self._observers()),
            recorder=self.metrics,
            proxy_factory=functools.partial(AgentProxy, recorder=self.metrics),
            credentials=self._k8s.credentials if self._k8s else None,
            delivery=self.pool,
        )
        await self.lifecycle.recover()
        await self.pool.recover()
        self.pool.start()  # fills the pool, or deletes what a larger or older pool left (PODVM_POOL_SIZE=0)
        if tls is not None:  # its first pass renews what fell due while the daemon was down
            self.renewal = CertRenewal(store=self._store, tls=tls, recorder=self.metrics)
            self.renewal.start()
        service = HypervisorService(self.lifecycle, starts=self._k8s.events if self._k8s else None)
        service.register_ttrpc(self._ttrpc)
        await self._ttrpc.serve_unix(str(settings.socket), mode=0o600)
        log.info("hypervisor service listening on %s (provider %s, node %s)", settings.socket, settings.cloud_provider, settings.node_name)
        self.started = True
        if self._k8s is not None:
            await self._k8s.start()  # advertises kata.peerpods.io/vm; retries in the background
        if settings.grpc_endpoint:
            await self._serve_grpc(service)

    def _warm_pool(self, store: SandboxStore, provider: Provider, tls: AdaptorTls | None, cluster_id: str) -> WarmPool:
        settings = self.settings
        tags = {**settings.tags, TAG_CLUSTER: cluster_id}  # pool VMs are this cluster's like every VM
        options = PoolOptions(
            size=settings.podvm_pool_size, max_age=settings.podvm_pool_max_age,
            refill_concurrency=settings.podvm_pool_refill_concurrency, boot_timeout=settings.proxy_timeout,
            node_name=settings.node_name, extra_tags=tags, tls_min_version=settings.tls_min_version,
            vm_limit=self.vm_limit,
        )
        if options.size and tls is None:
            log.warning("PODVM_POOL_SIZE=%d ignored: TLS is disabled and pool VMs are claimed over mutual TLS only", options.size)
        return WarmPool(options=options, store=store, provider=provider, tls=tls,
                        cold=BootDelivery(provider, settings.node_name, tags))

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
        if self._probes is not None:
            await self._probes.close()
        await self._ttrpc.close()
        if self.renewal is not None:
            await self.renewal.close()
        if self.pool is not None:
            await self.pool.close()
        if self.lifecycle is not None:
            await self.lifecycle.close()
        if self._k8s is not None:
            await self._k8s.close()
        if self.provider is not None:
            await self.provider.close()
        if self._store is not None:
            self._store.close()


    def _observers(self) -> list[SandboxObserver]:
        """Who hears of VMs: PeerPods and Pod events in a cluster, and the log fields always."""
        cluster: list[SandboxObserver] = [self._k8s.tracker, self._k8s.events] if self._k8s else []
        return [*cluster, LogFieldsObserver()]

    def _sandbox_states(self) -> list[tuple[str, bool]]:
        """(state, has a VM) per stored sandbox, for the gauges (empty before the store opens)."""
        if self._store is None or self.closed:
            return []
        return [(s.state.value, bool(s.instance_id)) for s in self._store.all()]

    def _pool_states(self) -> list[str] | None:
        """The state of each warm-pool VM, for the pool gauge; None while there is no pool."""
        if self.pool is None or self.closed:
            return None
        vms = self.pool.pool.all()
        return [vm.state.value for vm in vms] if self.settings.podvm_pool_size or vms else None


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT."""
    _log_to_state_dir(settings)
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


def _log_to_state_dir(settings: Settings) -> None:
    """Also keep the last log lines in ``STATE_DIR/adaptor.log`` (2 × 1 MiB, 0600) for ``diagnose``."""
    from logging.handlers import RotatingFileHandler

    path = settings.log_file
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        handler = RotatingFileHandler(path, maxBytes=1 << 20, backupCount=1)
    except OSError as exc:
        log.warning("no log file for diagnose at %s: %s", path, exc)
        return
    root = logging.getLogger()
    handler.setFormatter(root.handlers[0].formatter if root.handlers else logging.Formatter())
    root.addHandler(handler)
