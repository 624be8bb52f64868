"""The lifecycle's seams to the cluster: observers of its VMs, and the pods' registry credentials.

The lifecycle depends only on these protocols. ``cloudadaptor.k8s.peerpods.PeerPodTracker``
implements ``SandboxObserver`` (PeerPod objects with a finalizer) and
``cloudadaptor.k8s.pullsecrets.PullSecretReader`` implements ``PodCredentials``;
``NoopObserver`` and ``NoCredentials`` are used outside a cluster. Neither seam
ever fails a sandbox: its methods return normally whatever happens (they log),
within a bounded time.
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


@runtime_checkable
class PodCredentials(Protocol):
    """Where a pod's registry credentials come from (``cloudadaptor.k8s.pullsecrets`` in a cluster)."""

    async def registry_auth(self, pod_namespace: str, pod_name: str) -> bytes | None:
        """The pod's merged registry auth as auth.json bytes (``{"auths": {...}}``), or None when it has none.

        Never raises and returns within a bounded time; problems are logged naming
        the pod or secret, never a credential."""
        ...


class NoCredentials:
    """No registry credentials (no Kubernetes: the local demo, tests)."""

    async def registry_auth(self, pod_namespace: str, pod_name: str) -> bytes | None:
        return None
