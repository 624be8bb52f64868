"""Kubernetes Events on the Pod, so ``kubectl describe pod`` tells the pod VM's story.

``PodVMCreating`` (the instance and provider), ``PodVMReady`` (seconds until the
agent answered), ``PodVMFailed`` (the one-line reason, and the VM's last
console lines when its agent never answered), ``PodVMDeleted``.

``PodEvents`` is a ``SandboxObserver`` (created/deleted) and a
``StartObserver`` (ready/failed) of ``cloudadaptor.adaptor.hooks``. It never
fails or slows a pod: each event is posted by a background task with a
timeout, failures are logged at debug level, and emission is rate-limited
(a token bucket for the node, and one event per pod and reason per
``repeat_after`` seconds), as kubelet's recorder does.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import time
from typing import Any

from kubernetes_asyncio import client as k8s

log = logging.getLogger(__name__)

COMPONENT = "cloud-api-adaptor"
MAX_MESSAGE = 1024  # the API server's limit for an Event message


class PodEvents:
    """Posts core/v1 Events about pod VMs. ``close()`` waits briefly for events in flight."""

    def __init__(self, api: k8s.ApiClient, *, node_name: str, timeout: float = 5.0, burst: int = 25,
                 per_second: float = 1.0, repeat_after: float = 10.0) -> None:
        self.core = k8s.CoreV1Api(api)
        self.node_name = node_name
        self.timeout = timeout
        self._burst = burst
        self._per_second = per_second
        self._tokens = float(burst)
        self._refilled = time.monotonic()
        self._repeat_after = repeat_after
        self._last: dict[tuple[str, str, str], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0

    # -------------------------------------------------------------- observers
    async def vm_created(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str, provider_name: str,
                         instance_type: str = "") -> None:
        self.emit(pod_namespace, pod_name, "Normal", "PodVMCreating",
                  f"pod VM {instance_id}{f' ({instance_type})' if instance_type else ''} created by the {provider_name} "
                  f"provider on node {self.node_name}; "
                  f"waiting for its agent")

    async def vm_ready(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str, seconds: float) -> None:
        self.emit(pod_namespace, pod_name, "Normal", "PodVMReady",
                  f"pod VM {instance_id} ready: agent answered {seconds:.1f}s after StartVM")

    async def vm_failed(self, sandbox_id: str, pod_namespace: str, pod_name: str, reason: str, console: str) -> None:
        message = " ".join(reason.split())
        if console:
            message = f"{message}\n{console}"
        self.emit(pod_namespace, pod_name, "Warning", "PodVMFailed", message)

    async def vm_deleted(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str) -> None:
        self.emit(pod_namespace, pod_name, "Normal", "PodVMDeleted", f"pod VM {instance_id or '(none recorded)'} deleted")

    # ---------------------------------------------------------------- posting
    def emit(self, namespace: str, pod: str, kind: str, reason: str, message: str) -> None:
        """Queue one Event on Pod ``namespace/pod`` unless rate-limited. Returns at once."""
        if not (namespace and pod):
            return  # not a Kubernetes pod (the demo, tests)
        if not self._allowed((namespace, pod, reason)):
            self.dropped += 1
            log.debug("event %s on %s/%s dropped by the rate limit", reason, namespace, pod)
            return
        body = self._body(namespace, pod, kind, reason, message)
        task = asyncio.ensure_future(self._post(namespace, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _allowed(self, key: tuple[str, str, str]) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self._repeat_after:
            return False
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._per_second)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        self._last[key] = now
        if len(self._last) > 4096:  # forget the oldest keys: bounded memory
            for old in sorted(self._last, key=self._last.__getitem__)[:1024]:
                del self._last[old]
        return True

    def _body(self, namespace: str, pod: str, kind: str, reason: str, message: str) -> dict[str, Any]:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        return {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{pod}.", "namespace": namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": pod},
            "reason": reason, "message": message, "type": kind, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": COMPONENT, "host": self.node_name},
            "reportingComponent": COMPONENT, "reportingInstance": self.node_name,
        }

    async def _post(self, namespace: str, body: dict[str, Any]) -> None:
        try:
            await asyncio.wait_for(self.core.create_namespaced_event(namespace, body), self.timeout)
        except Exception as exc:  # an event is best effort: never a pod failure
            log.debug("event %s on %s/%s not posted: %s", body["reason"], namespace,
                      body["involvedObject"]["name"], exc)

    async def close(self) -> None:
        """Wait up to ``timeout`` for events in flight, then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.timeout)
            for task in pending:
                task.cancel()
