"""Pods through the real daemon: adaptor overhead, local VM boot, daemon memory and CPU.

``cloud-api-adaptor serve`` runs as a child with ``CLOUD_PROVIDER=local`` and
``LOCAL_BOOT_DELAY=0``; pods are started through the shim emulator exactly as
the kata shim would (CreateVM, StartVM, agent calls), one at a time and then
many at once. The daemon logs each StartVM's phases (VM create, tunnel, agent
wait); the adaptor's own overhead is the shim's CreateVM+StartVM wall time
minus the provider's create time and the wait for the VM's agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cloudadaptor.dev.podnet import PodNetns, create_pod_netns
from cloudadaptor.dev.shim import PodRun, ShimEmulator, start_pod, stop_pod

from bench import procs
from bench.table import Row

# The daemon's phase timings: the provider's create time (lifecycle) and the wait for the agent (proxy).
CREATED = re.compile(r"StartVM (\w+): VM \S+ at \S+ created in ([\d.]+)s")
ANSWERED = re.compile(r"agent proxy \S*/(\w+)/agent\.ttrpc: agent answered after ([\d.]+)s")


@dataclass
class Batch:
    pods: int
    wall: float  # all pods started (CreateVM + StartVM), seconds
    per_pod: list[float]  # each pod's CreateVM + StartVM at the shim
    overhead: list[float]  # per pod: that minus VM create and agent wait
    vm_create: list[float]
    agent_wait: list[float]
    cpu_per_pod: float  # daemon CPU seconds per pod lifecycle (start + stop)
    rss_running: float  # daemon RSS with the pods running, MiB


def daemon_env(directory: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "CLOUD_PROVIDER": "local", "LOCAL_BOOT_DELAY": "0", "NODE_NAME": "bench-worker",
            "STATE_DIR": str(directory / "state"), "SOCKET": str(directory / "hv.sock"),
            "PODS_DIR": str(directory / "pods"), "LOCAL_CLOUD_DIR": str(directory / "cloud"), "PROXY_TIMEOUT": "120s", "LOG_LEVEL": "info",
            "PEERPODS_LIMIT_PER_NODE": "200", **extra}


def _netns(count: int, offset: int) -> list[PodNetns]:
    return [create_pod_netns(f"bench-pod-{offset + i}", f"198.51.100.{10 + offset + i}/24", "198.51.100.1")
            for i in range(count)]


async def _batch(shim: ShimEmulator, daemon_pid: int, log: Path, count: int, offset: int) -> Batch:
    netns = await asyncio.to_thread(_netns, count, offset)
    runs: list[PodRun] = []
    try:
        cpu0 = procs.cpu_seconds(daemon_pid)
        began = time.perf_counter()
        results = await asyncio.gather(*(start_pod(shim, f"bench-{offset + i}", "default", n.path)
                                         for i, n in enumerate(netns)), return_exceptions=True)
        wall = time.perf_counter() - began
        runs = [r[0] for r in results if not isinstance(r, BaseException)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise RuntimeError(f"{len(failures)} of {count} pods failed to start: {failures[0]!r}")
        rss = procs.rss_mib(daemon_pid)
        if count == 1:
            boot_timeline(log.parent / "cloud")
        for run in runs:
            await stop_pod(shim, run)
        runs = []
        cpu = procs.cpu_seconds(daemon_pid) - cpu0
    finally:
        for run in runs:
            await stop_pod(shim, run)
        await asyncio.to_thread(lambda: [n.delete() for n in netns])
    text = log.read_text()
    created = {m[1]: float(m[2]) for m in CREATED.finditer(text)}
    answered = {m[1]: float(m[2]) for m in ANSWERED.finditer(text)}
    ids = [r[0].sandbox_id for r in results]  # type: ignore[index]
    per_pod = [r[1] + r[2] for r in results]  # type: ignore[index]
    vm_create = [created[i] for i in ids]
    agent_wait = [answered[i] for i in ids]
    overhead = [p - c - w for p, c, w in zip(per_pod, vm_create, agent_wait, strict=True)]
    return Batch(count, wall, per_pod, overhead, vm_create, agent_wait, cpu / count, rss)


def boot_timeline(cloud_dir: Path) -> None:
    """Print one local VM's console (its boot steps, timestamped by the VM's init) relative
    to its first line: where a local VM's boot time goes."""
    import datetime

    for console in sorted(cloud_dir.glob("*/console.log"))[:1]:
        steps = []
        for line in console.read_text().splitlines():  # the init's own lines: "<ISO time with zone> local-vm..."
            stamp, _, text = line.partition(" ")
            with contextlib.suppress(ValueError):
                when = datetime.datetime.fromisoformat(stamp)
                if when.tzinfo is not None and text.startswith("local-vm"):
                    steps.append((when, text))
        if not steps:
            return
        print("[bench] one local VM's boot (ms since its init started):", file=sys.stderr)
        for when, text in steps:
            print(f"[bench]   {(when - steps[0][0]).total_seconds() * 1e3:7.0f}  {text[:110]}", file=sys.stderr)


