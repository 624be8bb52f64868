"""Observers of the sandbox lifecycle: how the lifecycle tells the outside world about VMs.

The lifecycle depends only on this protocol; ``cloudadaptor.k8s.peerpods.PeerPodTracker``
implements it (PeerPod objects with a finalizer), ``NoopObserver`` is used
outside a cluster. An observer never fails a sandbox: its methods return
normally whatever happens (they log), within a bounded time.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class SandboxObserver(Protocol):
    async def vm_created(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str, provider_name: str) -> None:
        """The provider created ``instance_id`` for this sandbox (called right after the store records it)."""
        ...

    async def vm_deleted(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str) -> None:
        """The provider deleted the sandbox's VM (StopVM, or a failed StartVM's rollback)."""
        ...


class NoopObserver:
    """Observes nothing (no Kubernetes: the local demo, tests)."""

    async def vm_created(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str, provider_name: str) -> None:
        return None

    async def vm_deleted(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str) -> None:
        return None
