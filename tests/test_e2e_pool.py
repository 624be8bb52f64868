"""The warm pool end to end with the local provider: pool VMs boot for real (their own netns, the
wait-for-claim step, then the pod network, agent and forwarder once claimed over mTLS)."""

from __future__ import annotations

import asyncio
import dataclasses

from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.adaptor.poolstore import PoolState
from cloudadaptor.dev.shim import ShimEmulator, start_pod, stop_pod

from test_e2e import _check_data_path, daemon_factory  # noqa: F401 - the fixture is used by name


async def ready_pool(daemon: Daemon, count: int, timeout: float = 60.0) -> list:
    async with asyncio.timeout(timeout):
        while True:
            vms = [vm for vm in daemon.pool.pool.all() if vm.state is PoolState.READY]
            if len(vms) >= count:
                return vms
            await asyncio.sleep(0.2)


async def turn_the_pool_off(daemon: Daemon) -> None:
    """Restart the daemon with PODVM_POOL_SIZE=0: every pool VM is deleted."""
    await daemon.close()
    off = Daemon(dataclasses.replace(daemon.settings, podvm_pool_size=0))
    await off.start()
    try:
        async with asyncio.timeout(30):  # its refill loop deletes them at once
            while off.pool.pool.all() or await off.provider.list_owned({}):
                await asyncio.sleep(0.2)
    finally:
        await off.close()


async def test_a_pod_starts_on_a_claimed_pool_vm_and_the_pool_refills(daemon_factory, make_pod_netns):  # noqa: F811
    daemon, socket_path = await daemon_factory(PODVM_POOL_SIZE="1")
    [vm] = await ready_pool(daemon, 1)
    shim = ShimEmulator(socket_path)
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.50/24", "198.51.100.1")
    run, _, _ = await start_pod(shim, "warm", "e2e", pod.path)
    assert daemon.lifecycle.store.get(run.sandbox_id).instance_id == vm.instance_id, "the pool VM was claimed"
    assert run.guest is not None and run.guest.agent_details.version.startswith("devagent ")
    await _check_data_path(run, pod.pod_ip)
    [refill] = await ready_pool(daemon, 1)
    assert refill.name != vm.name
    await stop_pod(shim, run)
    owned = {i.id for i in await daemon.provider.list_owned({})}
    assert owned == {refill.instance_id}, "the claimed VM is deleted by StopVM, never returned to the pool"
    await turn_the_pool_off(daemon)


async def test_a_dead_pool_vm_is_deleted_and_the_pod_starts_cold_in_the_same_startvm(
        daemon_factory, make_pod_netns, caplog):  # noqa: F811
    daemon, socket_path = await daemon_factory(PODVM_POOL_SIZE="1")
    [vm] = await ready_pool(daemon, 1)
    await daemon.provider.delete_instance(vm.instance_id)  # the VM died behind the pool's back
    shim = ShimEmulator(socket_path)
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.51/24", "198.51.100.1")
    run, _, _ = await start_pod(shim, "fallback", "e2e", pod.path)
    sandbox = daemon.lifecycle.store.get(run.sandbox_id)
    assert sandbox.instance_id != vm.instance_id
    assert f"claim of pool VM {vm.name}" in caplog.text and "starting cold" in caplog.text
    await _check_data_path(run, pod.pod_ip)
    await stop_pod(shim, run)
    await turn_the_pool_off(daemon)
