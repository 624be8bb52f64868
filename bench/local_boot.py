"""Local (namespace) VM boot: one pod's StartVM, and N pods started at once, with zero boot delay.

    .venv/bin/python bench/local_boot.py [--pods 30] [--single-runs 3]

Enters the private namespace by itself (as ``demo`` does), starts
``cloud-api-adaptor serve`` with ``CLOUD_PROVIDER=local``, ``LOCAL_VM=namespace``
and ``LOCAL_BOOT_DELAY=0``, and drives it with the shim emulator:

- one pod, ``--single-runs`` times: StartVM (VM start, its boot steps, the
  agent ready through the forwarder) and the whole pod start (CreateVM to the
  pause container started);
- ``--pods`` pods started at once: the wall time of the whole batch, and the
  slowest StartVM;
- the ratio batch / one pod (issue 16's target: at most 5 for 30 pods, and
  one pod's StartVM at most 0.4 s);
- each VM's own boot (its init's "booting" to "boot complete" console lines),
  and the daemon's CPU seconds per pod of the batch, to tell the VMs' share
  from the adaptor's.

Every pod is stopped (StopVM) and its netns deleted after each round.
Figures are printed, never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from cloudadaptor.dev import privatens

SOCKET = "/run/peerpod/hypervisor.sock"


async def _wait_for_socket(daemon: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(SOCKET):
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not serve {SOCKET} (exit code {daemon.poll()})")
        await asyncio.sleep(0.05)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _vm_boots(cloud_dir: Path) -> list[float]:
    """Seconds from each running VM's "booting" console line to its "boot complete"."""
    boots = []
    for log in cloud_dir.glob("i-local-*/console.log"):
        stamps = {}
        for line in log.read_text(errors="replace").splitlines():
            for mark in ("booting", "boot complete"):
                if mark in line and "local-vm[" in line and mark not in stamps:
                    stamps[mark] = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
        if len(stamps) == 2:
            boots.append((stamps["boot complete"] - stamps["booting"]).total_seconds())
    return boots


async def _round(shim, count: int, tag: str, cloud_dir: Path) -> tuple[float, list[float], list[float]]:
    """Start ``count`` pods at once; (wall seconds of the batch, each StartVM, each VM's own boot). Stops them after."""
    from cloudadaptor.dev.podnet import create_pod_netns
    from cloudadaptor.dev.shim import start_pod, stop_pod

    pods = [await asyncio.to_thread(create_pod_netns, f"cni-{tag}-{i}", f"198.51.100.{10 + i}/24", "198.51.100.1")
            for i in range(count)]
    try:
        began = time.monotonic()
        results = await asyncio.gather(*(start_pod(shim, f"{tag}-{i}", "bench", pod.path)
                                         for i, pod in enumerate(pods)), return_exceptions=True)
        wall = time.monotonic() - began
        failures = [r for r in results if isinstance(r, BaseException)]
        runs = [r for r in results if not isinstance(r, BaseException)]
        boots = _vm_boots(cloud_dir)
        for run, _, _ in runs:
            await stop_pod(shim, run)
        if failures:
            raise RuntimeError(f"{len(failures)} of {count} pods failed to start; first: {failures[0]!r}")
        return wall, [start for _, _, start in runs], boots
    finally:
        for pod in pods:
            await asyncio.to_thread(pod.delete)


@dataclass
class Result:
    pods: int
    single_runs: int
    one_start: float  # one pod's StartVM, median, seconds
    one_wall: float  # one pod, start to pause container, median
    one_boot: float  # one VM's own boot, median
    many_wall: float
    many_starts: list[float]
    many_boots: list[float]
    daemon_cpu: float  # per pod of the batch, seconds


