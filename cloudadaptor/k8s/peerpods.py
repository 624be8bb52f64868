"""PeerPod objects: one per pod VM, owned by its Pod, holding a finalizer until the VM is gone.

A PeerPod (``confidentialcontainers.org/v1alpha1``, namespaced, in the pod's
namespace) says "pod VM ``spec.instanceID`` of ``spec.cloudProvider`` belongs
to this Pod". Its ownerReference makes the garbage collector delete it with
the Pod; its finalizer keeps it (with a ``deletionTimestamp``) until someone
has deleted the VM: the adaptor after StopVM, or — when the adaptor died or
the node vanished — the PeerPod controller (``cloudadaptor.k8s.controller``).

``PeerPodApi`` is the thin typed seam over the API client; ``PeerPodTracker``
is the adaptor's ``SandboxObserver`` (cloudadaptor.adaptor.hooks) that creates
and releases PeerPods and never fails a pod because Kubernetes is unwell.
"""

from __future__ import annotations

import datetime
import logging
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from cloudadaptor.k8s.client import API_ERRORS, describe, is_conflict, is_not_found, retry_on_conflict, status_of
from cloudadaptor.providers.base import TAG_NODE, TAG_SANDBOX
from cloudadaptor.retry import Backoff, RetryTimeout, retry_until

log = logging.getLogger(__name__)
T = TypeVar("T")

GROUP = "confidentialcontainers.org"
VERSION = "v1alpha1"
PLURAL = "peerpods"
KIND = "PeerPod"
API_VERSION = f"{GROUP}/{VERSION}"
FINALIZER = "peerpods.confidentialcontainers.org/finalizer"
MANAGED_BY = "cloud-api-adaptor"
# Annotations on a PeerPod (the same keys as the VM tags).
ANN_SANDBOX = TAG_SANDBOX
ANN_NODE = TAG_NODE

JSON = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"


def peerpod_name(pod_name: str, sandbox_id: str) -> str:
    """``<pod name>-<first 8 of sandbox id>``: one PeerPod per sandbox, a valid object name."""
    suffix = re.sub(r"[^a-z0-9]", "", sandbox_id.lower())[:8] or "0"
    base = pod_name[: 253 - len(suffix) - 1].rstrip(".-")
    return f"{base}-{suffix}" if base else suffix


@dataclass(frozen=True)
class PodRef:
    """What the PeerPod code needs of a Pod."""

    namespace: str
    name: str
    uid: str
    node_name: str | None
    phase: str | None
    deleting: bool


def peerpod_body(*, name: str, pod: PodRef, sandbox_id: str, node_name: str, instance_id: str, provider_name: str) -> JSON:
    """The PeerPod to create: owned by ``pod``, with our finalizer."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": pod.namespace,
            "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
            "annotations": {ANN_SANDBOX: sandbox_id, ANN_NODE: node_name},
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Pod", "name": pod.name, "uid": pod.uid,
                "controller": False, "blockOwnerDeletion": False,
            }],
            "finalizers": [FINALIZER],
        },
        "spec": {"cloudProvider": provider_name, "instanceID": instance_id},
    }


async def none_if_gone(call: Awaitable[T]) -> T | None:
    """The call's result, or None when the API answers 404 Not Found; other errors propagate."""
    try:
        return await call
    except ApiException as exc:
        if is_not_found(exc):
            return None
        raise


