"""The peerpod-controller's own metrics: passes, VMs it deleted, finalizers released, and its /metrics endpoint."""

from __future__ import annotations

import asyncio

from cloudadaptor.k8s.controller import ControllerOptions, run
from cloudadaptor.k8s.peerpods import PeerPodApi, PeerPodTracker
from cloudadaptor.metrics import ControllerMetrics
from fakes.kubeapi import PODS

SANDBOX = "7" * 64
CLUSTER = "cluster-blue"  # what FakeCloud.add tags VMs with (tests/k8s/conftest.py)
OPTIONS = ControllerOptions(provider_name="aws", cluster_id=CLUSTER, sweep_grace=60.0)


def _value(metrics: ControllerMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_passes_and_deletions_are_counted(api, kubeapi, cloud, add_pod):
    add_pod("web")
    instance = cloud.add(pod="default/web", sandbox=SANDBOX)
    await PeerPodTracker(api, node_name="worker-1").vm_created(SANDBOX, "default", "web", instance.id, cloud.name)
    kubeapi.delete(PODS, "web", "default")  # the adaptor died; the pod goes; the finalizer holds the PeerPod
    kubeapi.fail("GET", "/peerpods$", 500, times=1)  # the first pass fails as a whole
    metrics = ControllerMetrics("aws")
    stop = asyncio.Event()
    task = asyncio.create_task(run(PeerPodApi(api), cloud, OPTIONS, interval=0.05, stop=stop, metrics=metrics))
    for _ in range(100):
        if instance.id not in cloud.instances and _value(metrics, "cloud_api_adaptor_controller_passes_total", result="ok") >= 2:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert _value(metrics, "cloud_api_adaptor_controller_passes_total", result="failed") == 1
    assert _value(metrics, "cloud_api_adaptor_controller_vms_deleted_total", provider="aws") == 1
    assert _value(metrics, "cloud_api_adaptor_controller_finalizers_released_total") == 1
    text = metrics.exposition().decode()
    assert SANDBOX not in text and "web" not in text, "no per-pod label"


async def test_controller_serves_metrics_on_probe_port(tmp_path, kubeapi, private_ns):
    import os
    import signal
    import sys

    import aiohttp

    env = {**os.environ, "CLOUD_PROVIDER": "local", "LOCAL_CLOUD_DIR": str(tmp_path / "cloud"), "STATE_DIR": str(tmp_path),
           "KUBECONFIG": str(kubeapi.write_kubeconfig(tmp_path / "kubeconfig")), "PROBE_PORT": "18010",
           "PEERPOD_CONTROLLER_INTERVAL": "1s"}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "cloudadaptor.cli", "peerpod-controller", env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        text = ""
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get("http://127.0.0.1:18010/metrics") as response:
                        text = await response.text()
                    if 'cloud_api_adaptor_controller_passes_total{result="ok"} 1.0' in text:
                        break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        assert 'cloud_api_adaptor_controller_passes_total{result="ok"}' in text, text
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 15)
    assert process.returncode == 0, err.decode()
