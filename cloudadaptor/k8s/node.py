"""What the worker daemon (`serve`) does with Kubernetes, behind one object.

    k8s = await connect_node(settings)        # None outside a cluster
    if k8s is not None:
        await k8s.start()                     # advertises kata.peerpods.io/vm (retried in the background),
                                              # then follows the node's PeerPodConfig limit (k8s.vm_limit)
        observer = k8s.tracker                # a SandboxObserver for the lifecycle
        credentials = k8s.credentials         # PodCredentials: the pods' pull secrets
    ...
    await k8s.close()

Nothing here can stop the daemon from serving: an API server that is down
is retried (capacity) or logged (PeerPods). After the first look at the node,
it is read again every ``follow_interval`` seconds (``FOLLOW_INTERVAL``): a
PeerPodConfig's new limit reaches StartVM and the warm pool within that time,
without a restart (``capacity.NodeLimitFollower``). A poll, not a watch: one
small GET per node every few seconds, and nothing to re-establish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kubernetes_asyncio import client as k8s

from cloudadaptor.config import Settings
from cloudadaptor.k8s.capacity import NodeLimitFollower, advertise_vm_capacity
from cloudadaptor.k8s.client import API_ERRORS, connect, describe
from cloudadaptor.k8s.events import PodEvents
from cloudadaptor.k8s.peerpods import PeerPodTracker
from cloudadaptor.k8s.pullsecrets import PullSecretReader
from cloudadaptor.retry import Backoff, retry_until
from cloudadaptor.vmlimit import VmLimit

log = logging.getLogger(__name__)
FOLLOW_INTERVAL = 5.0  # seconds between two reads of the node (a PeerPodConfig's change applies within it)


class NodeIntegration:
    """The daemon's Kubernetes side: node capacity, the PeerPod tracker and the pull-secret reader."""

    def __init__(self, api: k8s.ApiClient, settings: Settings, *, backoff: Backoff = Backoff(initial=1.0, maximum=60.0),
                 follow_interval: float | None = None, vm_limit: VmLimit | None = None) -> None:
        self.api = api
        self.node_name = settings.node_name
        # the lifecycle and the pool read it (the daemon passes its own)
        self.vm_limit = vm_limit if vm_limit is not None else VmLimit(settings.peerpods_limit_per_node)
        self.follower = NodeLimitFollower(api, settings.node_name, self.vm_limit)
        self.follow_interval = FOLLOW_INTERVAL if follow_interval is None else follow_interval
        self.tracker = PeerPodTracker(api, node_name=settings.node_name)
        self.credentials = PullSecretReader(api)
        self.events = PodEvents(api, node_name=settings.node_name)  # PodVM* Events on the Pod
        self._backoff = backoff
        self._advertiser: asyncio.Task[None] | None = None
        self._last_unexpected: str | None = None
        self._last_follow_error: str | None = None
        self.advertised = asyncio.Event()  # the node's capacity is settled (advertised by us, or a PeerPodConfig's)

    async def start(self) -> None:
        """Settle the node's VM capacity: tried once now, then retried in the background until it works;
        from then on the node is re-read every ``follow_interval`` seconds.

        Never raises for the API's sake: the daemon serves either way (peer pods
        are just not scheduled here until the capacity is advertised).
        """
        synced = True
        try:
            await self._advertise()
        except Exception as exc:  # logged; the background retry takes over
            self._not_yet(exc)
            synced = False
        self._advertiser = asyncio.create_task(self._follow(synced), name="node-vm-limit")

    async def _advertise(self) -> None:
        # advertise_vm_capacity is looked up here, at call time (tests replace it)
        await self.follower.sync(advertise_vm_capacity)
        self.advertised.set()

    def _not_yet(self, exc: BaseException, pause: float | None = None) -> None:
        # A bug (not an API or network error) shows its traceback, once until it changes.
        unexpected = None if isinstance(exc, API_ERRORS) else describe(exc)
        trace = unexpected is not None and unexpected != self._last_unexpected
        self._last_unexpected = unexpected
        log.warning("node %s: cannot advertise kata.peerpods.io/vm yet (peer pods will not be scheduled here): %s",
                    self.node_name, describe(exc), exc_info=exc if trace else None)

    async def _follow(self, synced: bool) -> None:
        if not synced:
            await asyncio.sleep(self._backoff.initial)  # the attempt in start() just failed
            await retry_until(None, self._advertise, backoff=self._backoff, on_retry=self._not_yet)
        while True:
            await asyncio.sleep(self.follow_interval)
            try:
                await self._advertise()
                self._last_follow_error = None
            except Exception as exc:  # the limit in force stays; the next look retries
                problem = describe(exc)
                if problem != self._last_follow_error:  # one line per distinct problem, not one per look
                    log.warning("node %s: cannot read the node's pod VM limit (the limit %s=%s stays): %s",
                                self.node_name, self.vm_limit.source, self.vm_limit.current(), problem,
                                exc_info=None if isinstance(exc, API_ERRORS) else exc)
                self._last_follow_error = problem

    async def close(self) -> None:
        """Stop retrying and close the API client. The capacity stays advertised (a restart keeps its pods)."""
        if self._advertiser is not None:
            self._advertiser.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._advertiser
        await self.events.close()
        await self.api.close()


async def connect_node(settings: Settings, vm_limit: VmLimit | None = None) -> NodeIntegration | None:
    """The daemon's Kubernetes integration, or None when no cluster is configured.

    Uses ``KUBECONFIG`` or the in-cluster service account from the settings'
    environment; raises ``cloudadaptor.k8s.client.KubeConfigError`` when one is
    named but unusable.
    """
    api = await connect(settings.provider_env)
    if api is None:
        log.info("no Kubernetes configuration (KUBECONFIG, in-cluster): no PeerPods, no node capacity")
        return None
    return NodeIntegration(api, settings, vm_limit=vm_limit)
