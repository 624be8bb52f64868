"""Operations end to end: a pod whose VM agent never answers tells its story through a
``PodVMFailed`` Event and a log line carrying the VM's console, and ``/metrics`` counts it.

The daemon runs in-process with the local provider (real VMs: netns + their own init
writing console.log) and the fake Kubernetes API; inside the private namespace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.config import load_settings
from cloudadaptor.dev.shim import ShimEmulator, shim_annotations
from cloudadaptor.ttrpc.errors import Code, TtrpcError
from fakes.kubeapi import EVENTS, PODS, KubeApiServer
from links import delete_link


async def _eventually(check, timeout: float = 10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := check()) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return value


@pytest.fixture
async def silent_vm_daemon(private_ns):
    """A daemon whose local VMs boot but whose agent never serves (PROXY_TIMEOUT=2s), in a cluster."""
    root = Path(tempfile.mkdtemp(prefix="obs-", dir="/run"))
    n = 40 + os.getpid() % 20
    async with KubeApiServer() as kubeapi:
        kubeapi.seed(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "silent", "namespace": "ops"},
                            "spec": {"nodeName": "obs-node", "containers": [{"name": "app", "image": "busybox"}]}})
        settings = load_settings({
            "CLOUD_PROVIDER": "local", "STATE_DIR": str(root), "SOCKET": str(root / "hv.sock"),
            "PODS_DIR": str(root / "pods"), "NODE_NAME": "obs-node", "LOCAL_CLOUD_BRIDGE": f"ppobs{n}",
            "LOCAL_CLOUD_CIDR": "203.0.113.192/26", "PROXY_TIMEOUT": "2s",
            "LOCAL_AGENT_COMMAND": "sh -c 'exec sleep 600' {socket}", "PROBE_PORT": "18001",
            "KUBECONFIG": str(kubeapi.write_kubeconfig(root / "kubeconfig")),
        })
        daemon = Daemon(settings)
        await daemon.start()
        try:
            yield daemon, kubeapi
        finally:
            for sandbox in daemon.lifecycle.store.all():
                await daemon.lifecycle.stop(sandbox.id)
            await daemon.close()
            await asyncio.to_thread(delete_link, f"ppobs{n}")
            shutil.rmtree(root, ignore_errors=True)


async def test_vm_that_never_answers_leaves_console_lines_in_the_event_and_the_log(silent_vm_daemon, make_pod_netns, caplog):
    daemon, kubeapi = silent_vm_daemon
    caplog.set_level(logging.INFO, logger="cloudadaptor")
    shim = ShimEmulator(str(daemon.settings.socket))
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.60/24", "198.51.100.1")
    sandbox = "b" * 64
    await shim.create_vm(sandbox, pod.path, shim_annotations("silent", "ops"))
    with pytest.raises(TtrpcError) as err:
        await shim.start_vm(sandbox)
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert "console" not in err.value.message, "StartVM's own error is unchanged (the console goes to the event and log)"

    def failed_events():
        return [e for e in kubeapi.store.list(EVENTS, "ops", "", "") if e["reason"] == "PodVMFailed"]

    events = await _eventually(failed_events)
    assert events, "a PodVMFailed event on the pod"
    event = events[0]
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "namespace": "ops", "name": "silent"}
    assert event["type"] == "Warning" and "did not answer within 2s" in event["message"], event["message"]
    assert "console lines of VM" in event["message"] and "local-vm[" in event["message"], event["message"]
    assert "booting" in event["message"], "a line the VM's init wrote on its console"
    logged = [r.getMessage() for r in caplog.records if "never answered" in r.getMessage()]
    assert logged and "local-vm[" in logged[0], logged

    reasons = {e["reason"] for e in kubeapi.store.list(EVENTS, "ops", "", "")}
    assert {"PodVMCreating", "PodVMFailed", "PodVMDeleted"} <= reasons, reasons
    text = daemon.metrics.exposition().decode()
    assert 'cloud_api_adaptor_startvm_seconds_count{provider="local",result="failed"} 1.0' in text
    assert 'cloud_api_adaptor_hypervisor_calls_total{code="DEADLINE_EXCEEDED",method="StartVM"} 1.0' in text
    assert 'cloud_api_adaptor_vms_deleted_total{cause="rollback",provider="local"} 1.0' in text
