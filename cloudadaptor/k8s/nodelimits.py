"""The PeerPodConfig controller: every selected node's ``kata.peerpods.io/vm`` follows its config's limit.

Runs in the peerpod-controller's process (``k8s/command.py``), while it holds
the leader Lease (``k8s/leader.py``). Each pass (``NodeLimitController.reconcile``,
every ``interval`` seconds, 2 s by default — a patched limit reaches the nodes
within seconds):

1. list the PeerPodConfigs and the Nodes; ``peerpodconfig.plan`` decides each
   node's limit (lowest limit wins where configs overlap; an invalid config
   leaves its nodes as they are; a never-selected node is never touched);
2. write each node that differs: capacity and allocatable through the status
   subresource first, then the annotation ``peerpods.io/peerpodconfig``
   naming the config (the adaptor on the node follows it,
   ``capacity.NodeLimitFollower``); removal in the opposite order;
3. count the pod VMs each node runs (its PeerPods) and write every config's
   status: the nodes it applies to and since when, overlaps with other
   configs, nodes running more VMs than the limit (they keep running: nothing
   here stops a pod; new peer pods wait, the scheduler sees less capacity),
   and a condition ``Applied``. A changed condition is also an Event on the
   PeerPodConfig (Warning unless the reason is ``Applied``).

Idempotent: a pass that changes nothing writes nothing. An error on one node
or one status is logged and reported; the pass goes on.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from cloudadaptor.k8s.capacity import (
    CONFIG_ANNOTATION, MERGE_PATCH, UNSELECTED, VM_RESOURCE, advertise_vm_capacity, remove_vm_capacity,
)
from cloudadaptor.k8s.client import API_ERRORS, describe
from cloudadaptor.k8s.peerpodconfig import (
    API_VERSION, KIND, PLURAL, ConfigSpec, Desired, Invalid, NodeView, Plan, parse, plan, ref_of,
)
from cloudadaptor.k8s.peerpods import ANN_NODE, GROUP, VERSION, PeerPodApi
from cloudadaptor.retry import wait_or_stop

log = logging.getLogger(__name__)

JSON = dict[str, Any]
INTERVAL = 2.0
CONDITION = "Applied"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class NodeLimitReport:
    nodes_changed: list[str] = field(default_factory=list)  # "node: what"
    statuses_written: list[str] = field(default_factory=list)  # namespace/name
    errors: list[str] = field(default_factory=list)


class NodeLimitController:
    """Applies PeerPodConfigs to nodes (see the module docstring)."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self.api = api
        self.core = k8s.CoreV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)
        self.peerpods = PeerPodApi(api)

    async def reconcile(self) -> NodeLimitReport:
        """One pass. Raises only when the PeerPodConfigs or the Nodes cannot be listed (nothing changes then)."""
        report = NodeLimitReport()
        try:
            items = (await self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)).get("items") or []
        except ApiException as exc:
            if exc.status != 404:
                raise
            items = []  # the CRD is not installed: no PeerPodConfig exists, the adaptors' limits apply
        nodes = (await self.core.list_node()).items
        configs = [parse(item) for item in items]
        views = [NodeView(n.metadata.name, n.metadata.labels or {}, (n.metadata.annotations or {}).get(CONFIG_ANNOTATION))
                 for n in nodes]
        decided = plan(configs, views)
        failed: dict[str, str] = {}
        for node in nodes:
            desired = decided.desired.get(node.metadata.name)
            if desired is not None:
                try:
                    await self._apply(node, desired, report)
                except API_ERRORS as exc:
                    failed[node.metadata.name] = describe(exc)
                    report.errors.append(f"node {node.metadata.name}: {describe(exc)}")
                    log.error("node %s: applying the PeerPodConfig limit failed (retried next pass): %s",
                              node.metadata.name, describe(exc))
        running = await self._running(report)
        for item, config in zip(items, configs):
            try:
                await self._write_status(item, config, decided, running, failed, report)
            except API_ERRORS as exc:
                report.errors.append(f"PeerPodConfig {ref_of(item)}: status: {describe(exc)}")
                log.error("PeerPodConfig %s: writing the status failed: %s", ref_of(item), describe(exc))
        return report

    # ------------------------------------------------------------------ nodes
    async def _apply(self, node: Any, desired: Desired, report: NodeLimitReport) -> None:
        name = node.metadata.name
        annotation = (node.metadata.annotations or {}).get(CONFIG_ANNOTATION)
        status = node.status
        have = ((status.capacity if status else None) or {}).get(VM_RESOURCE), \
            ((status.allocatable if status else None) or {}).get(VM_RESOURCE)
        if desired.limit is not None:  # capacity first: the adaptor reads it once the annotation appears
            if have != (str(desired.limit), str(desired.limit)):
                await advertise_vm_capacity(self.api, name, desired.limit)
                report.nodes_changed.append(f"{name}: {VM_RESOURCE}={desired.limit}")
            await self._annotate(name, annotation, desired.annotation, report)
            return
        if desired.annotation == UNSELECTED:  # mark first: the adaptor then enforces 0 and advertises nothing
            await self._annotate(name, annotation, desired.annotation, report)
        if have != (None, None):
            await remove_vm_capacity(self.api, name)
            report.nodes_changed.append(f"{name}: {VM_RESOURCE} removed")
        if desired.annotation is None:  # handed back: its adaptor advertises PEERPODS_LIMIT_PER_NODE again
            await self._annotate(name, annotation, None, report)

    async def _annotate(self, name: str, have: str | None, want: str | None, report: NodeLimitReport) -> None:
        if have == want:
            return
        await self.core.patch_node(name, {"metadata": {"annotations": {CONFIG_ANNOTATION: want}}},
                                   _content_type=MERGE_PATCH)
        report.nodes_changed.append(f"{name}: {CONFIG_ANNOTATION}={want}")
        log.info("node %s: %s=%s", name, CONFIG_ANNOTATION, want)

    async def _running(self, report: NodeLimitReport) -> dict[str, int]:
        """Pod VMs per node: the PeerPods not being deleted, by their node annotation. {} when unreadable."""
        try:
            items = await self.peerpods.list_all()
        except API_ERRORS as exc:
            report.errors.append(f"listing PeerPods: {describe(exc)}")
            return {}
        counts: dict[str, int] = {}
        for item in items:
            meta = item.get("metadata") or {}
            node = (meta.get("annotations") or {}).get(ANN_NODE)
            if node and not meta.get("deletionTimestamp"):
                counts[node] = counts.get(node, 0) + 1
        return counts

    # ---------------------------------------------------------------- statuses
    async def _write_status(self, item: JSON, config: ConfigSpec | Invalid, decided: Plan, running: dict[str, int],
                            failed: dict[str, str], report: NodeLimitReport) -> None:
        old = dict(item.get("status") or {})
        new = _status(item, config, decided, running, failed, old)
        if _comparable(new) == _comparable(old):
            return
        meta = item["metadata"]
        patch = {key: None for key in old if key not in new}
        patch.update(new)
        await self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], {"status": patch}, _content_type=MERGE_PATCH)
        report.statuses_written.append(ref_of(item))
        before, after = _condition(old), _condition(new)
        if (before.get("reason"), before.get("message")) != (after.get("reason"), after.get("message")):
            await self._event(item, after["reason"], after["message"])

    async def _event(self, item: JSON, reason: str, message: str) -> None:
        meta = item["metadata"]
        kind = "Normal" if reason == CONDITION else "Warning"
        (log.info if kind == "Normal" else log.warning)("PeerPodConfig %s: %s: %s", ref_of(item), reason, message)
        try:
            await self.core.create_namespaced_event(meta["namespace"], {
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                                   "namespace": meta["namespace"], "uid": meta.get("uid")},
                "type": kind, "reason": reason, "message": message[:1024],
                "source": {"component": "peerpod-controller"}, "reportingComponent": "peerpod-controller",
                "firstTimestamp": _now(), "lastTimestamp": _now(), "count": 1,
            })
        except API_ERRORS as exc:  # the status says it all the same
            log.warning("PeerPodConfig %s: recording the Event failed: %s", ref_of(item), describe(exc))


