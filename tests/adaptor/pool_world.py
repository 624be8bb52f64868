"""A lifecycle with a warm pool over the fake provider, and a claimer standing in for pool VMs."""

from __future__ import annotations

from pathlib import Path

from cloudadaptor.adaptor.delivery import BootDelivery
from cloudadaptor.adaptor.lifecycle import LifecycleOptions, SandboxLifecycle
from cloudadaptor.adaptor.pool import Claimer, PoolOptions, WarmPool
from cloudadaptor.adaptor.store import SandboxStore
from cloudadaptor.providers.base import TAG_CLUSTER, Provider
from cloudadaptor.vmlimit import VmLimit
from fakes.poolvm import FakeClaimer

NODE = "node-a"
CLUSTER = "cluster-a"
TAGS = {TAG_CLUSTER: CLUSTER}  # every VM of this cluster carries it, pool VMs too


_FAKE_IS_A_CLAIMER: type[Claimer] = FakeClaimer


def make_lifecycle(db: Path, pods_dir: Path, provider: Provider, pod_network, agent_port: int, *, size: int = 2,
                   claimer: Claimer | None = None, vm_limit: int | None = None, max_age: float = 86400.0,
                   concurrency: int = 2) -> tuple[SandboxLifecycle, WarmPool, SandboxStore]:
    store = SandboxStore(db)
    pool = WarmPool(
        options=PoolOptions(size=size, max_age=max_age, refill_concurrency=concurrency, boot_timeout=5.0,
                            node_name=NODE, extra_tags=TAGS, agent_port=agent_port, vm_limit=VmLimit(vm_limit)),
        store=store, provider=provider, tls=None, cold=BootDelivery(provider, NODE, TAGS),
        claimer=claimer if claimer is not None else FakeClaimer())
    lifecycle = SandboxLifecycle(
        options=LifecycleOptions(pods_dir=pods_dir, node_name=NODE, cluster_id=CLUSTER, proxy_timeout=5.0, agent_port=agent_port,
                                 vm_limit=VmLimit(vm_limit)),
        store=store, provider=provider, pod_network=pod_network, tls=None, delivery=pool)
    return lifecycle, pool, store
