"""The lifecycle's seams to the outside world: observers of its VMs, recorders of
what it measured, and the pods' registry credentials.

The lifecycle depends only on these protocols. ``cloudadaptor.k8s.peerpods.PeerPodTracker``
implements ``SandboxObserver`` (PeerPod objects with a finalizer) and
``cloudadaptor.k8s.pullsecrets.PullSecretReader`` implements ``PodCredentials``;
``NoopObserver`` and ``NoCredentials`` are used outside a cluster. Neither seam
ever fails a sandbox: its methods return normally whatever happens (they log),
within a bounded time.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class SandboxObserver(Protocol):
    async def vm_created(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str, provider_name: str,
                         instance_type: str = "") -> None:
        """The provider created ``instance_id`` for this sandbox (called right after the store records it)."""
        ...

    async def vm_deleted(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str) -> None:
        """The provider deleted the sandbox's VM (StopVM, or a failed StartVM's rollback)."""
        ...


class NoopObserver:
    """Observes nothing (no Kubernetes: the local demo, tests)."""

    async def vm_created(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str, provider_name: str,
                         instance_type: str = "") -> None:
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
class LifecycleRecorder(Protocol):
    """Where the lifecycle reports what it measured (``cloudadaptor.metrics.Metrics`` implements it).

    Labels passed here are bounded (phase, method, code, cause, direction), never
    a pod name or sandbox id. Methods are quick, synchronous and never raise.
    """

    def phase_done(self, phase: str, seconds: float, ok: bool = True) -> None:
        """A StartVM phase (``create_instance``, ``tunnel_up``, ``agent_ready``, ``end_to_end``) ended."""
        ...

    def call_done(self, method: str, code: str) -> None:
        """A hypervisor call (CreateVM/StartVM/StopVM/...) answered with ``code`` (``OK`` or a ttrpc code name)."""
        ...

    def vms_deleted(self, cause: str, count: int = 1) -> None:
        """VMs deleted by ``cause``: ``stop``, ``rollback``, ``recovery``, ``orphan_sweep``."""
        ...

    def proxy_dial(self, ok: bool) -> None:
        """The agent proxy dialled a VM's forwarder (one attempt)."""
        ...

    def proxy_connections(self, delta: int) -> None:
        """Piped shim⇄agent connections opened (+1) or closed (-1)."""
        ...

    def proxy_bytes(self, direction: str, count: int) -> None:
        """``count`` bytes piped ``to_vm`` or ``from_vm``."""
        ...


class NoopRecorder:
    """Records nothing (tests, tools that run the lifecycle without a daemon)."""

    def phase_done(self, phase: str, seconds: float, ok: bool = True) -> None:
        return None

    def call_done(self, method: str, code: str) -> None:
        return None

    def vms_deleted(self, cause: str, count: int = 1) -> None:
        return None

    def proxy_dial(self, ok: bool) -> None:
        return None

    def proxy_connections(self, delta: int) -> None:
        return None

    def proxy_bytes(self, direction: str, count: int) -> None:
        return None


class PhaseClock:
    """Times StartVM's phases for a recorder: each ``mark`` records the time since the previous one."""

    def __init__(self, recorder: LifecycleRecorder) -> None:
        self._recorder = recorder
        self._began = self._last = time.monotonic()

    def mark(self, phase: str, *, last: bool = False) -> None:
        """``phase`` ended now; with ``last`` the whole start ended too (``end_to_end``, ok)."""
        now = time.monotonic()
        self._recorder.phase_done(phase, now - self._last)
        self._last = now
        if last:
            self._recorder.phase_done("end_to_end", now - self._began)

    def split(self, first: str, first_seconds: float | None, second: str) -> None:
        """Two phases that end now: ``first`` took ``first_seconds`` of the time since the last mark
        (all of it when None: the provider returned a running VM), ``second`` the rest."""
        now = time.monotonic()
        elapsed = now - self._last
        head = elapsed if first_seconds is None else min(max(first_seconds, 0.0), elapsed)
        self._recorder.phase_done(first, head)
        self._recorder.phase_done(second, elapsed - head)
        self._last = now

    def failed(self) -> None:
        """The start failed: ``end_to_end`` recorded as not ok."""
        self._recorder.phase_done("end_to_end", time.monotonic() - self._began, ok=False)


@runtime_checkable
class StartObserver(Protocol):
    """Told how each StartVM ended (``cloudadaptor.k8s.events.PodEvents``: PodVMReady / PodVMFailed).

    Called by the hypervisor service, which sees each StartVM whole. Like a
    ``SandboxObserver`` it never fails or noticeably delays the call.
    """

    async def vm_ready(self, sandbox_id: str, pod_namespace: str, pod_name: str, instance_id: str, seconds: float) -> None:
        ...

    async def vm_failed(self, sandbox_id: str, pod_namespace: str, pod_name: str, reason: str, console: str) -> None:
        """``reason``: the one-line error; ``console``: the VM's last console lines, or why there are none ("" if not read)."""
        ...