def _condition(status: JSON) -> JSON:
    return next((c for c in status.get("conditions") or [] if c.get("type") == CONDITION), {})


def _comparable(status: JSON) -> JSON:
    """A status without its timestamps: equal ones need no write."""
    clone = {k: v for k, v in status.items() if k != "appliedAt"}
    clone["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []]
    return clone


def _status(item: JSON, config: ConfigSpec | Invalid, decided: Plan, running: dict[str, int],
            failed: dict[str, str], old: JSON) -> JSON:
    """The status a PeerPodConfig should have after this pass."""
    generation = (item.get("metadata") or {}).get("generation")
    if isinstance(config, Invalid):  # the nodes are left as they were, and so is what the status says of them
        new = {k: v for k, v in old.items() if k in ("limit", "nodes", "appliedAt")}
        message = "; ".join(config.problems) + "; nodes left as they were"
        return {**new, "observedGeneration": generation, "conditions": [_cond(old, "False", "InvalidSpec", message)]}
    nodes = sorted(n for n, d in decided.desired.items() if d.annotation == config.ref)
    conflicts = [{"node": n, "peerPodConfigs": [c.ref for c in cs], "winner": cs[0].ref, "appliedLimit": str(cs[0].limit)}
                 for n, cs in sorted(decided.contenders.items()) if len(cs) > 1 and config in cs]
    above = [{"node": n, "running": running[n], "limit": str(config.limit)}
             for n in nodes if running.get(n, 0) > config.limit]
    new: JSON = {"observedGeneration": generation, "limit": str(config.limit), "nodes": nodes}
    changed = (old.get("limit"), old.get("nodes")) != (new["limit"], nodes)
    new["appliedAt"] = _now() if changed or not old.get("appliedAt") else old["appliedAt"]
    if conflicts:
        new["conflicts"] = conflicts
    if above:
        new["aboveLimit"] = above
    reason, parts = CONDITION, [f"limit {config.limit} on {len(nodes)} node(s)"]
    errors = [f"node {n}: {failed[n]}" for n in nodes if n in failed]
    if errors:
        reason = "NodeUpdateFailed"
        parts.append("not yet applied to " + "; ".join(errors) + " (retried)")
    for c in conflicts:
        reason = reason if reason != CONDITION else "NodeConflict"
        parts.append(f"node {c['node']} is selected by {', '.join(c['peerPodConfigs'])}: "
                     f"the lowest limit {c['appliedLimit']} ({c['winner']}) applies until that is resolved")
    for a in above:
        reason = reason if reason != CONDITION else "AboveLimit"
        parts.append(f"node {a['node']} runs {a['running']} pod VMs, more than the limit {a['limit']}: "
                     "they keep running, new peer pods wait until fewer run")
    status = "True" if reason in (CONDITION, "AboveLimit", "NodeConflict") else "False"
    new["conditions"] = [_cond(old, status, reason, "; ".join(parts))]
    return new


def _cond(old: JSON, status: str, reason: str, message: str) -> JSON:
    before = _condition(old)
    same = (before.get("status"), before.get("reason")) == (status, reason)
    return {"type": CONDITION, "status": status, "reason": reason, "message": message[:4096],
            "lastTransitionTime": before.get("lastTransitionTime") if same and before.get("lastTransitionTime") else _now()}


async def run(controller: NodeLimitController, *, stop: asyncio.Event, interval: float = INTERVAL,
              once: bool = False) -> NodeLimitReport | None:
    """Reconcile every ``interval`` seconds until ``stop`` is set (or once). Returns the last report."""
    report = None
    while not stop.is_set():
        try:
            report = await controller.reconcile()
            if report.nodes_changed:
                log.info("PeerPodConfig pass: %s", "; ".join(report.nodes_changed))
        except Exception as exc:  # the controller outlives a bad pass; nothing was changed
            log.error("PeerPodConfig pass failed (nodes unchanged): %s", describe(exc),
                      exc_info=None if isinstance(exc, API_ERRORS) else exc)
        if once:
            break
        await wait_or_stop(stop, interval)
    return report
