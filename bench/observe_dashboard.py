"""The Grafana dashboard's panels, rendered from a real run's /metrics (docs/dashboard.png).

    .venv/bin/pip install matplotlib   # only this script needs it
    .venv/bin/python -m cloudadaptor.dev.privatens -- .venv/bin/python bench/observe_dashboard.py [--waves 4 --pods 4]

Runs the daemon in-process with the local provider inside the private
namespace (real pod VMs: netns + init + forwarder + development agent), drives
``--waves`` waves of ``--pods`` pods through the shim emulator (start, run a
command, stop) plus one CreateVM with a bad netns path per wave (a failure),
and scrapes ``/metrics`` over HTTP every ``--interval`` seconds, as Prometheus
would. The panels of ``deploy/components/monitoring/dashboard.json`` are then
computed from those scrapes (rates and histogram quantiles over a sliding
window, as PromQL does) and drawn with matplotlib: Grafana itself is not
available here. Figures are printed, never asserted.

The local provider makes no cloud API calls, so the cloud-throttling panel is
flat zero in this rendering; on AWS/Azure it is fed by botocore's and
azure-core's hooks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.config import load_settings
from cloudadaptor.dev import podnet, privatens
from cloudadaptor.dev.shim import ShimEmulator, shim_annotations, start_pod, stop_pod
from cloudadaptor.ttrpc.errors import TtrpcError

PORT = 18090
Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape() -> Sample:
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scraper(samples: list[tuple[float, Sample]], interval: float, stop: asyncio.Event) -> None:
    began = time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - began, await asyncio.to_thread(scrape)))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass
    samples.append((time.monotonic() - began, await asyncio.to_thread(scrape)))


async def drive(args: argparse.Namespace, root: Path) -> list[tuple[float, Sample]]:
    settings = load_settings({
        "CLOUD_PROVIDER": "local", "STATE_DIR": str(root), "SOCKET": str(root / "hv.sock"),
        "PODS_DIR": str(root / "pods"), "NODE_NAME": "bench-node", "LOCAL_CLOUD_BRIDGE": "ppbench0",
        "LOCAL_CLOUD_CIDR": "192.0.2.0/25", "PROXY_TIMEOUT": "20s", "PROBE_PORT": str(PORT),
        "LOCAL_BOOT_DELAY": args.boot_delay,
    })
    daemon = Daemon(settings)
    await daemon.start()
    shim = ShimEmulator(str(settings.socket))
    samples: list[tuple[float, Sample]] = []
    stop = asyncio.Event()
    task = asyncio.create_task(scraper(samples, args.interval, stop))
    # pyroute2's synchronous API runs its own event loop: from threads.
    pods = [await asyncio.to_thread(podnet.create_pod_netns, f"bench-pod-{i}", f"198.51.100.{10 + i}/24", "198.51.100.1")
            for i in range(args.pods)]
    try:
        for wave in range(args.waves):
            runs = await asyncio.gather(*(start_pod(shim, f"web-{wave}-{i}", "bench", pod.path)
                                          for i, pod in enumerate(pods)))
            for run, _, _ in runs:
                await run.session.exec(run.container_id, ["sh", "-c", "head -c 200000 /dev/zero | wc -c"])
            try:
                await shim.create_vm("f" * 63 + str(wave), "/nonexistent/netns", shim_annotations("broken", "bench"))
            except TtrpcError:
                pass  # counted as INVALID_ARGUMENT: the failures panel
            await asyncio.sleep(args.hold)
            await asyncio.gather(*(stop_pod(shim, run) for run, _, _ in runs))
            await asyncio.sleep(args.hold / 2)
    finally:
        stop.set()
        await task
        for pod in pods:
            await asyncio.to_thread(pod.delete)
        await daemon.close()
        await asyncio.to_thread(_delete_bridge)
    return samples


def _delete_bridge() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname="ppbench0"):
            ipr.link("del", index=index)


def value(sample: Sample, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in sample.items() if n == name and labels.items() <= dict(ls).items())


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """PromQL's histogram_quantile over (upper bound, cumulative count) pairs."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return lower


def window_quantile(samples, i, window, name, q, **labels) -> float | None:
    now_t, now = samples[i]
    j = max(k for k in range(i + 1) if samples[k][0] <= now_t - window or k == 0)
    before = samples[j][1]
    bounds = sorted({float(dict(ls)["le"]) for (n, ls) in now if n == name + "_bucket" and labels.items() <= dict(ls).items()})
    return quantile(q, [(b, value(now, name + "_bucket", le=_le(b), **labels)
                         - value(before, name + "_bucket", le=_le(b), **labels)) for b in bounds])


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else str(bound)


def rate(samples, i, window, name, **labels) -> float:
    now_t, now = samples[i]
    j = max(k for k in range(i + 1) if samples[k][0] <= now_t - window or k == 0)
    span = now_t - samples[j][0]
    return (value(now, name, **labels) - value(samples[j][1], name, **labels)) / span if span > 0 else 0.0


