"""Cluster identity: every VM carries this cluster's tag, every list-to-delete requires it,
and the id is CLUSTER_ID, else the kube-system namespace uid, else one recorded in the store."""

from __future__ import annotations


import pytest

from cloudadaptor.adaptor import recovery
from cloudadaptor.adaptor.daemon import StartupError, resolve_cluster_id
from cloudadaptor.adaptor.lifecycle import LifecycleOptions, SandboxLifecycle
from cloudadaptor.adaptor.store import SandboxState, SandboxStore
from cloudadaptor.adaptor.validation import instance_spec
from cloudadaptor.config import Settings, load_settings
from cloudadaptor.dev.shim import shim_annotations
from cloudadaptor.providers import base
from fakes.kubeapi import NAMESPACES, KubeApiServer



def live(ec2) -> set[str]:
    found = ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return {i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]}


async def test_two_clusters_sharing_an_account_with_colliding_node_names_keep_each_others_vms(
        ec2_provider, tmp_path, short_dir, pod_network, netns_file):
    provider, ec2 = ec2_provider
    made = []
    for cluster in ("cluster-a", "cluster-b"):
        store = SandboxStore(tmp_path / cluster / "state.db")
        options = LifecycleOptions(pods_dir=short_dir / cluster, node_name="worker-1", cluster_id=cluster)
        lifecycle = SandboxLifecycle(options=options, store=store, provider=provider, pod_network=pod_network, tls=None)
        # The same sandbox id on both (a restored pod, a cloned cluster): tags collide on node and sandbox too.
        await lifecycle.create("5b" * 32, shim_annotations("web", "default"), netns_file)
        sandbox = store.update("5b" * 32, state=SandboxState.STARTING)
        vm = await provider.create_instance(instance_spec(sandbox, "worker-1", recovery.vm_tags(options)))
        assert vm.tags[base.TAG_CLUSTER] == cluster
        made.append((lifecycle, store, vm.id))
    (a, a_store, a_vm), (b, b_store, b_vm) = made
    # Cluster b's daemon restarts having lost its record (a crash before the row was written).
    b_store.remove("5b" * 32)
    assert await b.sweep_orphans() == [f"deleted orphan VM {b_vm} (sandbox {'5b' * 32})"]
    assert live(ec2) == {a_vm}, "cluster b swept its own orphan and nothing of cluster a"
    # Cluster a's interrupted start is undone by its recovery: its VM only (found by its own tags).
    await a.recover()
    assert live(ec2) == set()
    for lifecycle, store, _ in made:
        await lifecycle.close()
        store.close()
    await provider.close()


async def test_cluster_id_setting_wins_and_is_recorded(tmp_path):
    store = SandboxStore(tmp_path / "state.db")
    assert await resolve_cluster_id(Settings(cluster_id="prod-eu"), store, None) == "prod-eu"
    assert store.fact("cluster_id") == "prod-eu"
    store.close()


async def test_without_kubernetes_a_generated_id_is_recorded_and_kept_across_restarts(tmp_path):
    store = SandboxStore(tmp_path / "state.db")
    first = await resolve_cluster_id(Settings(), store, None)
    store.close()
    store = SandboxStore(tmp_path / "state.db")
    assert first and await resolve_cluster_id(Settings(), store, None) == first
    store.close()


async def test_with_kubernetes_the_id_is_the_kube_system_uid_and_survives_an_unreachable_api(tmp_path):
    from kubernetes_asyncio import client

    store = SandboxStore(tmp_path / "state.db")
    async with KubeApiServer() as kubeapi:
        api = client.ApiClient(kubeapi.configuration())
        uid = kubeapi.get(NAMESPACES, "kube-system")["metadata"]["uid"]
        assert await resolve_cluster_id(Settings(), store, api) == uid
        kubeapi.fail("GET", "/namespaces/kube-system$", 403, times=2)
        assert await resolve_cluster_id(Settings(), store, api) == uid, "the recorded id while the API refuses"
        fresh = SandboxStore(tmp_path / "other.db")
        with pytest.raises(StartupError, match="CLUSTER_ID"):
            await resolve_cluster_id(Settings(), fresh, api)
        fresh.close()
        await api.close()
    store.close()


def test_cluster_id_is_validated():
    from cloudadaptor.config import ConfigError

    with pytest.raises(ConfigError, match="CLUSTER_ID"):
        load_settings({"CLOUD_PROVIDER": "local", "CLUSTER_ID": "bad id/with slash"})


def test_an_empty_cluster_id_never_reaches_a_list_to_delete(tmp_path):
    options = LifecycleOptions(pods_dir=tmp_path, node_name="worker-1", cluster_id="")
    with pytest.raises(ValueError, match="cluster_id"):
        recovery.owned_tags(options)
