"""Observers the daemon composes: several observers behind the lifecycle's one seam.

``ObserverChain`` forwards each notification to every observer in order (the
PeerPod tracker, Pod events, the log fields); an observer that raises despite
its contract is logged and skipped, so none can fail a sandbox or starve the
others. ``LogFieldsObserver`` adds the new VM's id to the request's log fields.
"""

from __future__ import annotations

import logging
from typing import Sequence

from cloudadaptor import logcontext
from cloudadaptor.adaptor.hooks import SandboxObserver

log = logging.getLogger(__name__)


class ObserverChain:
    """A ``SandboxObserver`` that notifies each of ``observers`` in turn."""

    def __init__(self, observers: Sequence[SandboxObserver]) -> None:
        self.observers = tuple(observers)

    async def vm_created(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str, provider_name: str,
                         instance_type: str = "") -> None:
        for observer in self.observers:
            try:
                await observer.vm_created(sandbox_id, pod_namespace, pod_name, instance_id, provider_name, instance_type)
            except Exception:  # the contract says never; if one does, the sandbox goes on
                log.exception("observer %s failed on vm_created for sandbox %s", type(observer).__name__, sandbox_id)

    async def vm_deleted(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str) -> None:
        for observer in self.observers:
            try:
                await observer.vm_deleted(sandbox_id, pod_namespace, pod_name, instance_id)
            except Exception:
                log.exception("observer %s failed on vm_deleted for sandbox %s", type(observer).__name__, sandbox_id)


class LogFieldsObserver:
    """Adds ``instance_id`` to the log fields of the StartVM that created the VM."""

    async def vm_created(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str, provider_name: str,
                         instance_type: str = "") -> None:
        logcontext.add(instance_id=instance_id)

    async def vm_deleted(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str) -> None:
        return None