def render(samples: list[tuple[float, Sample]], output: Path, window: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in samples]
    idx = range(len(samples))
    fig, axes = plt.subplots(3, 2, figsize=(14, 11))
    fig.suptitle("Peer pods (cloud-api-adaptor) — panels of deploy/components/monitoring/dashboard.json\n"
                 "rendered with matplotlib from /metrics scrapes of a real local-provider run (bench/observe_dashboard.py)")
    ax = axes[0][0]
    ax.plot(t, [value(s, "cloud_api_adaptor_pod_vms") for _, s in samples], label="pod VMs")
    for state in ("running", "created", "failed"):
        ax.plot(t, [value(s, "cloud_api_adaptor_sandboxes", state=state) for _, s in samples], label=state, ls="--")
    ax.set_title("Pod VMs and sandboxes by state")
    ax = axes[0][1]
    for phase in ("create_instance", "tunnel_up", "agent_ready"):
        ax.plot(t, [window_quantile(samples, i, window, "cloud_api_adaptor_startvm_phase_seconds", 0.95, phase=phase)
                    for i in idx], label=f"p95 {phase}")
    ax.plot(t, [window_quantile(samples, i, window, "cloud_api_adaptor_startvm_seconds", 0.95, result="ok") for i in idx],
            label="p95 end to end", color="black")
    ax.set_title(f"StartVM latency by phase (p95 over {window:g}s)")
    ax.set_ylabel("seconds")
    ax = axes[1][0]
    ax.plot(t, [rate(samples, i, window, "cloud_api_adaptor_hypervisor_calls_total", method="CreateVM", code="INVALID_ARGUMENT")
                for i in idx], label="CreateVM INVALID_ARGUMENT")
    ax.plot(t, [rate(samples, i, window, "cloud_api_adaptor_startvm_seconds_count", result="failed") for i in idx],
            label="StartVM failed")
    ax.set_title("Failures (calls/s)")
    ax = axes[1][1]
    ax.plot(t, [rate(samples, i, window, "cloud_api_adaptor_cloud_api_throttles_total") for i in idx], label="throttled")
    ax.plot(t, [rate(samples, i, window, "cloud_api_adaptor_cloud_api_retries_total") for i in idx], label="retried")
    ax.set_title("Cloud API: throttling and retries (local provider: no cloud API)")
    ax = axes[2][0]
    for cause in ("stop", "rollback", "recovery", "orphan_sweep"):
        ax.plot(t, [value(s, "cloud_api_adaptor_vms_deleted_total", cause=cause) for _, s in samples], label=cause)
    ax.set_title("VMs deleted by cause (cumulative)")
    ax = axes[2][1]
    ax.plot(t, [value(s, "cloud_api_adaptor_agent_proxy_connections") for _, s in samples], label="open connections")
    ax2 = ax.twinx()
    ax2.plot(t, [rate(samples, i, window, "cloud_api_adaptor_agent_proxy_bytes_total", direction="from_vm") / 1024
                 for i in idx], color="tab:orange", label="KiB/s from VM")
    ax.set_title("Agent proxy")
    ax2.legend(loc="upper right", fontsize=8)
    for row in axes:
        for ax in row:
            ax.set_xlabel("seconds into the run")
            ax.legend(loc="upper left", fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=80)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waves", type=int, default=4)
    parser.add_argument("--pods", type=int, default=4)
    parser.add_argument("--hold", type=float, default=6.0, help="seconds pods stay up per wave")
    parser.add_argument("--interval", type=float, default=1.0, help="scrape interval")
    parser.add_argument("--window", type=float, default=15.0, help="rate/quantile window")
    parser.add_argument("--boot-delay", default="1s", help="LOCAL_BOOT_DELAY of each VM")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"))
    args = parser.parse_args()
    if not privatens.inside():
        print("run inside the private namespace: python -m cloudadaptor.dev.privatens -- python bench/observe_dashboard.py",
              file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="bench-obs-", dir="/run"))
    try:
        samples = asyncio.run(drive(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    last = samples[-1][1]
    started = value(last, "cloud_api_adaptor_startvm_seconds_count", result="ok")
    print(f"{len(samples)} scrapes; StartVM ok {started:g}, failed "
          f"{value(last, 'cloud_api_adaptor_startvm_seconds_count', result='failed'):g}")
    for phase in ("create_instance", "tunnel_up", "agent_ready"):
        count = value(last, "cloud_api_adaptor_startvm_phase_seconds_count", phase=phase)
        total = value(last, "cloud_api_adaptor_startvm_phase_seconds_sum", phase=phase)
        print(f"  {phase:<16} count {count:g}  mean {total / count if count else 0:.3f}s")
    print(f"  end to end       mean {value(last, 'cloud_api_adaptor_startvm_seconds_sum', result='ok') / max(started, 1):.3f}s")
    render(samples, Path(args.output), args.window)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
