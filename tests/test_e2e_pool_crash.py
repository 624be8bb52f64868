"""The warm pool under SIGKILL: a real `cloud-api-adaptor serve` process killed at random instants.

The daemon runs as a child process on the local provider (namespace VMs, a short
LOCAL_BOOT_DELAY, PODVM_POOL_SIZE=2). Each of 50 rounds restarts it (recovery
runs before it listens), checks the invariant, then stops the previous round's
pods and starts new ones — claims of pool VMs, cold starts when the pool is
empty, refills behind the claims — and SIGKILLs it at a random instant.

The invariant, checked after every restart with the daemon frozen (SIGSTOP, so
the state store and the local cloud hold still while they are read): every VM
in the local cloud is pooled (a ``pool_vms`` row by instance id, or by its
``peerpods.io/pool`` name while it is being created) or owned by exactly one
sandbox row (its ``instance_id``), never both, never neither; no VM is shared;
no sandbox is left ``starting``. At the end every pod is stopped, the pool is
turned off and the local cloud must be empty.

The rounds come from a seeded random (printed; ``POOL_CRASH_SEED`` replays one,
``POOL_CRASH_ROUNDS`` changes their number);
timing on a loaded machine still varies, so a failure prints the round, the
instant and the daemon's log.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
from dataclasses import dataclass

from cloudadaptor.config import load_settings
from cloudadaptor.dev.shim import ShimEmulator, shim_annotations
from cloudadaptor.providers.base import TAG_POOL, create_provider

from test_e2e_restart import ServeProcess, serve_process  # noqa: F401 - the fixture is used by name

ROUNDS = int(os.environ.get("POOL_CRASH_ROUNDS", "50"))
POOL_SIZE = 2
PODS = 6  # pod network namespaces; a round starts its pods on those no sandbox row holds
CLAIM_ROUNDS = 0.4  # the share of rounds that first wait (at most 2.5 s) for a ready pool VM to claim
KILL_WITHIN = 0.8  # seconds after a round's calls begin: claims, refills and cold creates all happen early
SEED = int(os.environ.get("POOL_CRASH_SEED", "14"))


@dataclass(frozen=True)
class World:
    """What the store and the local cloud hold at one instant."""

    sandboxes: dict[str, tuple[str, str, str]]  # id -> (state, instance id, netns path)
    pooled: dict[str, tuple[str, str]]  # pool VM name -> (state, instance id)
    cloud: dict[str, str]  # instance id -> its pool name ("" for a sandbox's VM)


def read_store(proc: ServeProcess) -> tuple[dict[str, tuple[str, str, str]], dict[str, tuple[str, str]]]:
    """Sandbox and pool rows, read-only (the daemon is frozen or dead)."""
    db = sqlite3.connect(f"file:{proc.root / 'state.db'}?mode=ro", uri=True)
    try:
        sandboxes = {row[0]: (row[1], row[2], row[3])
                     for row in db.execute("SELECT id, state, instance_id, netns_path FROM sandboxes")}
        pooled = {row[0]: (row[1], row[2]) for row in db.execute("SELECT name, state, instance_id FROM pool_vms")}
    finally:
        db.close()
    return sandboxes, pooled


async def read_world(proc: ServeProcess) -> World:
    """The store, then the local cloud's instances (through the provider, as another client of that cloud)."""
    sandboxes, pooled = await asyncio.to_thread(read_store, proc)
    cloud = {i.id: i.tags.get(TAG_POOL, "") for i in await local_cloud(proc).list_owned({})}
    return World(sandboxes, pooled, cloud)


def local_cloud(proc: ServeProcess):
    return create_provider(load_settings(proc.env))


def check_invariant(world: World, where: str) -> None:
    pooled_ids = {instance for _, instance in world.pooled.values()} - {""}
    owners: dict[str, list[str]] = {}
    for sandbox_id, (_, instance, _) in world.sandboxes.items():
        if instance:
            owners.setdefault(instance, []).append(sandbox_id[:8])
    both = pooled_ids & set(owners)
    assert not both, f"{where}: VM(s) both pooled and owned by a sandbox: {sorted(both)}"
    for instance, pool_name in world.cloud.items():
        in_pool = instance in pooled_ids or (pool_name in world.pooled and world.pooled[pool_name][1] in ("", instance))
        owned = owners.get(instance, [])
        assert len(owned) <= 1, f"{where}: VM {instance} shared by sandboxes {owned}"
        assert not (in_pool and owned), f"{where}: VM {instance} is pooled and owned by {owned}"
        assert in_pool or owned, (f"{where}: VM {instance} (pool name {pool_name!r}) leaked: no pool row and "
                                  f"no sandbox row owns it; pool {world.pooled}, sandboxes {world.sandboxes}")
    for sandbox_id, (state, instance, _) in world.sandboxes.items():
        assert state != "starting", f"{where}: sandbox {sandbox_id[:8]} still starting after recovery"
        if state == "running":
            assert instance in world.cloud, f"{where}: running sandbox {sandbox_id[:8]} lost its VM {instance}"
    for name, (state, instance) in world.pooled.items():
        if state == "ready":
            assert instance in world.cloud, f"{where}: ready pool VM {name} ({instance}) is gone from the cloud"


