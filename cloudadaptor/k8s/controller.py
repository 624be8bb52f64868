"""The PeerPod controller (`cloud-api-adaptor peerpod-controller`): no VM outlives its pod.

One cluster-wide process (a Deployment) polls; each pass is ``reconcile()``:

1. **Finalize.** A PeerPod being deleted (``deletionTimestamp``) that still
   carries our finalizer means nobody deleted its VM — the adaptor died, the
   node vanished. Delete ``spec.instanceID`` through the provider
   (idempotent), then release the finalizer — but only after reading the
   instance: one without our owner tag and this cluster's tag (``CLUSTER_ID``,
   else the kube-system namespace uid), or outside the provider's scope (an
   Azure VM outside AZURE_RESOURCE_GROUP), is refused: logged, a Warning
   Event on the PeerPod, the finalizer released and the instance untouched.
2. **Orphaned PeerPods.** A PeerPod whose owner Pod is gone (or is another
   Pod of the same name) is deleted, then finalized as in 1 — the garbage
   collector would do the same, this does not depend on it.
3. **Sweep.** VMs tagged ``peerpods.io/owner=cloud-api-adaptor`` and
   ``peerpods.io/cluster=<this cluster>`` (plus every ``TAGS`` pair) that no
   PeerPod names and whose ``peerpods.io/pod`` is not a live Pod are deleted
   once they have been seen unreferenced for ``PEERPOD_SWEEP_GRACE``. A Pod is
   live while it exists and is neither Succeeded nor Failed; a Pod being
   deleted still counts (its VM may be in use until it is gone).

Every deletion is logged at warning level with its reason. An error in one
step is logged and reported, and the pass goes on; when the PeerPod list
itself cannot be read nothing is swept (nothing is known to be unreferenced).
An expected error (the API server's, the network's, the provider's) is one
log line; any other is a bug and is logged with its traceback once per object
until it changes, not every pass forever (``ErrorLog``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from cloudadaptor.config import Key, parse_bool, parse_duration

if TYPE_CHECKING:
    from cloudadaptor.metrics import ControllerMetrics
from cloudadaptor.k8s.client import API_ERRORS, describe
from cloudadaptor.k8s.peerpods import FINALIZER, JSON, PeerPodApi
from cloudadaptor.providers.base import (
    OWNER_VALUE, TAG_CLUSTER, TAG_NODE, TAG_OWNER, TAG_POD, TAG_POOL, TAG_SANDBOX, ForeignInstance, Instance, Provider,
    ProviderError, not_ours,
)
from cloudadaptor.retry import wait_or_stop

log = logging.getLogger(__name__)

KEYS: tuple[Key, ...] = (
    Key("PEERPOD_CONTROLLER_INTERVAL", parse_duration, 30.0, help="time between two reconcile passes (Go duration)"),
    Key("PEERPOD_SWEEP", parse_bool, True, help="delete tagged VMs that no PeerPod or live pod references"),
    Key("PEERPOD_SWEEP_GRACE", parse_duration, 600.0,
        help="how long a VM must be seen unreferenced before the sweep deletes it (Go duration)"),
    # The leader Lease (peerpod-controller, in the controller's namespace); the Deployment sets both from the pod.
    Key("POD_NAMESPACE", str, "openshift-sandboxed-containers-operator",
        help="namespace of the controller's leader election Lease (the Deployment sets it from the pod)"),
    Key("POD_NAME", str, "", help="this replica's identity in the leader Lease (default: host name and a random suffix)"),
)


@dataclass(frozen=True)
class ControllerOptions:
    provider_name: str
    cluster_id: str  # TAG_CLUSTER: only VMs carrying it are deleted
    sweep: bool = True
    sweep_grace: float = 600.0
    sweep_tags: Mapping[str, str] = field(default_factory=dict)  # TAGS: a VM must carry them too

    def __post_init__(self) -> None:
        if not self.cluster_id:
            raise ValueError("the controller needs this cluster's id (CLUSTER_ID or the kube-system namespace uid)")

    @classmethod
    def from_values(
        cls, values: Mapping[str, Any], provider_name: str, tags: Mapping[str, str], cluster_id: str,
    ) -> ControllerOptions:
        return cls(provider_name=provider_name, cluster_id=cluster_id, sweep=values["PEERPOD_SWEEP"],
                   sweep_grace=values["PEERPOD_SWEEP_GRACE"], sweep_tags=dict(tags))


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (*API_ERRORS, ProviderError)


@dataclass
class ErrorLog:
    """Logs the controller's errors. Expected ones (``EXPECTED_ERRORS``) are one line each time.

    Any other error is a bug: its traceback is logged the first time for a key
    (an object, a step) and again only when the error changes; repeats are one
    line. ``end_pass`` forgets keys that did not fail in the pass, so a bug that
    comes back logs its traceback again.
    """

    last: dict[str, str] = field(default_factory=dict)  # key -> "Type: message" of its last unexpected error
    failed_this_pass: set[str] = field(default_factory=set)

    def error(self, key: str, message: str, exc: BaseException) -> None:
        self.failed_this_pass.add(key)
        if isinstance(exc, EXPECTED_ERRORS):
            log.error("%s: %s", message, describe(exc))
            return
        signature = describe(exc)
        if self.last.get(key) == signature:
            log.error("%s: %s (unexpected; traceback logged before)", message, signature)
            return
        self.last[key] = signature
        log.error("%s: %s (unexpected)", message, signature, exc_info=exc)

    def end_pass(self) -> None:
        self.last = {key: value for key, value in self.last.items() if key in self.failed_this_pass}
        self.failed_this_pass = set()


@dataclass
class SweepState:
    """Carried between passes: when each unreferenced VM was first seen (``now`` units), and the error log."""

    first_seen: dict[str, float] = field(default_factory=dict)
    errors: ErrorLog = field(default_factory=ErrorLog)


@dataclass
class ReconcileReport:
    vms_deleted: list[str] = field(default_factory=list)
    finalizers_released: list[str] = field(default_factory=list)  # "namespace/name"
    peerpods_deleted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "namespace/name: instance: why" of deletes refused
    errors: list[str] = field(default_factory=list)
    error_log: ErrorLog = field(default_factory=ErrorLog, repr=False, compare=False)

    def failed(self, key: str, reported: str, logged: str, exc: BaseException) -> None:
        """Record an error of this pass: ``reported: <error>`` in ``errors``; ``logged`` goes to the log."""
        self.errors.append(f"{reported}: {describe(exc)}")
        self.error_log.error(key, logged, exc)


async def reconcile(
    peerpods: PeerPodApi, provider: Provider, options: ControllerOptions, state: SweepState, now: float
) -> ReconcileReport:
    """One pass of finalize, orphaned-PeerPod and sweep (see the module doc).

    Idempotent; safe to run concurrently with the adaptors (every delete is
    idempotent, finalizer updates are conditional). Raises only when the
    PeerPod list cannot be read; every other error is in the report.
    """
    report = ReconcileReport(error_log=state.errors)
    items = await peerpods.list_all()
    for item in items:
        if item["metadata"].get("deletionTimestamp"):
            await _finalize(peerpods, provider, options, item, report)
        else:
            await _delete_if_orphaned(peerpods, provider, options, item, report)
    if options.sweep:
        referenced = {(item.get("spec") or {}).get("instanceID") for item in items}
        await _sweep(peerpods, provider, options, state, referenced, now, report)
    return report


def _ref(item: JSON) -> str:
    return f"{item['metadata'].get('namespace', '')}/{item['metadata']['name']}"


async def _finalize(peerpods: PeerPodApi, provider: Provider, options: ControllerOptions, item: JSON, report: ReconcileReport) -> None:
    """Delete the VM of a PeerPod being deleted with our finalizer, then release the finalizer."""
    if FINALIZER not in (item["metadata"].get("finalizers") or []):
        return
    spec = item.get("spec") or {}
    instance_id = spec.get("instanceID") or ""
    if spec.get("cloudProvider") != options.provider_name:
        report.errors.append(f"PeerPod {_ref(item)}: cloud provider {spec.get('cloudProvider')!r} is not "
                             f"{options.provider_name!r}; VM {instance_id} left alone")
        log.error("%s", report.errors[-1])
        return
    try:
        if instance_id and await _ours_to_delete(peerpods, provider, options, item, instance_id, report):
            await provider.delete_instance(instance_id)
            report.vms_deleted.append(instance_id)
            log.warning("deleted VM %s of PeerPod %s (pod gone, the adaptor did not delete it)", instance_id, _ref(item))
        namespace, name = item["metadata"].get("namespace", ""), item["metadata"]["name"]
        if await peerpods.remove_finalizer(namespace, name):
            report.finalizers_released.append(_ref(item))
            log.info("PeerPod %s: finalizer released", _ref(item))
    except Exception as exc:  # reported; the pass goes on and the next one retries
        report.failed(f"finalize {_ref(item)}", f"PeerPod {_ref(item)}: VM {instance_id}",
                      f"finalizing PeerPod {_ref(item)} failed, retried next pass", exc)


async def _ours_to_delete(
    peerpods: PeerPodApi, provider: Provider, options: ControllerOptions, item: JSON, instance_id: str,
    report: ReconcileReport,
) -> bool:
    """Read the instance a PeerPod names: True when it exists and is this
    cluster's pod VM. Anything else is refused (logged, a Warning Event on the
    PeerPod) and False: a PeerPod is user-writable, so it must not be able to
    name someone else's instance for deletion."""
    try:
        instance = await provider.describe_instance(instance_id)
    except ForeignInstance as exc:
        why = str(exc)
    else:
        if instance is None:
            log.info("PeerPod %s: VM %s is already gone", _ref(item), instance_id)
            return False
        why = not_ours(instance, options.cluster_id) or ""
        if not why:
            return True
    message = f"VM {instance_id} not deleted: {why}"
    report.refused.append(f"{_ref(item)}: {message}")
    log.error("PeerPod %s names an instance that is not this cluster's pod VM; %s", _ref(item), message)
    try:
        await peerpods.warn(item, "InstanceNotOwned", message)
    except Exception as exc:  # the refusal stands without its Event
        log.warning("PeerPod %s: recording the Event failed: %s", _ref(item), describe(exc))
    return False


