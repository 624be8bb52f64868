"""Stand-ins for warm-pool VMs where no VM runs (moto, the ARM endpoint, the fake provider), and the
cloud round trip every provider must pass: fill, claim, delete the claimed VM, turn the pool off."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from cloudadaptor.adaptor.delivery import BootDelivery
from cloudadaptor.adaptor.pool import ClaimFailed, PoolOptions, WarmPool
from cloudadaptor.adaptor.poolstore import PoolState, PoolVm
from cloudadaptor.adaptor.store import Sandbox, SandboxStore
from cloudadaptor.providers import base as providers


@dataclass
class FakeClaimer:
    """Pool VMs that answer at once; ``refuse`` names VMs whose claim fails (``*``: all)."""

    refuse: set[str] = field(default_factory=set)
    claims: list[tuple[str, str]] = field(default_factory=list)  # (pool VM name, user data sent)

    async def probe(self, vm: PoolVm) -> None:
        pass

    async def claim(self, vm: PoolVm, user_data: str) -> None:
        if vm.name in self.refuse or "*" in self.refuse:
            raise ClaimFailed("connection refused")
        self.claims.append((vm.name, user_data))


def _pool(provider: providers.Provider, store: SandboxStore, node: str, tags: Mapping[str, str], size: int) -> WarmPool:
    return WarmPool(options=PoolOptions(size=size, node_name=node, extra_tags=tags, boot_timeout=5.0),
                    store=store, provider=provider, tls=None, cold=BootDelivery(provider, node, tags),
                    claimer=FakeClaimer())


async def cloud_round_trip(provider: providers.Provider, db: Path, node: str, tags: Mapping[str, str]) -> None:
    """Two pool VMs made and tagged in the cloud; one claimed by a sandbox; the claimed one deleted
    (StopVM); the pool turned off: nothing of this node is left in the cloud."""
    store = SandboxStore(db)
    try:
        pool = _pool(provider, store, node, tags, 2)
        await pool.reconcile()
        await pool.settle()
        vms = pool.pool.all()
        assert [vm.state for vm in vms] == [PoolState.READY] * 2, vms
        for vm in vms:
            [instance] = await provider.list_owned({providers.TAG_POOL: vm.name, providers.TAG_NODE: node})
            assert instance.id == vm.instance_id and providers.TAG_SANDBOX not in instance.tags
            assert all(instance.tags.get(k) == v for k, v in tags.items()), instance.tags
        sandbox = Sandbox(id="c" * 64, pod_name="web", pod_namespace="default", netns_path="/x", vm_name="podvm-web-cccccccc",
                          agent_socket="/x/agent.ttrpc", user_data="#cloud-config\n")
        store.add(sandbox)
        claimed = await pool.deliver(sandbox)
        assert claimed.id == vms[0].instance_id and store.get(sandbox.id).instance_id == claimed.id
        assert [vm.name for vm in pool.pool.all()] == [vms[1].name]
        await provider.delete_instance(claimed.id)  # StopVM
        off = _pool(provider, store, node, tags, 0)
        await off.reconcile()
        assert off.pool.all() == []
        left = await provider.list_owned({providers.TAG_OWNER: providers.OWNER_VALUE, providers.TAG_NODE: node})
        assert left == [], f"left in the cloud: {left}"
    finally:
        store.close()
