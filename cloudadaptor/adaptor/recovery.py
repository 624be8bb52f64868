"""After a restart: finish or undo what the last run left, from its records and tags.

Record-before-act in ``SandboxLifecycle`` means every VM, tunnel and agent
socket a crash can leave behind is named by a store row, a provider tag
(``TAG_NODE``/``TAG_SANDBOX``) or a tunnel device named after a row's VNI;
these functions walk those three and converge on "only what a live record
owns exists".
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from cloudadaptor.adaptor.errors import LifecycleError
from cloudadaptor.adaptor.poolstore import PoolStore
from cloudadaptor.adaptor.store import Sandbox, SandboxState
from cloudadaptor.providers import base as providers

if TYPE_CHECKING:
    from cloudadaptor.adaptor.lifecycle import LifecycleOptions, SandboxLifecycle

log = logging.getLogger("cloudadaptor.adaptor.lifecycle")


async def recover(lifecycle: SandboxLifecycle) -> list[str]:
    """Re-serve running sandboxes, undo interrupted starts, finish interrupted
    stops, remove tunnels of sandboxes not running, and delete VMs tagged for
    this node and tunnel devices in the worker netns that no record owns.

    Returns one line per action taken (also logged). A stop that still fails
    is reported and its record kept for the next attempt; it does not abort
    the rest.
    """
    # Sandboxes are independent (each has its own lock, VM and tunnel): recover them at once, so a
    # restart after a crash mid-burst waits for one VM deletion, not one per interrupted pod.
    results = await asyncio.gather(*(_recover_one(lifecycle, sandbox) for sandbox in lifecycle.store.all()),
                                   return_exceptions=True)
    for result in results:  # as before: an unexpected error aborts recovery (the daemon does not start)
        if isinstance(result, BaseException):
            raise result
    actions = [line for line in results if isinstance(line, str)]
    actions.extend(await lifecycle.network.remove_stale(lifecycle.store))
    actions.extend(await sweep_orphans(lifecycle))
    for line in actions:
        log.info("recover: %s", line)
    return actions


async def _recover_one(lifecycle: SandboxLifecycle, sandbox: Sandbox) -> str | None:
    """What ``recover`` does for one sandbox row; the line saying so (None: nothing to do)."""
    if sandbox.state is SandboxState.RUNNING and sandbox.vm_ips:
        await lifecycle.serve_agent(sandbox).start()
        return f"sandbox {sandbox.id}: re-serving agent proxy for VM {sandbox.instance_id}"
    if sandbox.state is SandboxState.STARTING or (sandbox.state is SandboxState.FAILED and sandbox.instance_id):
        done = await lifecycle.rollback_start(sandbox.id, "daemon restarted during StartVM", cause="recovery")
        return f"sandbox {sandbox.id}: interrupted start, {done}"
    if sandbox.state is SandboxState.STOPPING:
        try:
            await lifecycle.stop(sandbox.id)
            return f"sandbox {sandbox.id}: finished interrupted stop"
        except LifecycleError as exc:
            return f"sandbox {sandbox.id}: stop still failing: {exc.message}"
    return None


async def sweep_orphans(lifecycle: SandboxLifecycle) -> list[str]:
    """Delete VMs tagged as ours on this node of this cluster that no sandbox record (or start in progress)
    or pool row owns.

    Idempotent; a VM whose sandbox is known is left to that sandbox's StopVM
    (which finds it by tag). A failed delete raises (the provider's error).
    """
    owned = await lifecycle.provider.list_owned(owned_tags(lifecycle.options))
    rows = lifecycle.store.all()
    known = {s.id for s in rows} | lifecycle.starting_ids()
    # A warm-pool VM is the pool's while its row exists, a sandbox's once claimed (its instance id recorded).
    pooled = {vm.name for vm in PoolStore(lifecycle.store).all()}
    claimed = {s.instance_id for s in rows} - {""}
    actions = []
    for instance in owned:
        sandbox_id = instance.tags.get(providers.TAG_SANDBOX, "")
        if sandbox_id in known or instance.id in claimed or instance.tags.get(providers.TAG_POOL, "") in pooled:
            continue
        await lifecycle.provider.delete_instance(instance.id)
        lifecycle.recorder.vms_deleted("orphan_sweep")
        actions.append(f"deleted orphan VM {instance.id} (sandbox {sandbox_id or '?'})")
    return actions


def owned_tags(options: LifecycleOptions) -> dict[str, str]:
    """What every list-to-delete of this node requires: our owner tag, this
    node's and this cluster's (node names collide between clusters)."""
    return {providers.TAG_OWNER: providers.OWNER_VALUE, providers.TAG_NODE: options.node_name,
            providers.TAG_CLUSTER: _cluster(options)}


def vm_tags(options: LifecycleOptions) -> dict[str, str]:
    """The operator's TAGS plus the cluster tag (ours wins); ``instance_spec`` adds the rest."""
    return {**options.extra_tags, providers.TAG_CLUSTER: _cluster(options)}


def _cluster(options: LifecycleOptions) -> str:
    if not options.cluster_id:  # an empty tag would match every cluster's VMs
        raise ValueError("LifecycleOptions.cluster_id is required: it tells this cluster's VMs from others'")
    return options.cluster_id