async def _measure(pods: int, single_runs: int, keep_log: bool) -> Result:
    """Start the daemon, run the rounds, stop it; raises (naming the daemon log) when a round fails."""
    from cloudadaptor.dev.shim import ShimEmulator

    log_file = tempfile.NamedTemporaryFile(prefix="bench-local-boot-", suffix=".log", delete=False)
    cloud_dir = Path(tempfile.mkdtemp(prefix="bench-local-cloud-"))
    env = {**os.environ, "CLOUD_PROVIDER": "local", "LOCAL_BOOT_DELAY": "0s", "LOCAL_VM": "namespace",
           "LOCAL_CLOUD_DIR": str(cloud_dir),
           "PROXY_TIMEOUT": "300s", "NODE_NAME": "bench-worker",
           "PEERPODS_LIMIT_PER_NODE": str(max(pods, 10))}
    daemon = subprocess.Popen([sys.executable, "-m", "cloudadaptor.cli", "serve"], env=env,
                              stdout=log_file, stderr=subprocess.STDOUT)
    try:
        await _wait_for_socket(daemon)
        shim = ShimEmulator(SOCKET)
        singles = [await _round(shim, 1, f"one{n}", cloud_dir) for n in range(single_runs)]
        cpu_before = _cpu_seconds(daemon.pid)
        many_wall, many_starts, many_boots = await _round(shim, pods, "many", cloud_dir)
        daemon_cpu = (_cpu_seconds(daemon.pid) - cpu_before) / pods
    except Exception as exc:
        keep_log = True
        raise RuntimeError(f"local boot benchmark failed: {exc} (daemon log: {log_file.name})") from exc
    finally:
        procs.stop(daemon, timeout=20)
        if keep_log:
            print(f"daemon log: {log_file.name}", file=sys.stderr)
        else:
            os.unlink(log_file.name)
        shutil.rmtree(cloud_dir, ignore_errors=True)
    return Result(pods, single_runs, statistics.median(starts[0] for _, starts, _ in singles),
                  statistics.median(wall for wall, _, _ in singles),
                  statistics.median(b for _, _, boots in singles for b in boots),
                  many_wall, many_starts, many_boots, daemon_cpu)


def run(quick: bool) -> list:  # type: ignore[type-arg]  # list[bench.table.Row]
    """The ``local_boot`` section of ``python -m bench``: 5 pods at once with --quick, else 30."""
    from bench.table import Row  # the section runs under ``python -m bench``; the script alone prints text

    r = asyncio.run(_measure(5 if quick else 30, 3, False))
    return [
        Row(f"one pod, StartVM alone (median of {r.single_runs}, LOCAL_BOOT_DELAY=0)", 1e3 * r.one_start, "ms",
            400, "limit", "≤ 400 ms"),
        Row("  of which the VM's own boot (its init: booting → boot complete)", 1e3 * r.one_boot, "ms",
            1e3 * r.one_start, "one pod's StartVM"),
        Row(f"{r.pods} pods at once vs one pod (CreateVM to pause container, wall)", r.many_wall, "s", r.one_wall,
            "one pod", "≤ 5×" if r.pods == 30 else ""),
    ]


async def _bench(args: argparse.Namespace) -> int:
    try:
        r = await _measure(args.pods, args.single_runs, args.keep_log)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; LOCAL_VM=namespace, LOCAL_BOOT_DELAY=0")
    print(f"one pod, StartVM (median of {args.single_runs}):        {r.one_start:7.3f} s   (target <= 0.4 s)")
    print(f"one pod, start to pause container (median):  {r.one_wall:7.3f} s")
    print(f"one VM's own boot, booting→boot complete:    {r.one_boot:7.3f} s")
    print(f"{args.pods} pods at once, wall:                     {r.many_wall:7.3f} s   slowest StartVM {max(r.many_starts):.3f} s")
    print(f"{args.pods} VMs' own boot: median {statistics.median(r.many_boots):.3f} s, max {max(r.many_boots):.3f} s;"
          f" daemon CPU {r.daemon_cpu:.3f} s per pod")
    print(f"ratio {args.pods} pods / one pod (wall):              {r.many_wall / r.one_wall:7.1f} x   (target <= 5 x for 30)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pods", type=int, default=30, help="pods started at once (default 30)")
    parser.add_argument("--single-runs", type=int, default=3, help="one-pod rounds, median taken (default 3)")
    parser.add_argument("--keep-log", action="store_true", help="keep the daemon's log (its phase timings)")
    args = parser.parse_args()
    if not privatens.inside():
        privatens.exec_inside([sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
    return asyncio.run(_bench(args))


if __name__ == "__main__":
    sys.exit(main())
