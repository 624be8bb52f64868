"""Per-node VM limit: the node advertises kata.peerpods.io/vm = PEERPODS_LIMIT_PER_NODE."""

from __future__ import annotations

import asyncio
import logging

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from cloudadaptor.config import Settings
from cloudadaptor.k8s.capacity import VM_RESOURCE, advertise_vm_capacity, node_vm_capacity
from cloudadaptor.k8s.node import NodeIntegration, connect_node
from cloudadaptor.retry import Backoff
from fakes.kubeapi import NODES


async def test_capacity_and_allocatable_are_set_through_the_status_subresource(api, kubeapi, add_node):
    add_node("worker-1")
    await advertise_vm_capacity(api, "worker-1", 7)
    assert await node_vm_capacity(api, "worker-1") == ("7", "7")
    status = kubeapi.get(NODES, "worker-1")["status"]
    assert status["capacity"]["cpu"] == "4", "other capacities are kept"
    assert any(r.path == "/api/v1/nodes/worker-1/status" and r.method == "PATCH" for r in kubeapi.requests)


async def test_advertising_again_changes_the_limit(api, add_node):
    add_node("worker-1")
    await advertise_vm_capacity(api, "worker-1", 10)
    await advertise_vm_capacity(api, "worker-1", 3)
    assert await node_vm_capacity(api, "worker-1") == ("3", "3")


async def test_an_unknown_node_is_an_error(api):
    with pytest.raises(ApiException) as err:
        await advertise_vm_capacity(api, "nope", 10)
    assert err.value.status == 404


async def test_node_integration_keeps_retrying_until_the_api_accepts(api, kubeapi, add_node):
    add_node("worker-1")
    kubeapi.fail("PATCH", "/nodes/worker-1/status$", 503, times=3)
    node = NodeIntegration(api, Settings(node_name="worker-1", peerpods_limit_per_node=4),
                           backoff=Backoff(initial=0.01, maximum=0.02))
    await node.start()
    assert not node.advertised.is_set(), "the first attempt failed: the daemon must go on serving"
    await asyncio.wait_for(node.advertised.wait(), 5)
    assert kubeapi.get(NODES, "worker-1")["status"]["capacity"][VM_RESOURCE] == "4"
    await node.close()


async def test_connect_node_uses_kubeconfig_and_is_none_outside_a_cluster(kubeapi, add_node, tmp_path):
    assert await connect_node(Settings(provider_env={})) is None
    add_node("worker-9")
    kubeconfig = kubeapi.write_kubeconfig(tmp_path / "kubeconfig")
    settings = Settings(node_name="worker-9", peerpods_limit_per_node=12, provider_env={"KUBECONFIG": str(kubeconfig)})
    node = await connect_node(settings)
    assert node is not None
    await node.start()
    assert node.advertised.is_set()
    assert kubeapi.get(NODES, "worker-9")["status"]["allocatable"][VM_RESOURCE] == "12"
    await node.close()


async def test_a_bug_while_advertising_shows_its_traceback_once_and_the_retries_go_on(api, add_node, caplog, monkeypatch):
    from cloudadaptor.k8s import node as node_module

    add_node("worker-1")
    failures = []

    async def buggy(api, node_name, limit):
        failures.append(1)
        if len(failures) <= 3:
            raise KeyError("status")
        return await advertise_vm_capacity(api, node_name, limit)

    monkeypatch.setattr(node_module, "advertise_vm_capacity", buggy)
    node = NodeIntegration(api, Settings(node_name="worker-1", peerpods_limit_per_node=4),
                           backoff=Backoff(initial=0.01, maximum=0.02))
    with caplog.at_level(logging.WARNING, logger="cloudadaptor.k8s.node"):
        await node.start()
        await asyncio.wait_for(node.advertised.wait(), 5)
    await node.close()
    warnings = [r for r in caplog.records if "cannot advertise" in r.getMessage()]
    assert len(warnings) == 3 and [bool(r.exc_info) for r in warnings] == [True, False, False]
