"""The lifecycle's pod network steps, with a fake provider and a fake pod network."""

from __future__ import annotations

import pytest

from cloudadaptor import podconfig, userdata
from cloudadaptor.adaptor.lifecycle import LifecycleError
from cloudadaptor.adaptor.store import SandboxState
from cloudadaptor.podnetwork.api import NetnsInvalid, NetnsUnusable, PodNetworkError
from cloudadaptor.dev.shim import shim_annotations
from cloudadaptor.ttrpc.errors import Code

A, B, C = "a" * 64, "b" * 64, "c" * 64


def apf_network(lifecycle, sandbox_id: str) -> podconfig.PodNetworkConfig:
    files = userdata.parse(lifecycle.store.get(sandbox_id).user_data)
    network = podconfig.ForwarderConfig.from_json(files[userdata.APF_CONFIG_PATH]).network
    assert network is not None
    return network


async def test_createvm_gives_each_sandbox_its_own_vni_from_vxlan_min_id(lifecycle_factory, netns_file):
    lifecycle = lifecycle_factory(agent_port=1)
    for sid in (A, B, C):
        await lifecycle.create(sid, shim_annotations("web", "prod"), netns_file)
    assert [lifecycle.store.get(s).vni for s in (A, B, C)] == [555000, 555001, 555002]
    await lifecycle.stop(B)
    await lifecycle.create("d" * 64, shim_annotations("web", "prod"), netns_file)
    assert lifecycle.store.get("d" * 64).vni == 555001, "the lowest free VNI is reused once its sandbox is gone"


async def test_createvm_puts_the_pod_network_in_the_user_data(lifecycle_factory, netns_file, pod_network):
    lifecycle = lifecycle_factory(agent_port=1)
    await lifecycle.create(A, shim_annotations("web", "prod"), netns_file)
    network = apf_network(lifecycle, A)
    assert network == podconfig.PodNetworkConfig(await pod_network.inspect(netns_file), "192.0.2.1", 555000, 9000)
    assert lifecycle.store.get(A).pod_network == network
    assert pod_network.hints == [None], "the fake provider gives no network hint"


async def test_createvm_passes_the_providers_network_hint(lifecycle_factory, netns_file, provider, pod_network):
    provider.network_hint = lambda: "192.0.2.10"
    lifecycle = lifecycle_factory(agent_port=1)
    await lifecycle.create(A, shim_annotations("web", "prod"), netns_file)
    assert pod_network.hints == ["192.0.2.10"]


@pytest.mark.parametrize(("method", "error", "code"), [
    ("inspect", NetnsInvalid("/x is not a network namespace"), Code.INVALID_ARGUMENT),
    ("inspect", NetnsUnusable("/x has no pod interface"), Code.FAILED_PRECONDITION),
    ("worker_ip", PodNetworkError("set VXLAN_WORKER_IP"), Code.FAILED_PRECONDITION),
])
async def test_createvm_pod_network_problems_reach_the_shim(lifecycle_factory, netns_file, pod_network, method, error, code):
    pod_network.fail[method] = error
    lifecycle = lifecycle_factory(agent_port=1)
    with pytest.raises(LifecycleError) as err:
        await lifecycle.create(A, shim_annotations("web", "prod"), netns_file)
    assert err.value.code == code
    assert str(error) in err.value.message
    assert lifecycle.store.all() == [], "nothing is recorded"


async def test_startvm_brings_the_tunnel_up_to_the_vm(lifecycle_factory, netns_file, agent, pod_network):
    lifecycle = lifecycle_factory(agent_port=agent.port)
    await lifecycle.create(A, shim_annotations("web", "prod"), netns_file)
    await lifecycle.start(A)
    tunnel = pod_network.up[555000]
    assert (tunnel.netns_path, tunnel.pod_ifname, tunnel.vm_ip, tunnel.vxlan_port) == (netns_file, "eth0", "127.0.0.1", 9000)
    assert lifecycle.store.get(A).state is SandboxState.RUNNING


async def test_startvm_tunnel_failure_deletes_the_vm_and_the_tunnel(lifecycle_factory, netns_file, provider, pod_network):
    pod_network.fail["tunnel_up"] = PodNetworkError("netlink error 17")
    lifecycle = lifecycle_factory(agent_port=1)
    await lifecycle.create(A, shim_annotations("web", "prod"), netns_file)
    with pytest.raises(LifecycleError) as err:
        await lifecycle.start(A)
    assert err.value.code == Code.INTERNAL and "VXLAN tunnel: netlink error 17" in err.value.message
    assert provider.deleted == ["i-fake-1"] and provider.instances == {}
    assert pod_network.calls == [("up", 555000), ("down", 555000)]
    assert lifecycle.store.get(A).state is SandboxState.FAILED


async def test_stopvm_removes_the_tunnel_after_the_vm(lifecycle_factory, netns_file, agent, provider, pod_network):
    lifecycle = lifecycle_factory(agent_port=agent.port)
    await lifecycle.create(A, shim_annotations("web", "prod"), netns_file)
    await lifecycle.start(A)
    deleted_before_down = []
    original = pod_network.tunnel_down

    async def tunnel_down(tunnel):
        deleted_before_down.append(list(provider.deleted))
        await original(tunnel)

    pod_network.tunnel_down = tunnel_down
    await lifecycle.stop(A)
    assert deleted_before_down == [["i-fake-1"]], "VM deleted, then tunnel down"
    assert pod_network.up == {} and lifecycle.store.all() == []


async def test_stopvm_that_cannot_remove_the_tunnel_keeps_the_record_and_its_vni(lifecycle_factory, netns_file, agent, pod_network):
    lifecycle = lifecycle_factory(agent_port=agent.port)
    await lifecycle.create(A, shim_annotations("web", "prod"), netns_file)
    await lifecycle.start(A)
    pod_network.fail["tunnel_down"] = PodNetworkError("device busy")
    with pytest.raises(LifecycleError) as err:
        await lifecycle.stop(A)
    assert "removing the VXLAN tunnel failed: device busy" in err.value.message
    assert lifecycle.store.get(A).state is SandboxState.STOPPING
    assert lifecycle.store.next_free_vni(555000) == 555001, "the VNI stays taken while its tunnel may exist"
    del pod_network.fail["tunnel_down"]
    await lifecycle.stop(A)
    assert lifecycle.store.all() == [] and pod_network.up == {}


async def test_recover_removes_tunnels_of_sandboxes_not_running_and_sweeps_the_rest(
        lifecycle_factory, netns_file, agent, pod_network):
    first = lifecycle_factory(agent_port=agent.port)
    await first.create(A, shim_annotations("web", "prod"), netns_file)
    await first.start(A)
    await first.create(B, shim_annotations("db", "prod"), netns_file)
    # A crash in the middle of B's StartVM: VM recorded, tunnel up, agent not yet ready.
    first.store.update(B, state=SandboxState.STARTING, instance_id="i-gone", vm_ips=("127.0.0.1",))
    pod_network.up[555001] = None
    await first.close()
    again = lifecycle_factory(agent_port=agent.port)
    await again.recover()
    assert 555001 not in pod_network.up and 555000 in pod_network.up, "only the running sandbox keeps its tunnel"
    assert pod_network.swept == [frozenset({555000, 555001})], "the worker netns is swept of unknown VNIs"
