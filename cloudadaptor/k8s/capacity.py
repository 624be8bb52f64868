"""The per-node pod VM limit: the extended resource ``kata.peerpods.io/vm``.

The adaptor advertises ``PEERPODS_LIMIT_PER_NODE`` as the node's capacity and
allocatable of ``kata.peerpods.io/vm``; the mutating webhook makes every
peer pod request one, so the scheduler places at most that many peer pods on
a node. (The lifecycle refuses a StartVM beyond the limit as a second line of
defence.)
"""

from __future__ import annotations

import logging

from kubernetes_asyncio import client as k8s

log = logging.getLogger(__name__)

VM_RESOURCE = "kata.peerpods.io/vm"
MERGE_PATCH = "application/merge-patch+json"


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
