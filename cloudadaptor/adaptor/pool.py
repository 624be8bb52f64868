"""WarmPool: pre-booted pod VMs that a StartVM claims instead of waiting for a cloud boot.

A pool VM boots with user data holding only its TLS server material and the
CA it trusts (``apf.json`` without a pod); its claim step
(``podvm/claim.py``) waits on the agent port for one mTLS ttrpc call
``wire.CLAIM_SERVICE/CLAIM_METHOD`` carrying the pod's user data. The pool is
a ``PodConfigDelivery``: ``deliver`` takes a ready VM (``PoolStore.take``:
pool row out, sandbox row in, one transaction), claims it, and falls back to
a cold ``BootDelivery`` within the same StartVM when there is none, the pod
needs another kind of VM, or the claim fails (that VM is deleted).

A background loop keeps ``size`` VMs booting or ready (fewer when
``PEERPODS_LIMIT_PER_NODE`` leaves less room), creates at most
``refill_concurrency`` at once, backs off after cloud errors, replaces VMs
older than ``max_age`` and deletes the surplus when the pool shrinks or is
turned off. Every pool VM is recorded before it is created and tagged
``TAG_POOL=<name>`` + ``TAG_NODE`` (+ the operator's ``TAGS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Mapping, Protocol

from cloudadaptor import podconfig
from cloudadaptor.adaptor import podvmdata
from cloudadaptor.adaptor.delivery import PodConfigDelivery
from cloudadaptor.adaptor.poolstore import PoolState, PoolStore, PoolVm
from cloudadaptor.adaptor.store import SandboxState, SandboxStore, Sandbox
from cloudadaptor.adaptor.validation import ANN_GPUS, ANN_IMAGE, ANN_MACHINE_TYPE, client_token_for
from cloudadaptor.providers import base as providers
from cloudadaptor.retry import Backoff
from cloudadaptor.tls import AdaptorTls
from cloudadaptor.ttrpc.client import Client
from cloudadaptor.vmlimit import VmLimit
from cloudadaptor.wire import AGENT_PORT, CLAIM_METHOD, CLAIM_SERVICE, DEFAULT_TLS_MIN_VERSION

log = logging.getLogger(__name__)

CLAIM_TIMEOUT = 10.0  # a claim is one small request to a VM that already answered: seconds, not minutes
PROBE_INTERVAL = 1.0
IDLE_CHECK = 60.0  # the loop wakes at least this often (ages, limits)


class ClaimFailed(Exception):
    """The pool VM could not be reached, refused the claim, or answered with an error."""


@dataclass(frozen=True)
class PoolOptions:
    size: int = 0  # PODVM_POOL_SIZE: 0 = no pool
    max_age: float = 86400.0  # PODVM_POOL_MAX_AGE
    refill_concurrency: int = 2  # PODVM_POOL_REFILL_CONCURRENCY
    boot_timeout: float = 300.0  # a pool VM not answering by then is deleted (PROXY_TIMEOUT)
    node_name: str = ""
    extra_tags: Mapping[str, str] | None = None
    agent_port: int = AGENT_PORT
    tls_min_version: str = DEFAULT_TLS_MIN_VERSION
    vm_limit: VmLimit = field(default_factory=lambda: VmLimit(None))  # read at each pass: a PeerPodConfig's change re-sizes the pool


class MtlsClaimer:
    """The adaptor's half of the claim: the adaptor's client certificate, the pool VM's name as TLS server name."""

    def __init__(self, tls: AdaptorTls, port: int) -> None:
        self.tls, self.port = tls, port

    async def _dial(self, vm: PoolVm) -> Client:
        try:
            return await asyncio.wait_for(Client.connect_tcp(
                vm.vm_ips[0], self.port, ssl=self.tls.client_context(), server_hostname=vm.name), CLAIM_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise ClaimFailed(f"cannot reach {vm.vm_ips[0]}:{self.port}: {exc or type(exc).__name__}") from None

    async def probe(self, vm: PoolVm) -> None:
        """Returns once the VM's claim step completes an mTLS handshake; raises ``ClaimFailed``."""
        client = await self._dial(vm)
        await client.close()

    async def claim(self, vm: PoolVm, user_data: str) -> None:
        """Send the pod's user data; returns once the VM has written it. Raises ``ClaimFailed``."""
        client = await self._dial(vm)
        try:
            await client.call(CLAIM_SERVICE, CLAIM_METHOD, user_data.encode("utf-8"), timeout=CLAIM_TIMEOUT)
        except Exception as exc:  # TtrpcError, ConnectionClosed: the VM refused or went away
            raise ClaimFailed(f"{type(exc).__name__}: {exc}") from None
        finally:
            await client.close()


class Claimer(Protocol):
    """What the pool needs of a pool VM (``MtlsClaimer``; tests may stand in)."""

    async def probe(self, vm: PoolVm) -> None: ...

    async def claim(self, vm: PoolVm, user_data: str) -> None: ...


class WarmPool:
    """A ``PodConfigDelivery`` that claims pool VMs, and the loop that keeps the pool full."""

    def __init__(self, *, options: PoolOptions, store: SandboxStore, provider: providers.Provider,
                 tls: AdaptorTls | None, cold: PodConfigDelivery, claimer: Claimer | None = None) -> None:
        self.options = options
        self.sandboxes = store
        self.pool = PoolStore(store)
        self.provider = provider
        self.tls = tls
        self.cold = cold
        if claimer is None and tls is not None:
            claimer = MtlsClaimer(tls, options.agent_port)
        self.claimer = claimer  # None (TLS disabled): no pool, a claim needs mTLS
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._growing: set[asyncio.Task[None]] = set()
        self._failures = 0
        self._quiet_until = 0.0  # monotonic: no new VM before this (backoff after a failure)
        self._stopping = False

    # ---------------------------------------------------------------- delivery
    def cold_reason(self, sandbox: Sandbox) -> str | None:
        """Why this pod cannot use a pool VM (None: it can). Pool VMs are of the default image and type."""
        ann = sandbox.annotations
        if ann.get(ANN_MACHINE_TYPE):
            return f"it asks for instance type {ann[ANN_MACHINE_TYPE]!r}"
        if ann.get(ANN_IMAGE):
            return f"it asks for image {ann[ANN_IMAGE]!r}"
        if ann.get(ANN_GPUS, "0").strip() not in ("", "0"):
            return f"it asks for {ann[ANN_GPUS]} GPUs"
        return None

    async def deliver(self, sandbox: Sandbox) -> providers.Instance:
        """A claimed pool VM, or a cold one (see the module docstring). Claim failures never reach the caller."""
        if self.options.size <= 0 or self.claimer is None:
            return await self.cold.deliver(sandbox)
        reason = self.cold_reason(sandbox)
        vm = None if reason else self.pool.take(sandbox.id, time.time() - self.options.max_age)
        if vm is None:
            log.info("StartVM %s: cold start: %s", sandbox.id, reason or "no ready pool VM")
            self._kick.set()
            return await self.cold.deliver(sandbox)
        self._kick.set()  # refill behind us
        began = time.monotonic()
        try:
            await self.claimer.claim(vm, sandbox.user_data)
        except ClaimFailed as exc:
            log.warning("StartVM %s: claim of pool VM %s (%s) failed: %s; deleting it and starting cold",
                        sandbox.id, vm.name, vm.instance_id, exc)
            await self.provider.delete_instance(vm.instance_id)
            self.sandboxes.change(sandbox.id, instance_id="", vm_ips=())
            return await self.cold.deliver(sandbox)
        log.info("StartVM %s: claimed pool VM %s (%s) in %.2fs", sandbox.id, vm.name, vm.instance_id,
                 time.monotonic() - began)
        return providers.Instance(vm.instance_id, vm.name, vm.vm_ips, tags={providers.TAG_POOL: vm.name})

    # --------------------------------------------------------------- the pool
    def target(self) -> int:
        """How many VMs the pool should hold now: its size, less what the node's current VM limit leaves."""
        size = max(0, self.options.size) if self.claimer is not None else 0
        limit = self.options.vm_limit.current()
        if limit is None:
            return size
        busy = [s for s in self.sandboxes.all() if s.instance_id or s.state in (SandboxState.STARTING, SandboxState.RUNNING)]
        return max(0, min(size, limit - len(busy)))

    async def reconcile(self) -> list[str]:
        """One pass: delete expired and surplus VMs, start creating the shortfall. Returns one line per action."""
        actions = []
        vms = self.pool.all()
        oldest = time.time() - self.options.max_age
        expired = [vm for vm in vms if vm.state is PoolState.READY and vm.created_at < oldest]
        stuck = [vm for vm in vms if vm.state is PoolState.DELETING]  # a deletion the cloud refused before
        live = [vm for vm in vms if vm not in expired and vm not in stuck]
        # Surplus: the newest booting ones go first (nothing waits for them yet), then the newest ready ones.
        live.sort(key=lambda vm: (vm.state is not PoolState.READY, vm.created_at))
        target = self.target()
        surplus = live[target:]
        doomed = [(vm, "older than PODVM_POOL_MAX_AGE") for vm in expired] + [(vm, "surplus") for vm in surplus]
        for vm, why in doomed + [(vm, "deletion retried") for vm in stuck]:
            if vm.state is PoolState.BOOTING and any(t.get_name() == vm.name for t in self._growing):
                for task in self._growing:
                    if task.get_name() == vm.name:
                        task.cancel()  # its own cleanup deletes the VM
                actions.append(f"pool VM {vm.name}: creation cancelled ({why})")
                continue
            if await self.discard(vm):
                actions.append(f"pool VM {vm.name} ({vm.instance_id or 'not created'}) deleted: {why}")
        shortfall = target - (len(live) - len(surplus))
        room = self.options.refill_concurrency - len(self._growing)
        if shortfall > 0 and room > 0 and time.monotonic() >= self._quiet_until:
            for _ in range(min(shortfall, room) if not self._stopping else 0):
                name = f"podvm-pool-{secrets.token_hex(4)}"
                task = asyncio.create_task(self._grow(name), name=name)
                self._growing.add(task)
                task.add_done_callback(self._grown)
                actions.append(f"pool VM {name}: creating")
        for line in actions:
            log.info("pool: %s", line)
        return actions

    async def discard(self, vm: PoolVm) -> bool:
        """Make ``vm`` unclaimable, delete it, then drop its row; False if its row is already gone (claimed or
        deleted). A failed delete raises and leaves the row ``deleting``: the next pass (or restart) retries it."""
        if not self.pool.mark_deleting(vm.name):
            return False
        await self._delete(vm)
        self.pool.remove(vm.name)
        return True

    async def _delete(self, vm: PoolVm) -> None:
        ids = {vm.instance_id} - {""}
        tagged = await self.provider.list_owned({providers.TAG_POOL: vm.name, providers.TAG_NODE: self.options.node_name})
        ids |= {instance.id for instance in tagged}
        for instance_id in sorted(ids):
            await self.provider.delete_instance(instance_id)

    def _material(self, name: str) -> str:
        config = podconfig.ForwarderConfig(
            sandbox_id="", pod_name="", pod_namespace="", listen_port=self.options.agent_port,
            tls=self.tls.mint_vm_material(name) if self.tls else None, tls_min_version=self.options.tls_min_version)
        return podvmdata.render(config.to_json(), None, None, self.provider.user_data_limit(), f"pool VM {name}")

    def _spec(self, vm: PoolVm) -> providers.InstanceSpec:
        tags = {**(self.options.extra_tags or {}), providers.TAG_OWNER: providers.OWNER_VALUE,
                providers.TAG_NODE: self.options.node_name, providers.TAG_POOL: vm.name}
        return providers.InstanceSpec(name=vm.name, sandbox_id=vm.name, user_data=vm.user_data,
                                      client_token=client_token_for(vm.name), tags=tags)

    async def _grow(self, name: str) -> None:
        """Record, create, wait until the claim step answers, mark ready; on any failure delete it again."""
        assert self.claimer is not None
        vm = self.pool.add(name, self._material(name))
        began = time.monotonic()
        try:
            instance = await self.provider.create_instance(self._spec(vm))
            if not instance.ips:
                raise ClaimFailed(f"VM {instance.id} has no IP address")
            self.pool.set_instance(name, instance.id, instance.ips)
            vm = PoolVm(name, vm.state, instance.id, instance.ips, vm.user_data, vm.created_at)
            await self._wait_ready(vm)
            self.pool.mark_ready(name)
            log.info("pool: VM %s (%s) ready after %.1fs", name, instance.id, time.monotonic() - began)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                log.info("pool: creation of VM %s interrupted (shrinking or stopping); deleting it", name)
            else:
                log.warning("pool: VM %s failed (%s); deleting it", name, exc or type(exc).__name__)
            await asyncio.shield(self._forget(vm))
            raise

    async def _forget(self, vm: PoolVm) -> None:
        try:
            await self.discard(self.pool.get(vm.name) or vm)
        except Exception as exc:  # the row stays ``deleting``: the next pass retries
            log.error("pool: deleting VM %s failed (retried on the next pass): %s", vm.name, exc)

    async def _wait_ready(self, vm: PoolVm) -> None:
        assert self.claimer is not None
        deadline = time.monotonic() + self.options.boot_timeout
        while True:
            try:
                await self.claimer.probe(vm)
                return
            except ClaimFailed as exc:
                if time.monotonic() >= deadline:
                    raise ClaimFailed(f"no answer after {self.options.boot_timeout:g}s: {exc}") from None
            await asyncio.sleep(PROBE_INTERVAL)

    def _grown(self, task: asyncio.Task[None]) -> None:
        self._growing.discard(task)
        failed = not task.cancelled() and task.exception() is not None
        self._failures = self._failures + 1 if failed else 0
        if failed:  # back off on cloud errors: 2 s, 4 s, ... up to 5 min
            backoff = Backoff(initial=2.0, factor=2.0, maximum=300.0, jitter=0.2).delays()
            delay = next(d for n, d in enumerate(backoff) if n + 1 >= self._failures)
            self._quiet_until = time.monotonic() + delay
            log.warning("pool: refill paused for %.0fs after %d failure(s)", delay, self._failures)
        self._kick.set()

    # -------------------------------------------------------- start and stop
    async def recover(self) -> list[str]:
        """After a restart: ready VMs are re-adopted; VMs a crash left booting are deleted."""
        async def one(vm: PoolVm) -> str | None:
            if vm.state is PoolState.READY:
                return f"pool VM {vm.name} ({vm.instance_id}): re-adopted"
            if await self.discard(vm):
                return f"pool VM {vm.name}: interrupted {'creation' if vm.state is PoolState.BOOTING else 'deletion'}, deleted"
            return None

        # At once: the daemon listens only after recovery, and each deletion waits for the cloud.
        results = await asyncio.gather(*(one(vm) for vm in self.pool.all()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        actions = [line for line in results if isinstance(line, str)]
        for line in actions:
            log.info("pool: %s", line)
        return actions

    def start(self) -> None:
        """Run the refill loop in the background (``close`` stops it)."""
        self._task = asyncio.create_task(self._run(), name="warm-pool")

    def kick(self) -> None:
        self._kick.set()

    async def settle(self) -> None:
        """Wait until no pool VM is being created (each ends ready, or failed and deleted)."""
        while self._growing:
            await asyncio.gather(*list(self._growing), return_exceptions=True)

    async def _run(self) -> None:
        while not self._stopping:
            self._kick.clear()
            try:
                await self.reconcile()
            except Exception as exc:  # a cloud error deleting: retried on the next pass
                log.error("pool: reconcile failed: %s", exc)
            wait = max(0.0, self._quiet_until - time.monotonic()) or IDLE_CHECK
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), min(wait, IDLE_CHECK))

    async def close(self) -> None:
        """Stop the loop after its current pass (a deletion is never cut short) and interrupt creations
        (those VMs are deleted); ready VMs keep running for the restart."""
        self._stopping = True
        self._kick.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._growing):
            task.cancel()
        await asyncio.gather(*self._growing, return_exceptions=True)
