"""CPU seconds per pod by process kind, in a batch of pods started at once through the daemon.

    python -m bench --only cpusplit [--quick]

The pods bench reports the daemon's CPU per pod; on a small worker a batch is
CPU-bound across *all* processes, so this splits one batch's CPU by kind:
the daemon, the fork server, the VM launchers, the VM inits, the agents and
their containers, other helpers, and the client (this process: the shim
emulator, which is not ours). A sampler reads ``/proc/<pid>/stat`` of every
process in this private user namespace every few milliseconds and keeps each
one's last reading (a process living shorter than a sample is missed; the
figure is a lower bound for short-lived kinds such as the VM launchers). A
process is told apart by its parent and PID namespace: the VM init is PID 1 of
its own, the agent its child, containers their descendants. The sampler's own
CPU is taken off the client's.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from cloudadaptor.dev.shim import ShimEmulator, start_pod, stop_pod

from bench import procs
from bench.pods import _netns, daemon_env
from bench.table import Row

TICK = os.sysconf("SC_CLK_TCK")
SAMPLE = 0.01


def _stat(pid: str) -> tuple[int, float, float] | None:
    """(parent pid, user seconds, system seconds) of ``pid``; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[11]) / TICK, int(fields[12]) / TICK


def _times(stat: str) -> tuple[float, float]:
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def _ns(pid: str, kind: str) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return 0


class Sampler:
    """Every process of this user namespace: last CPU reading, parent, kind."""

    def __init__(self, daemon: int) -> None:
        self.daemon = daemon
        self.me = os.getpid()
        self.userns = _ns("self", "user")
        self.pidns = _ns("self", "pid")
        self.cpu: dict[int, float] = {}
        self.sys: dict[int, float] = {}
        self.base_sys: dict[int, float] = {}
        self.base: dict[int, float] = {}
        self.parent: dict[int, int] = {}
        self.kind: dict[int, str] = {}
        self.cmd: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._seen_foreign: set[int] = set()
        self.sampler_cpu = self.sampler_sys = 0.0

    def start(self) -> None:
        self._sample()
        self.base = dict(self.cpu)
        self.base_sys = dict(self.sys)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        stat = f"/proc/self/task/{threading.get_native_id()}/stat"
        began = _times(stat)
        while not self._stop.wait(SAMPLE):
            self._sample()
        ended = _times(stat)
        self.sampler_cpu, self.sampler_sys = ended[0] + ended[1] - began[0] - began[1], ended[1] - began[1]

    def _sample(self) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid in self._seen_foreign:
                continue
            if pid not in self.kind:
                if _ns(name, "user") != self.userns:
                    self._seen_foreign.add(pid)
                    continue
            got = _stat(name)
            if got is None:
                continue
            ppid, user, system = got
            self.cpu[pid] = user + system
            self.sys[pid] = system
            if pid not in self.kind:
                self.parent[pid] = ppid
                try:
                    self.cmd[pid] = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
                except OSError:
                    self.cmd[pid] = "?"
                self.kind[pid] = self._classify(pid, name)

    def _classify(self, pid: int, name: str) -> str:
        ppid = self.parent[pid]
        if pid == self.me:
            return "client (bench: shim emulator)"
        if pid == self.daemon:
            return "daemon"
        if ppid == self.daemon:
            return "fork server" if "local_forkserver" in self.cmd[pid] else "daemon children (other)"
        if self.kind.get(ppid) == "fork server":
            return "VM launcher"
        if _ns(name, "pid") != self.pidns:
            try:
                nspid = Path(f"/proc/{name}/status").read_text().split("NSpid:")[1].split("\n")[0].split()
            except (OSError, IndexError):
                nspid = []
            if nspid and nspid[-1] == "1":
                return "VM init"
            parent_kind = self.kind.get(ppid, "")
            if parent_kind == "VM init":
                return "agent (dev agent)"
            return "containers and agent helpers"
        parent_kind = self.kind.get(ppid)
        return parent_kind if parent_kind in ("VM launcher", "VM init") else "other"

    def split(self) -> tuple[dict[str, float], dict[str, float]]:
        """CPU seconds by kind, and the kernel's (system time) share of them."""
        totals: dict[str, float] = defaultdict(float)
        system: dict[str, float] = defaultdict(float)
        for pid, cpu in self.cpu.items():
            totals[self.kind.get(pid, "other")] += cpu - self.base.get(pid, 0.0)
            system[self.kind.get(pid, "other")] += self.sys[pid] - self.base_sys.get(pid, 0.0)
        totals["client (bench: shim emulator)"] -= self.sampler_cpu  # this sampler is not the client's
        system["client (bench: shim emulator)"] -= self.sampler_sys
        return totals, system


async def _batch(shim: ShimEmulator, sampler: Sampler, count: int, offset: int) -> float:
    netns = await asyncio.to_thread(_netns, count, offset)
    try:
        sampler.start()
        began = time.perf_counter()
        results = await asyncio.gather(*(start_pod(shim, f"bench-{offset + i}", "default", n.path)
                                         for i, n in enumerate(netns)))
        wall = time.perf_counter() - began
        for run, _, _ in results:
            await stop_pod(shim, run)
        await asyncio.sleep(0.5)  # the VMs' inits finish stopping
        sampler.stop()
    finally:
        await asyncio.to_thread(lambda: [n.delete() for n in netns])
    return wall


def run(quick: bool) -> list[Row]:
    sizes = [1, 10] if quick else [1, 30]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-cs-") as tmp:
        directory = Path(tmp)
        daemon = procs.python("-m", "cloudadaptor.cli", "serve", env=daemon_env(directory), log=directory / "daemon.log",
                               profile_as="daemon")
        with procs.running(daemon):
            procs.wait_for_path(directory / "hv.sock", daemon, timeout=60)
            shim = ShimEmulator(str(directory / "hv.sock"))
            offset = 0
            asyncio.run(_warm(shim))
            for size in sizes:
                sampler = Sampler(procs.target_pid(daemon))
                wall = asyncio.run(_batch(shim, sampler, size, offset))
                offset += size
                split, system = sampler.split()
                total = sum(split.values())
                print(f"[bench] {size} pod(s): wall {wall:.2f} s (start), CPU {total:.2f} s "
                      f"= {1e3 * total / size:.0f} ms per pod lifecycle:", file=sys.stderr)
                kinds = sorted(split.items(), key=lambda kv: -kv[1])
                for kind, cpu in kinds:
                    print(f"[bench]   {kind:34} {1e3 * cpu / size:7.1f} ms/pod ({1e3 * system[kind] / size:5.1f} in the kernel)",
                          file=sys.stderr)
            # The table shows the batch; the single pod's split is on stderr.
            rows.append(Row(f"CPU per pod lifecycle, {size} pods at once, all processes (wall {wall:.2f} s)",
                            1e3 * total / size, "ms"))
            rows += [Row(f"  of which {kind}", 1e3 * cpu / size, "ms", 1e3 * total / size, "all processes")
                     for kind, cpu in kinds if cpu > 0]
    return rows


async def _warm(shim: ShimEmulator) -> None:
    """One pod first: the fork server's and the daemon's first-use costs are not a batch's."""
    netns = await asyncio.to_thread(_netns, 1, 200)
    try:
        run, _, _ = await start_pod(shim, "warm", "default", netns[0].path)
        await stop_pod(shim, run)
    finally:
        await asyncio.to_thread(lambda: [n.delete() for n in netns])
