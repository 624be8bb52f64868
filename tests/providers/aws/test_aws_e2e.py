"""End to end with CLOUD_PROVIDER=aws: shim emulator → daemon → EC2 (moto) → agent proxy.

moto makes no VM, so nothing ever answers on the instance's address (in the
spare range 203.0.113.0/24, reachable only through a portless bridge inside the
private namespace): the worker side of the tunnel comes up, the proxy dials
the VM until PROXY_TIMEOUT, and the instance must then be terminated.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import AsyncIterator

import pytest
from awsworld import Ec2World

from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.providers import base
from cloudadaptor.providers.aws.slimmodel import EC2_OPERATIONS
from cloudadaptor.dev.shim import ShimEmulator, shim_annotations
from cloudadaptor.ttrpc.errors import Code, TtrpcError


WORKER_LINK = "ppawsworker0"
WORKER_ADDRESS = "203.0.113.126"  # last host of the world's subnet 203.0.113.0/25


def _worker_link(up: bool) -> None:
    """Give the (private) worker netns an address in the VM subnet, as an EC2
    worker in that subnet has; packets to the VMs go nowhere (a bridge without ports)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=WORKER_LINK):
            ipr.link("del", index=index)
        if up:
            ipr.link("add", ifname=WORKER_LINK, kind="bridge")
            index = ipr.link_lookup(ifname=WORKER_LINK)[0]
            ipr.addr("add", index=index, address=WORKER_ADDRESS, prefixlen=25)
            ipr.link("set", index=index, state="up")


@pytest.fixture
async def aws_daemon(aws: Ec2World, private_ns: None) -> AsyncIterator[Daemon]:
    await asyncio.to_thread(_worker_link, True)
    root = Path(tempfile.mkdtemp(prefix="e2e-aws-", dir="/run"))
    settings = aws.settings(STATE_DIR=str(root), SOCKET=str(root / "hv.sock"), PODS_DIR=str(root / "pods"),
                            PROXY_TIMEOUT="2s", NODE_NAME="aws-e2e-node")
    daemon = Daemon(settings)
    await daemon.start()
    yield daemon
    await daemon.close()
    shutil.rmtree(root, ignore_errors=True)
    await asyncio.to_thread(_worker_link, False)


async def test_startvm_dials_the_ec2_instance_and_terminates_it_on_proxy_timeout(
    aws: Ec2World, aws_daemon: Daemon, make_pod_netns
):
    shim = ShimEmulator(str(aws_daemon.settings.socket))
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.50/24", "198.51.100.1")
    sandbox = "e" * 64
    agent_socket = await shim.create_vm(sandbox, pod.path, shim_annotations("web", "default"))
    assert agent_socket.endswith(f"{sandbox}/agent.ttrpc")
    with pytest.raises(TtrpcError) as err:
        await shim.start_vm(sandbox)

    [described] = aws.instances(**{base.TAG_SANDBOX: sandbox})
    message = err.value.message
    assert err.value.code == Code.DEADLINE_EXCEEDED, message
    assert f"agent at {described['PrivateIpAddress']}:15150" in message, message
    assert "did not answer within 2s" in message, message
    assert f"VM {described['InstanceId']} deleted" in message, message
    tags = {t["Key"]: t["Value"] for t in described["Tags"]}
    assert tags[base.TAG_NODE] == "aws-e2e-node" and tags[base.TAG_POD] == "default/web"
    assert aws.alive() == [], "no instance may be left running"
    user_data = aws.ec2.describe_instance_attribute(InstanceId=described["InstanceId"], Attribute="userData")
    assert user_data["UserData"]["Value"], "the rendered cloud-config reached EC2"

    await shim.stop_vm(sandbox)
    assert aws_daemon.lifecycle.store.all() == []
    # All of it on the slim EC2 model made under STATE_DIR (a missing operation would have failed above).
    client = await aws_daemon.provider.client()  # type: ignore[attr-defined]
    assert sorted(client.meta.service_model.operation_names) == sorted(EC2_OPERATIONS)
    [cache] = (aws_daemon.settings.state_dir / "aws-models").iterdir()
    assert cache.name.startswith("botocore-")


async def test_stopvm_during_startvm_terminates_the_instance(aws: Ec2World, aws_daemon: Daemon, make_pod_netns):
    shim = ShimEmulator(str(aws_daemon.settings.socket))
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.51/24", "198.51.100.1")
    sandbox = "f" * 64
    await shim.create_vm(sandbox, pod.path, shim_annotations("api", "default"))
    starting = asyncio.create_task(shim.start_vm(sandbox))
    for _ in range(100):  # until the proxy is dialing the running instance
        if aws.alive(**{base.TAG_SANDBOX: sandbox}) and aws_daemon.lifecycle.store.get(sandbox).instance_id:
            break
        await asyncio.sleep(0.05)
    assert aws_daemon.lifecycle.store.get(sandbox).instance_id, "the start reached the proxy"
    await shim.stop_vm(sandbox)
    # The interrupted StartVM is answered (ABORTED), not left hanging.
    with pytest.raises(TtrpcError) as err:
        await asyncio.wait_for(starting, 5)
    assert err.value.code == Code.ABORTED, err.value
    assert aws.alive() == []
    assert len(aws.instances(**{base.TAG_SANDBOX: sandbox})) == 1
    assert aws_daemon.lifecycle.store.all() == []