async def _delete_if_orphaned(
    peerpods: PeerPodApi, provider: Provider, options: ControllerOptions, item: JSON, report: ReconcileReport
) -> None:
    owners = [ref for ref in item["metadata"].get("ownerReferences") or [] if ref.get("kind") == "Pod"]
    if not owners:
        return
    owner, namespace = owners[0], item["metadata"].get("namespace", "")
    try:
        pod = await peerpods.pod(namespace, owner.get("name", ""))
        if pod is not None and pod.uid == owner.get("uid"):
            return
        log.warning("PeerPod %s: owner pod %s (uid %s) is gone; deleting the PeerPod", _ref(item), owner.get("name"), owner.get("uid"))
        deleted = await peerpods.delete(namespace, item["metadata"]["name"])
        report.peerpods_deleted.append(_ref(item))
    except Exception as exc:  # reported; the pass goes on
        report.failed(f"owner {_ref(item)}", f"PeerPod {_ref(item)}", f"checking the owner of PeerPod {_ref(item)} failed", exc)
        return
    if deleted is not None and deleted["metadata"].get("deletionTimestamp"):
        await _finalize(peerpods, provider, options, deleted, report)


async def _sweep(
    peerpods: PeerPodApi, provider: Provider, options: ControllerOptions, state: SweepState,
    referenced: set[str | None], now: float, report: ReconcileReport,
) -> None:
    try:
        instances = await provider.list_owned(
            {**options.sweep_tags, TAG_OWNER: OWNER_VALUE, TAG_CLUSTER: options.cluster_id})
    except Exception as exc:  # reported; nothing is known to be unreferenced, so nothing is swept
        report.failed("sweep", "listing owned VMs", "sweep: listing owned VMs failed", exc)
        return
    for instance in instances:
        if instance.id in referenced or await _pool_node_alive(peerpods, instance, report) \
                or await _pod_alive(peerpods, instance, report):
            state.first_seen.pop(instance.id, None)
            continue
        first = state.first_seen.setdefault(instance.id, now)
        if now - first < options.sweep_grace:
            continue
        try:
            await provider.delete_instance(instance.id)
        except Exception as exc:  # reported; the next pass retries
            report.failed(f"sweep {instance.id}", f"deleting orphan VM {instance.id}",
                          f"sweep: deleting orphan VM {instance.id} failed, retried next pass", exc)
            continue
        state.first_seen.pop(instance.id, None)
        report.vms_deleted.append(instance.id)
        log.warning("sweep: deleted orphan VM %s (%s): no PeerPod and no live pod for %.0fs (pod %s, node %s, sandbox %s)",
                    instance.id, instance.name, now - first, instance.tags.get(TAG_POD, "?"),
                    instance.tags.get(TAG_NODE, "?"), instance.tags.get(TAG_SANDBOX, "?"))
    listed = {instance.id for instance in instances}
    for gone in set(state.first_seen) - listed:
        del state.first_seen[gone]


