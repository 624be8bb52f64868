"""The sandbox lifecycle on the azure provider, driven by the shim emulator.

`Daemon` runs in-process with CLOUD_PROVIDER=azure against the fake ARM
endpoint (real azure-mgmt clients over HTTPS). The fake VM's private address
(203.0.113.0/24) is unreachable in the private namespace, so its agent never
answers: StartVM must fail after PROXY_TIMEOUT having deleted the VM, its NIC
and its disk, and StopVM must then forget the sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import tempfile
from pathlib import Path

import pytest

from cloudadaptor import userdata
from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.config import load_settings
from cloudadaptor.providers.base import TAG_NODE, TAG_SANDBOX
from fakes.armserver import fast_provider
from cloudadaptor.dev.shim import ShimEmulator, shim_annotations
from cloudadaptor.ttrpc.errors import Code, TtrpcError


@pytest.fixture
async def azure_daemon(private_ns, arm_env):
    root = Path(tempfile.mkdtemp(prefix="e2e-az-", dir="/run"))  # short: unix socket paths
    arm_env = {**arm_env, "STATE_DIR": str(root), "SOCKET": str(root / "hv.sock"), "PODS_DIR": str(root / "pods"),
               "NODE_NAME": "azure-worker-1", "PROXY_TIMEOUT": "2s", "VXLAN_WORKER_IP": "203.0.113.250"}
    daemon = Daemon(load_settings(arm_env), provider=fast_provider(arm_env))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.close()
        shutil.rmtree(root, ignore_errors=True)


async def test_vm_whose_agent_never_answers_is_deleted_with_its_nic_and_disk(azure_daemon, arm, make_pod_netns):
    shim = ShimEmulator(str(azure_daemon.settings.socket))
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.60/24", "198.51.100.1")
    sandbox = "a2" * 32
    await shim.create_vm(sandbox, pod.path, shim_annotations("web", "default"))
    assert arm.ids("virtualMachines") == [], "CreateVM makes no cloud call"
    began = asyncio.get_running_loop().time()
    with pytest.raises(TtrpcError) as err:
        await shim.start_vm(sandbox)
    elapsed = asyncio.get_running_loop().time() - began
    assert err.value.code == Code.DEADLINE_EXCEEDED, err.value.message
    assert "did not answer within 2s" in err.value.message and "deleted" in err.value.message, err.value.message
    assert elapsed < 10, f"StartVM took {elapsed:.1f}s with PROXY_TIMEOUT=2s"
    assert arm.count("PUT", "virtualMachines", status=201) == 1
    assert arm.ids("virtualMachines") + arm.ids("networkInterfaces") + arm.ids("disks") == []
    vm = next(r for r in arm.state.deleted if r["type"] == "Microsoft.Compute/virtualMachines")
    assert vm["tags"]["peerpods.io_sandbox-id"] == sandbox and vm["tags"]["peerpods.io_node"] == "azure-worker-1"
    files = userdata.parse(base64.b64decode(vm["properties"]["userData"]).decode())
    assert "198.51.100.60" in files[userdata.APF_CONFIG_PATH], "the VM was told the pod's address"
    await shim.stop_vm(sandbox)
    assert azure_daemon.lifecycle.store.all() == []
    assert await azure_daemon.provider.list_owned({TAG_NODE: "azure-worker-1", TAG_SANDBOX: sandbox}) == []
