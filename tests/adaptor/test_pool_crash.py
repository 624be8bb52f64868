"""Kill the daemon at random instants during claims and refills (50 rounds): after the restart every
VM is in the pool, or owned by exactly one sandbox, or deleted — none leaked, none shared.

A kill is modelled exactly: at the chosen provider or claim call (before or after its effect) the
store file and the cloud are snapshotted, and the restarted daemon gets the snapshot, so nothing the
dying process did after that instant counts."""

from __future__ import annotations

import asyncio
import copy
import random
import sqlite3
from pathlib import Path

from cloudadaptor.adaptor.poolstore import PoolState, PoolStore
from cloudadaptor.adaptor.store import SandboxState
from cloudadaptor.dev.shim import shim_annotations
from cloudadaptor.providers import base as providers

from fakes.lifecycle import FakePodNetwork, FakeProvider
from pool_world import FakeClaimer, make_lifecycle

ROUNDS = 50


class Killed(BaseException):
    """The daemon died here."""


class Killer:
    """Counts side-effecting calls; at call ``at`` snapshots the world and kills."""

    def __init__(self, at: int | None, db: Path, after_effect: bool) -> None:
        self.at, self.db, self.after_effect = at, db, after_effect
        self.calls = 0
        self.dead = False
        self.snapshot: tuple[Path, dict, dict] | None = None

    def _snapshot(self, cloud: FakeProvider) -> None:
        target = self.db.with_name("after-kill.db")
        source = sqlite3.connect(self.db)
        dest = sqlite3.connect(target)
        source.backup(dest)
        source.close()
        dest.close()
        self.snapshot = (target, copy.deepcopy(cloud.instances), dict(cloud.by_token))

    async def call(self, cloud: FakeProvider, effect):
        if self.dead:
            raise Killed()
        self.calls += 1
        if self.calls != self.at:
            return await effect()
        if self.after_effect:
            await effect()
            self._snapshot(cloud)
        else:
            self._snapshot(cloud)
        self.dead = True
        raise Killed()


class KillableProvider(FakeProvider):
    killer: Killer

    async def create_instance(self, spec):
        return await self.killer.call(self, lambda: FakeProvider.create_instance(self, spec))

    async def delete_instance(self, instance_id):
        return await self.killer.call(self, lambda: FakeProvider.delete_instance(self, instance_id))


class KillableClaimer(FakeClaimer):
    def __init__(self, killer: Killer, cloud: FakeProvider) -> None:
        super().__init__()
        self.killer, self.cloud = killer, cloud

    async def claim(self, vm, user_data):
        return await self.killer.call(self.cloud, lambda: FakeClaimer.claim(self, vm, user_data))


async def scenario(lifecycle, pool, netns_file) -> None:
    """Fill the pool, then start a burst bigger than it while it refills, and stop one pod."""
    for _ in range(3):
        await pool.reconcile()
        await pool.settle()
    ids = [f"{n:x}" * 64 for n in range(1, 4)]
    for n, sid in enumerate(ids):
        await lifecycle.create(sid, shim_annotations(f"pod{n}", "ns"), netns_file)
    refill = asyncio.create_task(pool.reconcile())
    await asyncio.gather(*(lifecycle.start(sid) for sid in ids))
    await refill
    await lifecycle.stop(ids[0])
    await pool.reconcile()
    await pool.settle()


def check_invariant(cloud: FakeProvider, store, where: str) -> None:
    pooled = {vm.name: vm for vm in PoolStore(store).all()}
    owners: dict[str, list[str]] = {}
    for sandbox in store.all():
        if sandbox.instance_id:
            owners.setdefault(sandbox.instance_id, []).append(sandbox.id)
    pooled_ids = {vm.instance_id for vm in pooled.values()} - {""}
    assert not pooled_ids & set(owners), f"{where}: a VM both pooled and owned: {pooled_ids & set(owners)}"
    for instance in cloud.instances.values():
        in_pool = instance.id in pooled_ids or instance.tags.get(providers.TAG_POOL) in pooled
        owned = owners.get(instance.id, [])
        assert len(owned) <= 1, f"{where}: VM {instance.id} shared by sandboxes {owned}"
        assert in_pool or owned, f"{where}: VM {instance.id} ({instance.name}) leaked: neither pooled nor owned"
    for sandbox in store.all():
        if sandbox.state is SandboxState.RUNNING:
            assert sandbox.instance_id in cloud.instances, f"{where}: running sandbox {sandbox.id[:8]} lost its VM"
    for vm in pooled.values():
        if vm.state is PoolState.READY:
            assert vm.instance_id in cloud.instances, f"{where}: ready pool VM {vm.name} is gone from the cloud"


async def one_round(tmp: Path, pods_dir: Path, agent_port: int, netns_file: str, at: int | None, after: bool) -> int:
    db = tmp / "state.db"
    killer = Killer(at, db, after)
    cloud = KillableProvider()
    cloud.killer = killer
    lifecycle, pool, store = make_lifecycle(db, pods_dir, cloud, FakePodNetwork(), agent_port, size=2,
                                            claimer=KillableClaimer(killer, cloud))
    try:
        await scenario(lifecycle, pool, netns_file)
    except (Killed, Exception):
        pass  # the lifecycle turns a Killed inside StartVM into its own errors
    await pool.close()
    await lifecycle.close()
    store.close()
    if at is None:
        return killer.calls
    assert killer.snapshot is not None, f"call {at} never happened"
    snapshot_db, instances, tokens = killer.snapshot
    restarted = FakeProvider(instances=instances, by_token=tokens)
    restarted._ids = iter(range(1000, 2000))  # type: ignore[assignment]
    lifecycle, pool, store = make_lifecycle(snapshot_db, pods_dir, restarted, FakePodNetwork(), agent_port, size=2)
    where = f"kill at call {at} ({'after' if after else 'before'} its effect)"
    try:
        await lifecycle.recover()
        await pool.recover()
        check_invariant(restarted, store, where + ", after recovery")
        await pool.reconcile()
        await pool.settle()
        check_invariant(restarted, store, where + ", after refill")
        for sandbox in store.all():  # every pod stopped and the pool off: nothing left in the cloud
            await lifecycle.stop(sandbox.id)
        off = make_lifecycle(snapshot_db, pods_dir, restarted, FakePodNetwork(), agent_port, size=0)
        await off[1].reconcile()
        off[2].close()
        assert restarted.instances == {}, f"{where}: left in the cloud: {sorted(restarted.instances)}"
    finally:
        await lifecycle.close()
        store.close()
    return 0


async def test_killing_the_daemon_during_claims_and_refills_leaks_and_shares_nothing(tmp_path, short_dir, agent, netns_file):
    clean = tmp_path / "clean"
    clean.mkdir()
    calls = await one_round(clean, short_dir / "pods-clean", agent.port, netns_file, None, False)
    assert calls >= 5, f"the scenario makes too few calls ({calls}) to kill it in interesting places"
    rng = random.Random(14)
    for n in range(ROUNDS):
        directory = tmp_path / f"round{n}"
        directory.mkdir()
        await one_round(directory, short_dir / f"p{n}", agent.port, netns_file, rng.randint(1, calls), rng.random() < 0.5)