async def _pool_node_alive(peerpods: PeerPodApi, instance: Instance, report: ReconcileReport) -> bool:
    """A warm-pool VM (``TAG_POOL``) is its node's adaptor's to keep or delete while that Node exists. True when unsure."""
    node = instance.tags.get(TAG_NODE, "")
    if not instance.tags.get(TAG_POOL) or not node:
        return False
    try:
        return await peerpods.node_exists(node)
    except Exception as exc:  # unsure: keep the VM
        report.failed(f"node {node}", f"VM {instance.id}: reading node {node}",
                      f"sweep: reading node {node} of pool VM {instance.id} failed; VM kept", exc)
        return True


async def _pod_alive(peerpods: PeerPodApi, instance: Instance, report: ReconcileReport) -> bool:
    """Is the VM's tagged pod a live Pod (on the tagged node)? True when unsure."""
    namespace, sep, name = instance.tags.get(TAG_POD, "").partition("/")
    if not (sep and namespace and name):
        return False
    try:
        pod = await peerpods.pod(namespace, name)
    except Exception as exc:  # unsure: keep the VM
        report.failed(f"pod {namespace}/{name}", f"VM {instance.id}: reading pod {namespace}/{name}",
                      f"sweep: reading pod {namespace}/{name} of VM {instance.id} failed; VM kept", exc)
        return True
    if pod is None or pod.phase in ("Succeeded", "Failed"):
        return False
    node = instance.tags.get(TAG_NODE)
    return not (node and pod.node_name and pod.node_name != node)


async def run(
    peerpods: PeerPodApi, provider: Provider, options: ControllerOptions, *,
    interval: float, stop: asyncio.Event, once: bool = False, metrics: ControllerMetrics | None = None,
) -> ReconcileReport | None:
    """Reconcile every ``interval`` seconds until ``stop`` is set (or once). Returns the last report.
    Each pass is counted in ``metrics`` when given."""
    state = SweepState()
    report: ReconcileReport | None = None
    while not stop.is_set():
        try:
            report = await reconcile(peerpods, provider, options, state, time.monotonic())
            if metrics is not None:
                metrics.pass_done(len(report.vms_deleted), len(report.finalizers_released),
                                  len(report.peerpods_deleted), len(report.errors))
            if report.vms_deleted or report.errors:
                log.info("pass: %d VM(s) deleted, %d finalizer(s) released, %d error(s)",
                         len(report.vms_deleted), len(report.finalizers_released), len(report.errors))
        except Exception as exc:  # the controller outlives a bad pass
            state.errors.error("pass", "reconcile pass failed (nothing swept)", exc)
            if metrics is not None:
                metrics.pass_failed()
        state.errors.end_pass()
        if once:
            break
        await wait_or_stop(stop, interval)
    return report
