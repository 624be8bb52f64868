"""Real pod VMs: image build (cold, cached), QEMU boot to agent ready, StartVM end to end.

    .venv/bin/python bench/qemu_pods.py [--pods 1,3] [--skip-cold]

Run as root outside the private namespace (the image build needs the
machine's root; the demo enters the namespace by itself). It measures:

- ``image build local`` cold (a fresh cache directory, so mmdebstrap runs)
  and cached (the same command again: a cache-key hit);
- for 1 and 3 concurrent pods, with TCG and with KVM when the provider's
  probe finds KVM usable: ``cloud-api-adaptor demo --vm qemu --pods N``,
  taking each pod's StartVM time (CreateVM returned → StartVM returned: QEMU
  start, guest boot, units, agent ready through the forwarder) and the
  guest's boot-to-agent-ready time (kernel start → the forwarder's unit
  started, from the console timestamps).

Figures are printed, never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CLI = [sys.executable, "-m", "cloudadaptor.cli"]


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.monotonic() - started, done.stdout


def build_figures(skip_cold: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-podvm-") as cache:
        if not skip_cold:
            cold, _ = timed([*CLI, "image", "build", "local", "--cache-dir", cache])
            print(f"image build local, cold (fresh cache):   {cold:6.1f} s")
        cached, _ = timed([*CLI, "image", "build", "local"])
        print(f"image build local, cached (key hit):     {cached:6.1f} s")


def kvm_usable() -> bool:
    from cloudadaptor.imagebuild import localcache
    from cloudadaptor.providers.local import qemu

    image = localcache.current(localcache.default_cache_dir(dict(os.environ)))
    return image is not None and qemu._probe_kvm(image) == "kvm"


def demo_figures(pods: int, accel: str) -> None:
    env = {**os.environ, "LOCAL_QEMU_ACCEL": accel}
    seconds, out = timed([*CLI, "demo", "--vm", "qemu", "--pods", str(pods)], env)
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("POD "))
    rows = [line.split() for line in lines[header + 1:header + 1 + pods]]
    # Columns: POD SANDBOX VM-ID VM-IP VNI POD-IP CreateVM StartVM TCP ... BOOT→AGENT (last)
    start = [float(r[7]) / 1000 for r in rows]
    boot = [float(r[-1]) for r in rows if r[-1] != "-"]
    print(f"{accel.upper():3}  {pods} pod(s): StartVM mean {statistics.mean(start):6.1f} s  max {max(start):6.1f} s;"
          f"  guest boot→agent ready mean {statistics.mean(boot) if boot else float('nan'):6.1f} s;"
          f"  whole demo {seconds:6.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pods", default="1,3", help="concurrent pod counts (default 1,3)")
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold image build")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (image build local needs it)")
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}")
    build_figures(args.skip_cold)
    accels = ["tcg"] + (["kvm"] if kvm_usable() else [])
    if "kvm" not in accels:
        print("KVM: the probe boots no guest with it here; TCG only")
    for accel in accels:
        for pods in (int(n) for n in args.pods.split(",")):
            demo_figures(pods, accel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