class PeerPodApi:
    """PeerPod and Pod reads and writes. Errors are the client's ``ApiException``;
    "not found" is returned as None where the docstring says so."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self._custom = k8s.CustomObjectsApi(api)
        self._core = k8s.CoreV1Api(api)

    async def pod(self, namespace: str, name: str) -> PodRef | None:
        """The Pod, or None when it does not exist."""
        pod = await none_if_gone(self._core.read_namespaced_pod(name, namespace))
        if pod is None:
            return None
        return PodRef(
            namespace=namespace, name=name, uid=pod.metadata.uid,
            node_name=pod.spec.node_name if pod.spec else None,
            phase=pod.status.phase if pod.status else None,
            deleting=pod.metadata.deletion_timestamp is not None,
        )

    async def node_exists(self, name: str) -> bool:
        """Whether the Node ``name`` exists (a warm pool's VMs belong to its adaptor while it does)."""
        return await none_if_gone(self._core.read_node(name)) is not None

    async def get(self, namespace: str, name: str) -> JSON | None:
        """The PeerPod, or None when it does not exist."""
        return await none_if_gone(self._custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))

    async def list_all(self) -> list[JSON]:
        """Every PeerPod in every namespace."""
        result = await self._custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        return list(result.get("items") or [])

    async def create(self, body: JSON) -> JSON:
        """Create; raises the 409 AlreadyExists error when the name is taken."""
        namespace = body["metadata"]["namespace"]
        return await self._custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    async def patch(self, namespace: str, name: str, patch: JSON) -> JSON:
        """JSON merge patch; put ``metadata.resourceVersion`` in it to make it conditional (409 when stale)."""
        return await self._custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, patch, _content_type=MERGE_PATCH)

    async def delete(self, namespace: str, name: str) -> JSON | None:
        """Delete (the API keeps it, being deleted, while finalizers remain); None when already gone."""
        return await none_if_gone(self._custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))

    async def remove_finalizer(self, namespace: str, name: str) -> bool:
        """Take our finalizer off (re-read and re-apply on conflicts). True if it was there.

        Idempotent: a PeerPod that is gone or carries no finalizer of ours is left alone.
        """
        async def attempt() -> bool:
            current = await self.get(namespace, name)
            finalizers = list((current or {}).get("metadata", {}).get("finalizers") or [])
            if current is None or FINALIZER not in finalizers:
                return False
            remaining = [f for f in finalizers if f != FINALIZER]
            patch = {"metadata": {"resourceVersion": current["metadata"]["resourceVersion"], "finalizers": remaining}}
            return await none_if_gone(self.patch(namespace, name, patch)) is not None

        return await retry_on_conflict(attempt)

    async def cluster_uid(self) -> str:
        """The uid of namespace ``kube-system``: stable for the cluster's life, distinct between clusters."""
        namespace = await self._core.read_namespace("kube-system")
        return str(namespace.metadata.uid)

    async def warn(self, item: JSON, reason: str, message: str) -> None:
        """A Warning Event on the PeerPod ``item`` (what ``kubectl describe`` shows)."""
        meta = item["metadata"]
        now = datetime.datetime.now(datetime.timezone.utc)
        await self._core.create_namespaced_event(meta.get("namespace", ""), {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta.get("namespace", "")},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                               "namespace": meta.get("namespace", ""), "uid": meta.get("uid")},
            "type": "Warning", "reason": reason, "message": message[:1024],
            "source": {"component": "peerpod-controller"}, "reportingComponent": "peerpod-controller",
            "firstTimestamp": now.isoformat(), "lastTimestamp": now.isoformat(), "count": 1,
        })


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the API server is busy or unreachable (5xx, 429, connection errors)."""
    status = status_of(exc)
    if status is not None:
        return status == 429 or status >= 500
    return isinstance(exc, (aiohttp.ClientError, OSError, TimeoutError))


class PeerPodTracker:
    """Records pod VMs as PeerPods. Implements ``cloudadaptor.adaptor.hooks.SandboxObserver``.

    Both methods block for at most ``timeout`` seconds (transient API errors
    are retried within it), log any failure and never raise one (cancellation
    propagates): a missing PeerPod only means the controller's sweep, not the
    finalizer, will catch an orphaned VM.
    """

    def __init__(self, api: k8s.ApiClient, *, node_name: str, timeout: float = 10.0) -> None:
        self.peerpods = PeerPodApi(api)
        self.node_name = node_name
        self.timeout = timeout

    async def vm_created(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str, provider_name: str,
                         instance_type: str = "") -> None:
        """Create the pod's PeerPod (owned by the Pod, with our finalizer) for ``instance_id``.

        Idempotent: a PeerPod already there is updated to this instance. No-op for
        a sandbox without pod name/namespace (not started by Kubernetes).
        """
        if not (pod_namespace and pod_name):
            log.debug("sandbox %s has no pod name/namespace: no PeerPod", sandbox_id)
            return
        name = peerpod_name(pod_name, sandbox_id)
        await self._never_raising(
            lambda: self._create(sandbox_id, pod_namespace, pod_name, name, instance_id, provider_name),
            f"PeerPod {pod_namespace}/{name} for VM {instance_id} not recorded (the controller's sweep covers the VM)")

    async def vm_deleted(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str) -> None:
        """The VM is gone: release our finalizer and delete the PeerPod.

        A PeerPod that names another instance is left alone; a missing one is fine.
        """
        if not (pod_namespace and pod_name):
            return
        name = peerpod_name(pod_name, sandbox_id)
        await self._never_raising(
            lambda: self._release(pod_namespace, name, instance_id),
            f"PeerPod {pod_namespace}/{name} not released (the controller releases it when the pod goes)")

    async def _never_raising(self, operation: Callable[[], Awaitable[None]], failure: str) -> None:
        """``operation``, retried on transient API errors within ``timeout``; a failure is logged, never raised.

        An API or network failure is one warning line; anything else is a bug
        and is logged with its traceback. Cancellation propagates.
        """
        try:
            await retry_until(self.timeout, operation, backoff=Backoff(initial=0.2, maximum=2.0), retryable=is_transient)
        except (RetryTimeout, *API_ERRORS) as exc:
            log.warning("%s: %s", failure, _why(exc))
        except Exception:
            log.exception("%s: unexpected error", failure)

    async def _create(self, sandbox_id: str, namespace: str, pod_name: str, name: str, instance_id: str, provider: str) -> None:
        pod = await self.peerpods.pod(namespace, pod_name)
        if pod is None:
            log.warning("pod %s/%s is gone: no PeerPod for VM %s (the controller's sweep covers it)", namespace, pod_name, instance_id)
            return
        body = peerpod_body(name=name, pod=pod, sandbox_id=sandbox_id, node_name=self.node_name,
                            instance_id=instance_id, provider_name=provider)
        try:
            await self.peerpods.create(body)
            log.info("PeerPod %s/%s records VM %s", namespace, name, instance_id)
            return
        except ApiException as exc:
            if not is_conflict(exc):
                raise
        await retry_on_conflict(lambda: self._adopt(namespace, name, body))

    async def _adopt(self, namespace: str, name: str, body: JSON) -> None:
        """A PeerPod of that name exists: point it at our instance, with our finalizer."""
        current = await self.peerpods.get(namespace, name)
        if current is None:
            await self.peerpods.create(body)
            return
        meta = current["metadata"]
        if meta.get("deletionTimestamp"):
            log.warning("PeerPod %s/%s is being deleted; VM %s is left to the controller's sweep",
                        namespace, name, body["spec"]["instanceID"])
            return
        finalizers = list(meta.get("finalizers") or [])
        if current.get("spec") == body["spec"] and FINALIZER in finalizers:
            return
        if FINALIZER not in finalizers:
            finalizers.append(FINALIZER)
        await self.peerpods.patch(namespace, name, {
            "metadata": {"resourceVersion": meta["resourceVersion"], "finalizers": finalizers,
                         "annotations": body["metadata"]["annotations"]},
            "spec": body["spec"],
        })
        log.info("PeerPod %s/%s now records VM %s", namespace, name, body["spec"]["instanceID"])

    async def _release(self, namespace: str, name: str, instance_id: str) -> None:
        current = await self.peerpods.get(namespace, name)
        if current is None:
            return
        recorded = (current.get("spec") or {}).get("instanceID")
        if instance_id and recorded and recorded != instance_id:
            log.warning("PeerPod %s/%s records VM %s, not %s: left alone", namespace, name, recorded, instance_id)
            return
        await self.peerpods.remove_finalizer(namespace, name)
        await self.peerpods.delete(namespace, name)
        log.info("PeerPod %s/%s released (VM %s deleted)", namespace, name, instance_id or recorded)


def _why(exc: BaseException) -> str:
    last = getattr(exc, "last_error", None)  # RetryTimeout
    return describe(last) if last is not None else describe(exc)
