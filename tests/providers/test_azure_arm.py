"""The azure provider's ARM calls (``providers/azure/arm.py``): paging, and no generated SDK in the daemon.

The provider talks to ARM through azure-mgmt-core's pipeline with JSON bodies
instead of the generated compute/network clients, whose model modules cost an
idle daemon ~40 MiB (issue 16). These tests hold both halves of that: list
calls follow ARM's ``nextLink``, and a real ``serve`` with CLOUD_PROVIDER=azure
never imports ``azure.mgmt.compute`` or ``azure.mgmt.network``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloudadaptor.providers.azure import vms
from cloudadaptor.providers.base import TAG_SANDBOX, InstanceSpec
from fakes.armserver import DEFAULT_SIZES, fast_provider

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("azure.mgmt.compute", "azure.mgmt.network")


@pytest.fixture
async def provider(arm_env):
    provider = fast_provider(arm_env)
    yield provider
    await provider.close()


def spec(name: str, sandbox: str) -> InstanceSpec:
    return InstanceSpec(name=name, sandbox_id=sandbox, user_data="#cloud-config\n", client_token=sandbox,
                        tags={TAG_SANDBOX: sandbox})


async def test_lists_follow_next_links_across_pages(provider, arm):
    made = [await provider.create_instance(spec(f"podvm-page-{i}", f"sandbox-{i}")) for i in range(3)]
    arm.state.page_size = 1
    before = arm.count("GET", "/virtualMachines", 200)
    owned = await provider.list_owned({})
    assert sorted(i.id for i in owned) == sorted(i.id for i in made)
    assert all(i.ips for i in owned), "every VM's NIC (listed one a page too) gives its address"
    assert arm.count("GET", "/virtualMachines", 200) - before == 3, "one request per page"
    catalog = await vms.load_catalog(provider.clients, provider.config)
    assert sorted(catalog) == sorted(name for name, *_ in DEFAULT_SIZES)
    for instance in made:
        await provider.delete_instance(instance.id)
    assert arm.ids("virtualMachines") == arm.ids("networkInterfaces") == []


def test_an_azure_daemon_never_imports_the_generated_sdk_clients(arm, arm_env, tmp_path):
    """``serve`` (bench.cloudserve: the product's Daemon, with the fake's static token) starts,
    verifies against ARM and idles; ``-X importtime`` lists every module it imported."""
    env = {**os.environ, **arm_env, "REQUESTS_CA_BUNDLE": arm.ca_file, "VXLAN_WORKER_IP": "203.0.113.126",
           "NODE_NAME": "azure-worker", "STATE_DIR": str(tmp_path / "state"), "SOCKET": str(tmp_path / "hv.sock"),
           "PODS_DIR": str(tmp_path / "pods"), "PYTHONPATH": str(ROOT)}
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "bench.cloudserve", "azure"],
                                  env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not (tmp_path / "hv.sock").exists():
                assert daemon.poll() is None, f"daemon exited early:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no socket after 60 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.05)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
    text = log.read_text()
    imported = {line.rsplit("|", 1)[1].strip() for line in text.splitlines() if line.startswith("import time:")}
    assert "cloudadaptor.providers.azure.arm" in imported, "the daemon ran the azure provider"
    assert arm.count("GET", "/virtualNetworks/") > 0, "and it talked to ARM (verify)"
    assert sorted(m for m in imported if m.startswith(GENERATED)) == []
    # Nor pyroute2 before its first pod: the start-up sweep (done before the socket listens) runs in a child.
    assert "cloudadaptor.podnetwork.vxlan" in imported and "pyroute2" not in imported
