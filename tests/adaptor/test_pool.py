"""The warm pool in the lifecycle (fake provider, fake claimer, real agent proxy on loopback)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from cloudadaptor.adaptor.delivery import CLAIMED_READY_POLL, readiness_poll
from cloudadaptor.adaptor.poolstore import PoolState
from cloudadaptor.adaptor.store import SandboxState
from cloudadaptor.dev.shim import shim_annotations
from cloudadaptor.providers import base as providers

from pool_world import CLUSTER, NODE, FakeClaimer, make_lifecycle

_HV = "io.katacontainers.config.hypervisor."


@pytest.fixture
def world(tmp_path, short_dir, provider, pod_network, agent):
    made = []

    def make(**kwargs):
        made.append(make_lifecycle(tmp_path / "state.db", short_dir / "pods", provider, pod_network, agent.port, **kwargs))
        return made[-1]

    yield make
    for lifecycle, pool, store in made:
        store.close()


async def filled(pool):
    for _ in range(10):  # refill_concurrency VMs per pass
        await pool.reconcile()
        await pool.settle()
        if len(pool.pool.all()) == pool.target():
            break
    assert all(vm.state is PoolState.READY for vm in pool.pool.all())
    return pool.pool.all()


def sandbox_id(n: int) -> str:
    return f"{n:x}" * 64 if n < 16 else f"{n:064x}"


async def start_pod(lifecycle, netns_file, n: int, extra=None) -> str:
    sid = sandbox_id(n)
    await lifecycle.create(sid, shim_annotations(f"pod{n}", "ns", extra), netns_file)
    await lifecycle.start(sid)
    return sid


async def test_startvm_claims_a_ready_pool_vm_and_the_pool_refills(world, provider, netns_file):
    lifecycle, pool, store = world(size=2)
    ready = await filled(pool)
    assert len(ready) == 2 and len(provider.instances) == 2
    for spec in provider.created:
        assert spec.tags[providers.TAG_POOL] == spec.name and spec.tags[providers.TAG_NODE] == NODE
        assert providers.TAG_SANDBOX not in spec.tags and '"network":null' in spec.user_data
    sid = await start_pod(lifecycle, netns_file, 1)
    sandbox = store.get(sid)
    assert sandbox.state is SandboxState.RUNNING
    assert sandbox.instance_id == ready[0].instance_id, "the oldest ready VM is claimed"
    assert pool.claimer.claims == [(ready[0].name, sandbox.user_data)], "the claim carries the pod's user data"
    assert len(provider.created) == 2, "no cold create"
    assert [vm.name for vm in pool.pool.all()] == [ready[1].name]
    await filled(pool)
    assert len(pool.pool.all()) == 2 and len(provider.instances) == 3
    await lifecycle.stop(sid)
    assert sandbox.instance_id not in provider.instances, "a claimed VM is deleted by StopVM, never returned"
    assert len(pool.pool.all()) == 2
    await lifecycle.close()


async def test_a_claimed_vm_is_polled_tightly_and_a_cold_one_with_the_proxys_default(world, provider, netns_file):
    lifecycle, pool, store = world(size=1)
    await filled(pool)
    warm_id, cold_id = sandbox_id(1), sandbox_id(2)
    for n, sid in ((1, warm_id), (2, cold_id)):
        await lifecycle.create(sid, shim_annotations(f"pod{n}", "ns"), netns_file)
    warm = await pool.deliver(store.get(warm_id))
    cold = await pool.deliver(store.get(cold_id))  # the pool's only VM is taken: cold
    assert warm.tags.get(providers.TAG_POOL), "a claimed VM is delivered as the pool VM it is"
    assert readiness_poll(warm) is CLAIMED_READY_POLL and CLAIMED_READY_POLL.maximum <= 0.1
    assert providers.TAG_POOL not in cold.tags and readiness_poll(cold) is None, "a booting VM: the default backoff"
    for sid in (warm_id, cold_id):
        await lifecycle.stop(sid)
    assert {i.id for i in provider.instances.values()} == {vm.instance_id for vm in pool.pool.all()}
    await lifecycle.close()


async def test_a_burst_larger_than_the_pool_starts_the_rest_cold(world, provider, netns_file):
    lifecycle, pool, store = world(size=2, concurrency=1)
    ready = {vm.instance_id for vm in await filled(pool)}
    ids = await asyncio.gather(*(start_pod(lifecycle, netns_file, n) for n in range(1, 5)))
    instances = [store.get(sid).instance_id for sid in ids]
    assert len(set(instances)) == 4, "one VM per pod"
    assert len(ready & set(instances)) == 2, "the pool's two VMs went to two pods"
    cold = [spec for spec in provider.created if providers.TAG_SANDBOX in spec.tags]
    assert len(cold) == 2 and all(store.get(sid).state is SandboxState.RUNNING for sid in ids)
    for sid in ids:
        await lifecycle.stop(sid)
    await lifecycle.close()


async def test_a_refused_claim_deletes_that_vm_and_starts_cold_in_the_same_startvm(world, provider, netns_file, caplog):
    lifecycle, pool, store = world(size=1, claimer=FakeClaimer(refuse={"*"}))
    [vm] = await filled(pool)
    caplog.set_level(logging.INFO)
    sid = await start_pod(lifecycle, netns_file, 1)
    sandbox = store.get(sid)
    assert sandbox.state is SandboxState.RUNNING
    assert vm.instance_id in provider.deleted and sandbox.instance_id != vm.instance_id
    assert f"claim of pool VM {vm.name}" in caplog.text and "starting cold" in caplog.text
    await lifecycle.stop(sid)
    await lifecycle.close()


@pytest.mark.parametrize("extra, words", [
    ({_HV + "machine_type": "m5.xlarge"}, "instance type 'm5.xlarge'"),
    ({_HV + "image": "ami-0123"}, "image 'ami-0123'"),
    ({_HV + "default_gpus": "1"}, "1 GPUs"),
])
async def test_a_pod_asking_for_another_kind_of_vm_starts_cold_and_the_log_says_why(
        world, provider, netns_file, caplog, extra, words):
    lifecycle, pool, store = world(size=1)
    [vm] = await filled(pool)
    caplog.set_level(logging.INFO)
    sid = await start_pod(lifecycle, netns_file, 1, extra)
    assert store.get(sid).instance_id != vm.instance_id
    assert [v.name for v in pool.pool.all()] == [vm.name], "the pool VM stays pooled"
    assert f"cold start: it asks for {words}" in caplog.text
    await lifecycle.stop(sid)
    await lifecycle.close()


async def test_an_empty_pool_starts_cold(world, provider, netns_file, caplog):
    lifecycle, pool, store = world(size=1)
    caplog.set_level(logging.INFO)
    sid = await start_pod(lifecycle, netns_file, 1)
    assert "cold start: no ready pool VM" in caplog.text
    assert store.get(sid).instance_id in provider.instances
    await lifecycle.stop(sid)
    await lifecycle.close()


async def test_turning_the_pool_off_or_shrinking_it_deletes_its_vms(world, provider, netns_file):
    lifecycle, pool, store = world(size=3)
    await filled(pool)
    sid = await start_pod(lifecycle, netns_file, 1)
    claimed = store.get(sid).instance_id
    await lifecycle.close()
    store.close()
    _, smaller, store = world(size=1)
    actions = await smaller.reconcile()
    assert sum("surplus" in line for line in actions) == 1 and len(smaller.pool.all()) == 1
    store.close()
    lifecycle, off, store = world(size=0)
    await off.reconcile()
    assert off.pool.all() == []
    assert set(provider.instances) == {claimed}, "only the claimed VM is left, for its StopVM"
    await lifecycle.recover()
    await lifecycle.stop(sid)
    assert provider.instances == {}
    await lifecycle.close()


async def test_a_vm_older_than_max_age_is_replaced(world, provider):
    lifecycle, pool, store = world(size=1, max_age=60.0)
    [old] = await filled(pool)
    store.connection.execute("UPDATE pool_vms SET created_at = ?", (time.time() - 120,))
    actions = await pool.reconcile()
    await pool.settle()
    assert any("older than PODVM_POOL_MAX_AGE" in line for line in actions)
    [new] = pool.pool.all()
    assert new.name != old.name and old.instance_id not in provider.instances and new.state is PoolState.READY


async def test_pool_vms_count_against_the_node_limit(world, provider, netns_file):
    lifecycle, pool, store = world(size=2, vm_limit=3)
    await filled(pool)
    ids = [await start_pod(lifecycle, netns_file, n) for n in (1, 2)]  # both warm
    await filled(pool)
    assert len(pool.pool.all()) == 1, "3 VMs at most: 2 owned + 1 pooled"
    ids.append(await start_pod(lifecycle, netns_file, 3))  # warm again: claims the last one
    await filled(pool)
    assert pool.pool.all() == [] and len(provider.instances) == 3
    for sid in ids:
        await lifecycle.stop(sid)
    await filled(pool)
    assert len(pool.pool.all()) == 2
    await lifecycle.close()


async def test_the_orphan_sweep_spares_pooled_and_claimed_vms_but_not_untracked_pool_vms(world, provider, netns_file):
    lifecycle, pool, store = world(size=2)
    await filled(pool)
    sid = await start_pod(lifecycle, netns_file, 1)
    stray = await provider.create_instance(providers.InstanceSpec(
        name="podvm-pool-deadbeef", sandbox_id="podvm-pool-deadbeef", user_data="", client_token="stray",
        tags={providers.TAG_OWNER: providers.OWNER_VALUE, providers.TAG_NODE: NODE, providers.TAG_CLUSTER: CLUSTER,
              providers.TAG_POOL: "podvm-pool-deadbeef"}))
    actions = await lifecycle.sweep_orphans()
    assert actions == [f"deleted orphan VM {stray.id} (sandbox ?)"]
    assert store.get(sid).instance_id in provider.instances and len(pool.pool.all()) == 1
    await lifecycle.stop(sid)
    await lifecycle.close()


async def test_cloud_errors_back_off_and_leave_nothing(world, provider):
    lifecycle, pool, store = world(size=2)
    provider.fail_create = "InsufficientInstanceCapacity"
    await pool.reconcile()
    await pool.settle()
    assert pool.pool.all() == [] and provider.instances == {}
    assert pool._quiet_until > time.monotonic(), "refill pauses after a cloud error"
    assert await pool.reconcile() == [], "no new VM while backing off"


async def test_a_vm_the_cloud_refuses_to_delete_stays_recorded_and_unclaimable_until_deleted(world, provider, netns_file):
    lifecycle, pool, store = world(size=1)
    [vm] = await filled(pool)
    store.close()
    _, off, store = world(size=0)
    real_delete = provider.delete_instance

    async def refuse(instance_id):
        raise providers.ProviderError("throttled")

    provider.delete_instance = refuse
    with pytest.raises(providers.ProviderError):
        await off.reconcile()
    [row] = off.pool.all()
    assert row.state is PoolState.DELETING and vm.instance_id in provider.instances, "recorded, not leaked"
    assert off.pool.take("x" * 64, 0.0) is None, "a VM being deleted is never claimed"
    provider.delete_instance = real_delete
    await off.reconcile()
    assert off.pool.all() == [] and provider.instances == {}