def _p(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1] if len(values) > 1 else values[0]


async def _measure(directory: Path, daemon_pid: int, log: Path, sizes: list[int]) -> list[Batch]:
    shim = ShimEmulator(str(directory / "hv.sock"))
    batches, offset = [], 0
    for size in sizes:
        batches.append(await _batch(shim, daemon_pid, log, size, offset))
        offset += size
    return batches


def run(quick: bool) -> list[Row]:
    # The first pod after start loads what an idle daemon leaves out (pyroute2, cryptography): it is
    # a row of its own, and the one-pod reference is the second. 50 at once for the adaptor's
    # overhead (issue 16); 100 running for the memory per sandbox.
    sizes = [1, 1, 5] if quick else [1, 1, 10, 30, 50, 100]
    with tempfile.TemporaryDirectory(prefix="bench-pods-") as tmp:
        directory = Path(tmp)
        log = directory / "daemon.log"
        daemon = procs.python("-m", "cloudadaptor.cli", "serve", env=daemon_env(directory), log=log, profile_as="daemon")
        with procs.running(daemon):
            procs.wait_for_path(directory / "hv.sock", daemon, timeout=60)
            pid = procs.target_pid(daemon)
            batches = asyncio.run(_measure(directory, pid, log, sizes))
    first, batches = batches[0], batches[1:]
    one, big = batches[0], batches[-1]
    # The slope between the two largest batches: first-use costs (imports, allocator arenas) cancel out.
    small = batches[-2]
    per_sandbox = (big.rss_running - small.rss_running) / (big.pods - small.pods)
    rows = [Row(f"daemon RSS per running sandbox ({small.pods} → {big.pods} running)", per_sandbox, "MiB",
                    0.5, "limit", "≤ 0.5 MiB")]
    rows.append(Row("daemon CPU per pod lifecycle (start + stop)", 1e3 * statistics.mean(b.cpu_per_pod for b in batches),
                    "ms"))
    for batch in batches:
        for label, pct in (("p50", 50), ("p99", 99)):
            rows.append(Row(f"adaptor overhead {label}, {batch.pods} concurrent pod(s) (CreateVM+StartVM − VM create − agent wait)",
                            1e3 * _p(batch.overhead, pct), "ms", 1e3 * _p(batch.per_pod, pct), "whole CreateVM+StartVM"))
    rows.append(Row("local VM boot to agent ready (1 pod, LOCAL_BOOT_DELAY=0)", 1e3 * one.agent_wait[0], "ms",
                    1e3 * one.per_pod[0], "whole CreateVM+StartVM"))
    rows.append(Row("one pod, CreateVM+StartVM (LOCAL_BOOT_DELAY=0)", 1e3 * one.per_pod[0], "ms", 400, "limit", "≤ 400 ms"))
    rows.append(Row("  the daemon's first pod (loads pyroute2 and cryptography)", 1e3 * first.per_pod[0], "ms",
                    1e3 * one.per_pod[0], "one pod"))
    thirty = next((b for b in batches if b.pods == 30), big)
    rows.append(Row(f"{thirty.pods} pods at once vs one pod (wall time)", thirty.wall, "s", one.wall, "one pod", "≤ 5×"))
    return rows
