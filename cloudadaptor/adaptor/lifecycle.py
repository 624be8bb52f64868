"""SandboxLifecycle: owns the order of create-VM → tunnel → agent proxy, and rolls back.

The hypervisor service translates wire calls into these methods; providers
only create and delete instances; the pod network (netns inspection, the
worker side of the VXLAN tunnel) is behind the ``PodNetwork`` seam. Every
step that creates something records it in the ``SandboxStore`` first, so a
crash at any point leaves a row (or a tagged VM, or a tunnel device named
after the row's VNI) that ``recover()`` finishes or undoes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

from cloudadaptor import podconfig
from cloudadaptor.adaptor import podvmdata, recovery
from cloudadaptor.adaptor.console import console_tail
from cloudadaptor.adaptor.delivery import BootDelivery, PodConfigDelivery, readiness_poll
from cloudadaptor.adaptor.errors import LifecycleError, reason_of
from cloudadaptor.adaptor.hooks import (
    LifecycleRecorder, NoCredentials, NoopObserver, NoopRecorder, PhaseClock, PodCredentials, SandboxObserver,
)
from cloudadaptor.adaptor.locks import KeyedLocks
from cloudadaptor.adaptor.proxy import AgentEndpoint, AgentProxy, AgentUnreachable
from cloudadaptor.adaptor.sandboxnet import SandboxNetwork
from cloudadaptor.adaptor.store import Sandbox, SandboxState, SandboxStore, VniExhausted
from cloudadaptor.initdata import InitData
from cloudadaptor.adaptor.validation import (
    AGENT_SOCKET_NAME, ANN_POD_NAME, ANN_POD_NAMESPACE, MAX_UNIX_PATH, annotation_problems, check_vm_limit,
    validate_netns_path, validate_sandbox_id, vm_name_for,
)
from cloudadaptor.podnetwork.api import PodNetwork, PodNetworkError
from cloudadaptor.providers import base as providers
from cloudadaptor.tls import AdaptorTls
from cloudadaptor.ttrpc.errors import Code
from cloudadaptor.vmlimit import VmLimit
from cloudadaptor.wire import AGENT_PORT, DEFAULT_TLS_MIN_VERSION, VXLAN_MIN_ID, VXLAN_PORT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LifecycleOptions:
    pods_dir: Path
    node_name: str
    cluster_id: str  # TAG_CLUSTER on every VM; required in every list-to-delete
    proxy_timeout: float = 300.0
    agent_port: int = AGENT_PORT
    extra_tags: Mapping[str, str] = field(default_factory=dict)
    tls_min_version: str = DEFAULT_TLS_MIN_VERSION
    vxlan_port: int = VXLAN_PORT
    vxlan_min_id: int = VXLAN_MIN_ID
    vm_limit: VmLimit = field(default_factory=lambda: VmLimit(None))  # pod VMs this node may run, read at each StartVM
    getinfo_wait: float = 600.0  # GETINFO_WAIT_TIMEOUT: GetInfo(wait) without a deadline gives up after this
    initdata: InitData | None = None  # INITDATA: every pod's default (its annotation overrides)


ProxyFactory = Callable[[str, AgentEndpoint], AgentProxy]


class SandboxLifecycle:
    def __init__(
        self,
        *,
        options: LifecycleOptions,
        store: SandboxStore,
        provider: providers.Provider,
        pod_network: PodNetwork,
        tls: AdaptorTls | None,
        proxy_factory: ProxyFactory = AgentProxy,
        observer: SandboxObserver | None = None,
        credentials: PodCredentials | None = None,
        recorder: LifecycleRecorder | None = None,
        delivery: PodConfigDelivery | None = None,  # default: user data at boot; a WarmPool claims pool VMs
    ) -> None:
        self.options = options
        self.store = store
        self.provider = provider
        self.network = SandboxNetwork(pod_network)
        self.tls = tls
        self._proxy_factory = proxy_factory
        self.observer = observer or NoopObserver()
        self.credentials = credentials or NoCredentials()
        self.recorder = recorder or NoopRecorder()  # metrics: phase timings, deletions
        self.delivery = delivery or BootDelivery(provider, options.node_name, recovery.vm_tags(options))
        self._proxies: dict[str, AgentProxy] = {}
        self._locks = KeyedLocks()
        self._starting: dict[str, asyncio.Future[None]] = {}
        self._changed = asyncio.Condition()
        # Ids stopped recently: a repeated StopVM is harmless, not NOT_FOUND.
        self._stopped: OrderedDict[str, float] = OrderedDict()

    # ------------------------------------------------------------------ CreateVM
    async def create(self, sandbox_id: str, annotations: Mapping[str, str], netns_path: str) -> str:
        """Inspect the pod netns, allocate a VNI, record the sandbox and render
        its user data (pod network included); returns the agent socket path.

        Idempotent: a repeated call with the same id returns the same path and
        creates nothing new. Blocks only on local work (no cloud calls).
        A netns that is not one, or bad initdata, is INVALID_ARGUMENT; one without a pod
        interface, or no worker address for the tunnel, FAILED_PRECONDITION.
        """
        validate_sandbox_id(sandbox_id)
        validate_netns_path(netns_path)
        spec_errors = annotation_problems(annotations)
        if spec_errors:
            raise LifecycleError(Code.INVALID_ARGUMENT, "; ".join(spec_errors))
        init = podvmdata.pod_initdata(annotations, self.options.initdata)
        async with self._locks.hold(sandbox_id):
            existing = self.store.get(sandbox_id)
            if existing is not None:
                log.info("CreateVM %s: already recorded (state %s)", sandbox_id, existing.state.value)
                return existing.agent_socket
            pod_name = annotations.get(ANN_POD_NAME, "")
            pod_namespace = annotations.get(ANN_POD_NAMESPACE, "")
            vm_name = vm_name_for(pod_name, sandbox_id)
            pod_dir = self.options.pods_dir / sandbox_id
            if len(os.fsencode(pod_dir / AGENT_SOCKET_NAME)) > MAX_UNIX_PATH:
                raise LifecycleError(
                    Code.INVALID_ARGUMENT,
                    f"agent socket path {pod_dir / AGENT_SOCKET_NAME} is longer than the "
                    f"{MAX_UNIX_PATH} bytes a unix socket allows; configure a shorter PODS_DIR",
                )
            pod = await self.network.inspect(netns_path)
            worker_ip = await self.network.worker_ip(self.provider)
            auth = await self.credentials.registry_auth(pod_namespace, pod_name)
            # No await from here to store.add: the VNI stays free until recorded.
            try:
                vni = self.store.next_free_vni(self.options.vxlan_min_id)
            except VniExhausted as exc:
                raise LifecycleError(Code.RESOURCE_EXHAUSTED, f"CreateVM {sandbox_id}: {exc}") from None
            network = podconfig.PodNetworkConfig(pod, worker_ip, vni, self.options.vxlan_port)
            sandbox = Sandbox(
                id=sandbox_id,
                pod_name=pod_name,
                pod_namespace=pod_namespace,
                netns_path=netns_path,
                vm_name=vm_name,
                agent_socket=str(pod_dir / AGENT_SOCKET_NAME),
                annotations=dict(annotations),
                user_data=self._render_user_data(sandbox_id, pod_name, pod_namespace, vm_name, network, init, auth),
                vni=vni,
                pod_network=network,
            )
            pod_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.store.add(sandbox)
            log.info("CreateVM %s: pod %s/%s (%s %s), VM name %s, VNI %d, worker %s", sandbox_id, pod_namespace,
                     pod_name, pod.name, ",".join(pod.addresses), vm_name, vni, worker_ip)
            await self._notify()
            return sandbox.agent_socket

    def _render_user_data(self, sandbox_id: str, pod_name: str, pod_namespace: str, vm_name: str,
                          network: podconfig.PodNetworkConfig, init: InitData | None, auth: bytes | None) -> str:
        config = podconfig.ForwarderConfig(
            sandbox_id=sandbox_id, pod_name=pod_name, pod_namespace=pod_namespace, listen_port=self.options.agent_port,
            tls=self.tls.mint_vm_material(vm_name) if self.tls else None, tls_min_version=self.options.tls_min_version,
            network=network,
        )
        return podvmdata.render(config.to_json(), init, auth, self.provider.user_data_limit(), f"{pod_namespace}/{pod_name}")

    # ------------------------------------------------------------------- StartVM
    async def start(self, sandbox_id: str) -> None:
        """Create the VM, bring the tunnel up, wait until the agent answers through the proxy.

        Blocks up to the provider's create time plus ``proxy_timeout``. On any
        failure (including cancellation when the shim gives up) the VM and the
        tunnel are removed before this returns or raises. Idempotent for a
        running sandbox.
        """
        async with self._locks.hold(sandbox_id):
            sandbox = self._get(sandbox_id)
            if sandbox.state is SandboxState.RUNNING:
                return
            if sandbox.state is SandboxState.STOPPING:
                raise LifecycleError(Code.FAILED_PRECONDITION, f"sandbox {sandbox_id} is being stopped")
            self._check_vm_limit(sandbox_id)
            # The work runs in its own task so StopVM can cancel it while this
            # call still answers the shim. No await between the limit check
            # and this registration: two StartVMs cannot share the last slot.
            work = asyncio.ensure_future(self._start(sandbox))
            self._starting[sandbox_id] = work
            try:
                await work
            except asyncio.CancelledError:
                caller = asyncio.current_task()
                if caller is not None and caller.cancelling():
                    raise  # the caller gave up; _start has rolled back
                raise LifecycleError(Code.ABORTED, f"StartVM {sandbox_id}: stopped by StopVM while starting; VM and tunnel removed") from None
            finally:
                self._starting.pop(sandbox_id, None)

    def _check_vm_limit(self, sandbox_id: str) -> None:
        """Second line of defence behind the scheduler's ``kata.peerpods.io/vm`` resource."""
        busy = self.store.holding_vms()
        check_vm_limit(self.options.vm_limit, self.options.node_name, (busy | set(self._starting)) - {sandbox_id})

    async def _start(self, sandbox: Sandbox) -> None:
        began = time.monotonic()
        phases = PhaseClock(self.recorder)
        self.store.change(sandbox.id, state=SandboxState.STARTING, error="")
        instance: providers.Instance | None = None
        try:
            try:
                instance = await self.delivery.deliver(sandbox)
            except providers.ProviderError as exc:
                raise LifecycleError(Code.UNAVAILABLE, f"creating VM {sandbox.vm_name} failed: {exc}") from exc
            if not instance.ips:
                raise LifecycleError(Code.INTERNAL, f"VM {instance.id} has no IP address")
            self.store.change(sandbox.id, instance_id=instance.id, vm_ips=instance.ips)
            sandbox = replace(sandbox, state=SandboxState.STARTING, error="", instance_id=instance.id,
                              vm_ips=tuple(instance.ips))  # what was written: the row is not read back
            log.info("StartVM %s: VM %s at %s created in %.3fs", sandbox.id, instance.id, instance.ips[0], time.monotonic() - began)
            phases.split("create_instance", instance.launched_in, "instance_running")
            await self.observer.vm_created(sandbox.id, sandbox.pod_namespace, sandbox.pod_name, instance.id, self.provider.name,
                                           instance_type=instance.instance_type)
            await self.network.up(sandbox)
            phases.mark("tunnel_up")
            proxy = self.serve_agent(sandbox)
            try:
                await proxy.wait_ready(self.options.proxy_timeout, readiness_poll(instance))
            except AgentUnreachable as exc:
                console = await console_tail(self.provider, instance.id, sandbox.user_data)
                log.warning("StartVM %s: agent of VM %s never answered; %s", sandbox.id, instance.id, console)
                raise LifecycleError(Code.DEADLINE_EXCEEDED, f"VM {instance.id}: {exc}", console) from exc
            await proxy.start()
            phases.mark("agent_ready", last=True)
            self.store.change(sandbox.id, state=SandboxState.RUNNING)
            log.info("StartVM %s: agent ready after %.3fs", sandbox.id, time.monotonic() - began)
            await self._notify()
        except BaseException as exc:
            phases.failed()
            reason = reason_of(exc)
            # Shielded: the rollback finishes even if the shim hung up (a second cancellation too).
            done = await asyncio.shield(asyncio.ensure_future(self.rollback_start(sandbox.id, reason)))
            if isinstance(exc, LifecycleError):
                raise LifecycleError(exc.code, f"StartVM {sandbox.id}: {exc.message}; {done}", exc.console) from None
            if isinstance(exc, Exception):
                log.exception("StartVM %s failed", sandbox.id)
                raise LifecycleError(Code.INTERNAL, f"StartVM {sandbox.id}: {reason}; {done}") from exc
            raise

    async def rollback_start(self, sandbox_id: str, reason: str, cause: str = "rollback") -> str:
        """Undo a failed start (VM, then tunnel); returns what was done, for the error message."""
        proxy = self._proxies.pop(sandbox_id, None)
        if proxy is not None:
            await proxy.close()
        sandbox = self.store.get(sandbox_id)
        if sandbox is None:
            return "nothing to clean up"
        problems = []
        deleted: list[str] = []
        try:
            deleted = await self._delete_vms(sandbox)
        except Exception as exc:
            problems.append(f"deleting the VM failed ({exc})")
        try:
            await self.network.down(sandbox)
        except PodNetworkError as exc:
            problems.append(f"removing the tunnel failed ({exc})")
        if problems:
            self.store.change(sandbox_id, state=SandboxState.FAILED, error=f"{reason}; {'; '.join(problems)}")
            log.error("StartVM %s: cleanup incomplete, recorded for the next StopVM or restart: %s",
                      sandbox_id, "; ".join(problems))
            return f"{'; '.join(problems)}; it is recorded for cleanup"
        self.recorder.vms_deleted(cause, len(deleted))
        if sandbox.instance_id or deleted:
            await self.observer.vm_deleted(sandbox_id, sandbox.pod_namespace, sandbox.pod_name, sandbox.instance_id)
        self.store.change(sandbox_id, state=SandboxState.FAILED, error=reason, instance_id="", vm_ips=())
        log.warning("StartVM %s failed (%s); deleted %s", sandbox_id, reason, ", ".join(deleted) or "no VM")
        await self._notify()
        return f"VM {', '.join(deleted)} deleted" if deleted else "no VM was left"

    async def _delete_vms(self, sandbox: Sandbox) -> list[str]:
        """Delete the recorded VM and any other VM tagged with this sandbox."""
        ids = {sandbox.instance_id} - {""}
        try:
            owned = await self.provider.list_owned({providers.TAG_SANDBOX: sandbox.id, **recovery.owned_tags(self.options)})
            ids.update(instance.id for instance in owned)
        except Exception as exc:  # the recorded id is still deleted below
            log.warning("listing VMs of sandbox %s failed: %s", sandbox.id, exc)
        for instance_id in sorted(ids):
            await self.provider.delete_instance(instance_id)
        return sorted(ids)

    def _endpoint(self, sandbox: Sandbox) -> AgentEndpoint:
        return AgentEndpoint(
            host=sandbox.vm_ips[0],
            port=self.options.agent_port,
            ssl_context=self.tls.client_context() if self.tls else None,
            server_hostname=sandbox.vm_name,
        )

    # -------------------------------------------------------------------- StopVM
    async def stop(self, sandbox_id: str) -> None:
        """Proxy down, VM deleted, tunnel down, pod dir and record removed.

        Idempotent: stopping a sandbox stopped moments ago succeeds; an id never
        seen is NOT_FOUND. A start in progress is cancelled (and rolled back).
        If the VM or the tunnel cannot be removed the record stays (state
        ``stopping``, so its VNI stays taken) and the error is returned, so
        nothing is forgotten.
        """
        validate_sandbox_id(sandbox_id)
        starting = self._starting.get(sandbox_id)
        if starting is not None:
            starting.cancel()
        async with self._locks.hold(sandbox_id):
            sandbox = self.store.get(sandbox_id)
            if sandbox is None:
                if sandbox_id in self._stopped:
                    return
                raise LifecycleError(Code.NOT_FOUND, f"sandbox {sandbox_id} not found")
            self.store.change(sandbox_id, state=SandboxState.STOPPING)
            proxy = self._proxies.pop(sandbox_id, None)
            if proxy is not None:
                await proxy.close()
            try:
                deleted = await self._delete_vms(sandbox)
            except Exception as exc:
                self.store.change(sandbox_id, error=f"VM deletion failed: {exc}")
                raise LifecycleError(
                    Code.UNAVAILABLE, f"StopVM {sandbox_id}: deleting VM {sandbox.instance_id} failed: {exc}"
                ) from exc
            try:
                await self.network.down(sandbox)
            except PodNetworkError as exc:
                self.store.change(sandbox_id, error=f"tunnel removal failed: {exc}")
                raise LifecycleError(Code.INTERNAL, f"StopVM {sandbox_id}: removing the VXLAN tunnel failed: {exc}") from exc
            self.recorder.vms_deleted("stop", len(deleted))
            await self.observer.vm_deleted(sandbox_id, sandbox.pod_namespace, sandbox.pod_name, sandbox.instance_id)
            shutil.rmtree(Path(sandbox.agent_socket).parent, ignore_errors=True)
            self.store.remove(sandbox_id)
            self._remember_stopped(sandbox_id)
            log.info("StopVM %s: deleted %s", sandbox_id, ", ".join(deleted) or "no VM")
            await self._notify()

    def _remember_stopped(self, sandbox_id: str) -> None:
        self._stopped[sandbox_id] = time.monotonic()
        while len(self._stopped) > 1024:
            self._stopped.popitem(last=False)

    async def vm_id_of_pod(self, pod_namespace: str, pod_name: str, wait: bool) -> str:
        """The pod's VM id; ``wait`` blocks until it exists, at most ``options.getinfo_wait`` s (or the caller's deadline)."""
        try:
            async with asyncio.timeout(self.options.getinfo_wait if wait else None), self._changed:
                while True:
                    for sandbox in self.store.find_pod(pod_namespace, pod_name):
                        if sandbox.instance_id:
                            return sandbox.instance_id
                    if not wait:
                        raise LifecycleError(Code.NOT_FOUND, f"no pod VM for pod {pod_namespace}/{pod_name}")
                    await self._changed.wait()
        except TimeoutError:
            waited = f"{self.options.getinfo_wait:g} s (GETINFO_WAIT_TIMEOUT)"
            raise LifecycleError(Code.DEADLINE_EXCEEDED, f"no pod VM for pod {pod_namespace}/{pod_name} after {waited}") from None

    # --------------------------------------------------------- restart and close
    async def recover(self) -> list[str]:
        """After a restart: see ``recovery.recover`` (re-serve, undo, sweep). Returns one line per action."""
        return await recovery.recover(self)

    async def sweep_orphans(self) -> list[str]:
        """Delete VMs tagged as ours on this node that no sandbox record owns (``recovery.sweep_orphans``)."""
        return await recovery.sweep_orphans(self)

    def serve_agent(self, sandbox: Sandbox) -> AgentProxy:
        """A proxy for ``sandbox``'s agent socket, registered so StopVM and close() shut it; not yet started."""
        proxy = self._proxy_factory(sandbox.agent_socket, self._endpoint(sandbox))
        self._proxies[sandbox.id] = proxy
        return proxy

    def starting_ids(self) -> set[str]:
        """Sandboxes whose StartVM is in progress (their VMs may not be recorded yet)."""
        return set(self._starting)

    async def close(self) -> None:
        """Stop serving agent sockets. VMs keep running: a restart re-serves them."""
        for proxy in list(self._proxies.values()):
            await proxy.close()
        self._proxies.clear()

    def _get(self, sandbox_id: str) -> Sandbox:
        validate_sandbox_id(sandbox_id)
        sandbox = self.store.get(sandbox_id)
        if sandbox is None:
            raise LifecycleError(Code.NOT_FOUND, f"sandbox {sandbox_id} not found")
        return sandbox

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

