"""The per-node pod VM limit: the extended resource ``kata.peerpods.io/vm``.

The node's capacity and allocatable of ``kata.peerpods.io/vm`` is the number
of pod VMs it may run; the mutating webhook makes every peer pod request one,
so the scheduler places at most that many peer pods on a node. (The
lifecycle refuses a StartVM beyond the limit as a second line of defence.)

Who writes it — never both:

- the **peerpod-controller**, on a node a PeerPodConfig selects: it writes the
  config's ``spec.limit`` and marks the node with the annotation
  ``peerpods.io/peerpodconfig: <namespace>/<name>``; on a node that stopped
  matching while PeerPodConfigs exist it removes the resource and writes
  ``none`` (``cloudadaptor.k8s.nodelimits``);
- else the node's **adaptor**, which advertises ``PEERPODS_LIMIT_PER_NODE``.

``NodeLimitFollower.sync`` is the adaptor's half: it reads its own Node, and
while the annotation is there it advertises nothing and enforces the node's
capacity (``none`` or no resource: 0); without the annotation it enforces
and advertises ``PEERPODS_LIMIT_PER_NODE``.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from kubernetes_asyncio import client as k8s

from cloudadaptor.vmlimit import VmLimit

log = logging.getLogger(__name__)

VM_RESOURCE = "kata.peerpods.io/vm"
MERGE_PATCH = "application/merge-patch+json"
# On a Node: the PeerPodConfig (namespace/name) whose limit the node has, or UNSELECTED.
CONFIG_ANNOTATION = "peerpods.io/peerpodconfig"
UNSELECTED = "none"  # PeerPodConfigs exist and none selects the node: no pod VMs here


async def advertise_vm_capacity(api: k8s.ApiClient, node_name: str, limit: int) -> None:
    """Set status.capacity and status.allocatable ``kata.peerpods.io/vm`` = ``limit`` on ``node_name``.

    A JSON merge patch of the node's status subresource: idempotent, touches no
    other resource, needs no resourceVersion (so no conflicts). Raises the
    client's ``ApiException`` on failure (404 when the node does not exist).
    """
    value = str(limit)
    patch = {"status": {"capacity": {VM_RESOURCE: value}, "allocatable": {VM_RESOURCE: value}}}
    await k8s.CoreV1Api(api).patch_node_status(node_name, patch, _content_type=MERGE_PATCH)
    log.info("node %s: advertised %s = %s", node_name, VM_RESOURCE, value)


async def node_vm_capacity(api: k8s.ApiClient, node_name: str) -> tuple[str | None, str | None]:
    """(capacity, allocatable) of ``kata.peerpods.io/vm`` on the node, None where unset."""
    node = await k8s.CoreV1Api(api).read_node_status(node_name)
    status = node.status
    capacity = (status.capacity or {}).get(VM_RESOURCE) if status else None
    allocatable = (status.allocatable or {}).get(VM_RESOURCE) if status else None
    return capacity, allocatable


async def remove_vm_capacity(api: k8s.ApiClient, node_name: str) -> None:
    """Remove ``kata.peerpods.io/vm`` from the node's capacity and allocatable (merge patch with null)."""
    patch = {"status": {"capacity": {VM_RESOURCE: None}, "allocatable": {VM_RESOURCE: None}}}
    await k8s.CoreV1Api(api).patch_node_status(node_name, patch, _content_type=MERGE_PATCH)
    log.info("node %s: removed %s", node_name, VM_RESOURCE)


def managed_limit(annotation: str, capacity: str | None) -> int:
    """The limit on a node a PeerPodConfig manages: its capacity; 0 when unselected or without the resource."""
    if annotation == UNSELECTED or capacity is None or not capacity.isdigit():
        return 0
    return int(capacity)


class NodeLimitFollower:
    """The adaptor's view of its node's limit (see the module docstring); ``sync()`` is one look."""

    def __init__(self, api: k8s.ApiClient, node_name: str, limit: VmLimit) -> None:
        self.core = k8s.CoreV1Api(api)
        self.api = api
        self.node_name = node_name
        self.limit = limit

    async def sync(self, advertise: "AdvertiseFn | None" = None) -> None:
        """Read the node, update ``limit``; advertise the fallback when no PeerPodConfig manages the node
        and the node does not already say it. Raises the client's errors (the caller retries)."""
        node = await self.core.read_node(self.node_name)
        annotation = (node.metadata.annotations or {}).get(CONFIG_ANNOTATION)
        capacity = ((node.status.capacity if node.status else None) or {}).get(VM_RESOURCE)
        if annotation is not None:
            value = managed_limit(annotation, capacity)
            source = "PeerPodConfig selection (this node is not selected)" if annotation == UNSELECTED \
                else f"PeerPodConfig {annotation} spec.limit"
            if self.limit.follow(value, source):
                log.info("node %s: pod VM limit %d, set by %s", self.node_name, value, source)
            return
        if self.limit.use_fallback():
            log.info("node %s: no PeerPodConfig manages it: pod VM limit PEERPODS_LIMIT_PER_NODE=%s",
                     self.node_name, self.limit.fallback)
        if self.limit.fallback is not None and capacity != str(self.limit.fallback):
            await (advertise or advertise_vm_capacity)(self.api, self.node_name, self.limit.fallback)


AdvertiseFn = Callable[[k8s.ApiClient, str, int], Awaitable[None]]