async def frozen_check(proc: ServeProcess, where: str) -> World:
    """Freeze the daemon (SIGSTOP), read and check, let it go on (SIGCONT)."""
    assert proc.process is not None
    proc.process.send_signal(signal.SIGSTOP)
    try:
        world = await read_world(proc)
        check_invariant(world, where)
        return world
    finally:
        proc.process.send_signal(signal.SIGCONT)


async def ready_pool_vms(proc: ServeProcess, timeout: float) -> int:
    """Wait (at most ``timeout``) until a pool VM is ready; how many are."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ready = sum(state == "ready" for state, _ in (await read_world(proc)).pooled.values())
        if ready or loop.time() >= deadline:
            return ready
        await asyncio.sleep(0.1)


async def start(shim: ShimEmulator, sandbox_id: str, netns: str) -> None:
    await shim.create_vm(sandbox_id, netns, shim_annotations(f"crash-{sandbox_id[:6]}", "pool-crash"))
    await shim.start_vm(sandbox_id)


async def one_round(proc: ServeProcess, rng: random.Random, n: int, pods: list[str]) -> str:
    """Restart, check, then stop the old pods and start new ones until a random SIGKILL. Returns what it did."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    await proc.start()
    restarted = loop.time()
    world = await frozen_check(proc, f"seed {SEED} round {n}, after restart")
    ready = 0
    if rng.random() < CLAIM_ROUNDS:  # let the pool have a VM to claim (recovery deletes VMs a kill left booting)
        ready = await ready_pool_vms(proc, 2.5)
    waited = loop.time()
    shim = ShimEmulator(proc.socket)
    held = {netns for _, _, netns in world.sandboxes.values()}
    free = [p for p in pods if p not in held]
    new = [(f"{n:02x}{k:x}" + rng.randbytes(31).hex())[:64] for k in range(min(rng.randint(1, 3), len(free)))]
    calls = [shim.stop_vm(sandbox_id) for sandbox_id in world.sandboxes]
    calls += [start(shim, sandbox_id, netns) for sandbox_id, netns in zip(new, free)]
    tasks = [asyncio.ensure_future(call) for call in calls]
    kill_at = rng.uniform(0.0, KILL_WITHIN)
    await asyncio.wait(tasks, timeout=kill_at)
    proc.kill()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    done = sum(not isinstance(r, BaseException) for r in results)
    return (f"round {n}: restart {restarted - began:.2f}s, {ready} pool VMs ready after {waited - restarted:.2f}s; "
            f"stop {len(world.sandboxes)}, start {len(new)}, killed at {kill_at:.2f}s, {done} calls done")


async def test_sigkilled_daemon_never_leaks_or_shares_a_pool_vm(serve_process, make_pod_netns):  # noqa: F811
    print(f"pool crash campaign: seed {SEED} (POOL_CRASH_SEED={SEED} replays it), {ROUNDS} rounds")
    rng = random.Random(SEED)
    proc = serve_process(LOCAL_BOOT_DELAY="0.05s", PODVM_POOL_SIZE=str(POOL_SIZE), PROXY_TIMEOUT="20s")
    pods = [(await asyncio.to_thread(make_pod_netns, f"198.51.100.{80 + i}/24", "198.51.100.1")).path
            for i in range(PODS)]
    for n in range(ROUNDS):
        print(await one_round(proc, rng, n, pods))  # shown with a failure: the rounds before it
    log = (proc.root / "serve.log").read_text()
    claims, refills = log.count("claimed pool VM"), log.count("interrupted creation, deleted")
    print(f"{claims} claims, {refills} pool VM creations cut short by a kill, {log.count('interrupted start')} starts")
    # The campaign must exercise what it is about (counts of events, not timings): about half the rounds claim.
    assert claims >= ROUNDS // 10 and refills >= ROUNDS // 10, f"too few claims ({claims}) or killed refills ({refills})"
    await proc.start()
    world = await frozen_check(proc, f"seed {SEED}, after the last restart")
    shim = ShimEmulator(proc.socket)
    for sandbox_id in world.sandboxes:
        await shim.stop_vm(sandbox_id)
    proc.kill()
    proc.env["PODVM_POOL_SIZE"] = "0"  # turned off: the restarted daemon deletes every pool VM
    await proc.start()
    async with asyncio.timeout(60):
        while (world := await read_world(proc)).cloud or world.pooled or world.sandboxes:
            await asyncio.sleep(0.2)
    proc.kill()
    assert await local_cloud(proc).list_owned({}) == [], "VMs left in the local cloud with every pod stopped and the pool off"
    vm_netns = [name for name in os.listdir("/run/netns") if name.startswith("i-local-")]
    assert vm_netns == [], f"VM namespaces left: {vm_netns}"
