"""Pod start (CreateVM + StartVM) cold vs warm with the warm pool, and the pool's refill time.

    .venv/bin/python -m cloudadaptor.dev.privatens -- .venv/bin/python -m bench.pool [--boot-delay 30s] [--pool-size 3]

Runs inside the private namespace with CLOUD_PROVIDER=local: every VM is a real
local VM (its own netns, our VM-side code) whose boot is slowed by
``LOCAL_BOOT_DELAY`` to imitate a cloud. In one run:

1. one pod with the pool off (cold);
2. the pool turned on: the time to fill it from empty;
3. one pod with the pool full (warm), then the time to refill the VM it took;
4. a burst of ``pool size + 2`` pods at once: the first ``pool size`` warm,
   the last two cold;
5. every pod stopped and the pool turned off: the local cloud must be empty.

Figures are printed, never asserted: they depend on the machine. Alone it
prints the side-by-side block the README shows, then the same figures as rows;
``make bench`` runs it as its ``pool`` section (``run(quick)``: a 30 s boot,
or 3 s with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.adaptor.poolstore import PoolState
from cloudadaptor.config import load_settings, parse_duration
from cloudadaptor.dev import podnet, privatens
from cloudadaptor.dev.shim import PodRun, ShimEmulator, start_pod, stop_pod

from bench.table import Row, render


@dataclasses.dataclass(frozen=True)
class Figures:
    boot_delay: float
    size: int
    cold_s: float
    warm_s: float
    fill_s: float
    refill_s: float
    burst: list[tuple[str, float]]  # ("warm" | "cold", CreateVM+StartVM seconds), in start order


async def wait_pool(daemon: Daemon, ready: int, timeout: float) -> float:
    """Seconds until the pool holds ``ready`` ready VMs."""
    began = time.monotonic()
    assert daemon.pool is not None
    async with asyncio.timeout(timeout):
        while sum(vm.state is PoolState.READY for vm in daemon.pool.pool.all()) < ready:
            await asyncio.sleep(0.1)
    return time.monotonic() - began


async def pods(shim: ShimEmulator, names: list[str], netns: list[podnet.PodNetns]) -> list[tuple[PodRun, float]]:
    started = await asyncio.gather(*(start_pod(shim, name, "bench", ns.path) for name, ns in zip(names, netns)))
    return [(run, create_s + start_s) for run, create_s, start_s in started]


def warm(daemon: Daemon, run: PodRun, pool_ids: set[str]) -> bool:
    sandbox = daemon.lifecycle.store.get(run.sandbox_id) if daemon.lifecycle else None
    return sandbox is not None and sandbox.instance_id in pool_ids


def pool_ids(daemon: Daemon) -> set[str]:
    assert daemon.pool is not None
    return {vm.instance_id for vm in daemon.pool.pool.all() if vm.state is PoolState.READY}


async def bench(boot_delay: float, size: int, root: Path) -> Figures:
    env = {"CLOUD_PROVIDER": "local", "STATE_DIR": str(root), "SOCKET": str(root / "hv.sock"), "PODS_DIR": str(root / "pods"),
           "NODE_NAME": "bench-node", "LOCAL_CLOUD_BRIDGE": "ppbench0", "LOCAL_CLOUD_CIDR": "203.0.113.0/26",
           "LOCAL_BOOT_DELAY": f"{boot_delay}s", "PROXY_TIMEOUT": f"{max(60.0, boot_delay * 3)}s",
           "PODVM_POOL_REFILL_CONCURRENCY": "2", "PEERPODS_LIMIT_PER_NODE": str(2 * size + 4)}
    settings = load_settings(env)
    netns = [await asyncio.to_thread(podnet.create_pod_netns, f"bench-pod-{i}", f"198.51.100.{10 + i}/24", "198.51.100.1")
             for i in range(size + 3)]
    daemon = Daemon(settings)
    try:
        await daemon.start()
        shim = ShimEmulator(str(settings.socket))
        [(cold_run, cold_s)] = await pods(shim, ["cold-0"], netns[:1])
        await stop_pod(shim, cold_run)
        await daemon.close()

        daemon = Daemon(dataclasses.replace(settings, podvm_pool_size=size))
        await daemon.start()
        fill_s = await wait_pool(daemon, size, boot_delay * size + 120)
        before = pool_ids(daemon)
        [(warm_run, warm_s)] = await pods(shim, ["warm-0"], netns[1:2])
        if not warm(daemon, warm_run, before):
            print("note: the single 'warm' pod started cold (no ready pool VM)")
        refill_s = await wait_pool(daemon, size, boot_delay * 2 + 120)
        await stop_pod(shim, warm_run)
        ids = pool_ids(daemon)
        burst = await pods(shim, [f"burst-{i}" for i in range(size + 2)], netns[1:size + 3])
        kinds = ["warm" if warm(daemon, run, ids) else "cold" for run, _ in burst]
        for run, _ in burst:
            await stop_pod(shim, run)
        await daemon.close()
        daemon = Daemon(dataclasses.replace(settings, podvm_pool_size=0))
        await daemon.start()
        async with asyncio.timeout(120):
            while await daemon.provider.list_owned({}):  # type: ignore[union-attr]
                await asyncio.sleep(0.2)
        return Figures(boot_delay, size, cold_s, warm_s, fill_s, refill_s, [(k, s) for k, (_, s) in zip(kinds, burst)])
    finally:
        await daemon.close()
        for ns in netns:
            await asyncio.to_thread(ns.delete)


def report(f: Figures) -> None:
    warm_burst = [s for kind, s in f.burst if kind == "warm"]
    cold_burst = [s for kind, s in f.burst if kind == "cold"]
    print(f"pod start (CreateVM+StartVM), LOCAL_BOOT_DELAY={f.boot_delay:g}s, PODVM_POOL_SIZE={f.size}, {os.cpu_count()} CPUs")
    print(f"{'':28}{'cold':>10}{'warm':>10}{'ratio':>9}")
    print(f"{'1 pod':28}{f.cold_s:>9.2f}s{f.warm_s:>9.2f}s{f.cold_s / f.warm_s:>8.1f}x")
    if warm_burst and cold_burst:
        w, c = statistics.median(warm_burst), statistics.median(cold_burst)
        print(f"{f'burst of {len(f.burst)} (p50)':28}{c:>9.2f}s{w:>9.2f}s{c / w:>8.1f}x")
    print(f"burst: {sum(k == 'warm' for k, _ in f.burst)} warm, {sum(k == 'cold' for k, _ in f.burst)} cold, "
          f"each: {', '.join(f'{k} {s:.2f}s' for k, s in f.burst)}")
    print(f"pool fill from empty ({f.size} VMs, 2 at a time): {f.fill_s:.1f}s; refill after one claim: {f.refill_s:.1f}s")


def rows(f: Figures) -> list[Row]:
    """The figures as table rows: each warm start against the cold one of the same run."""
    delay = f"LOCAL_BOOT_DELAY={f.boot_delay:g}s"
    out = [Row(f"warm pod start, 1 pod (pool of {f.size}, {delay})", f.warm_s, "s", f.cold_s, "cold start"),]
    warm_burst = [s for kind, s in f.burst if kind == "warm"]
    cold_burst = [s for kind, s in f.burst if kind == "cold"]
    if warm_burst:
        cold = statistics.median(cold_burst) if cold_burst else f.cold_s
        out.append(Row(f"warm pod start p50, burst of {len(f.burst)} ({len(warm_burst)} warm, {len(cold_burst)} cold)",
                       statistics.median(warm_burst), "s", cold, "cold p50 of the burst", "≤ 1.5 s"))
    out.append(Row(f"pool refill after one claim ({delay})", f.refill_s, "s", f.boot_delay, "boot delay"))
    return out


def run(quick: bool) -> list[Row]:
    """``make bench``'s pool section: a 30 s imitated boot (3 s with --quick), a pool of 3."""
    root = Path(tempfile.mkdtemp(prefix="bench-pool-", dir="/run"))
    return rows(asyncio.run(bench(3.0 if quick else 30.0, 3, root)))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--boot-delay", default="30s", help="LOCAL_BOOT_DELAY, the imitated cloud boot (default 30s)")
    parser.add_argument("--pool-size", type=int, default=3, help="PODVM_POOL_SIZE (default 3)")
    args = parser.parse_args()
    if not privatens.inside():
        print("run inside the private namespace: python -m cloudadaptor.dev.privatens -- "
              f"{sys.executable} -m bench.pool {' '.join(sys.argv[1:])}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="bench-pool-", dir="/run"))
    figures = asyncio.run(bench(parse_duration(args.boot_delay), args.pool_size, root))
    report(figures)
    print()
    print(render(rows(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
