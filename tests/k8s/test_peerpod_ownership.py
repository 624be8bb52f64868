"""A PeerPod is user-writable: the controller deletes only the instance it names when
that instance is this cluster's pod VM; and the sweep touches only this cluster's VMs."""

from __future__ import annotations

import pytest

from cloudadaptor.k8s.controller import ControllerOptions, SweepState, reconcile
from cloudadaptor.k8s.peerpods import PeerPodApi, PeerPodTracker, peerpod_name
from cloudadaptor.providers.base import TAG_CLUSTER, TAG_OWNER, ForeignInstance, Instance
from fakes.kubeapi import EVENTS, PEERPODS, PODS

SANDBOX = "5a5a5a5a" * 8
CLUSTER = "cluster-blue"  # what FakeCloud.add tags VMs with (tests/k8s/conftest.py)
OPTIONS = ControllerOptions(provider_name="aws", cluster_id=CLUSTER, sweep=False)


async def peerpod_for(api, kubeapi, instance_id: str, pod: str = "web") -> str:
    """A PeerPod naming ``instance_id`` whose pod was then deleted: the controller must finalize it."""
    await PeerPodTracker(api, node_name="worker-1").vm_created(SANDBOX, "default", pod, instance_id, "aws")
    kubeapi.delete(PODS, pod, "default")
    name = peerpod_name(pod, SANDBOX)
    assert kubeapi.get(PEERPODS, name, "default")["metadata"]["deletionTimestamp"]
    return name


def warning_events(kubeapi, name: str) -> list[dict]:
    return [e for e in kubeapi.all(EVENTS) if e["involvedObject"]["name"] == name and e["type"] == "Warning"]


@pytest.mark.parametrize("tags, why", [
    ({TAG_OWNER: "someone-else"}, "peerpods.io/owner"),
    ({TAG_CLUSTER: "cluster-green"}, "peerpods.io/cluster"),
    ({TAG_CLUSTER: ""}, "peerpods.io/cluster"),
], ids=["not-our-owner-tag", "another-cluster", "no-cluster"])
async def test_a_peerpod_naming_an_instance_we_do_not_own_does_not_get_it_deleted(api, kubeapi, cloud, add_pod, tags, why):
    add_pod("web")
    victim = cloud.add(pod="default/web", sandbox=SANDBOX)
    cloud.instances[victim.id] = Instance(victim.id, victim.name, victim.ips, {**victim.tags, **tags})
    name = await peerpod_for(api, kubeapi, victim.id)
    report = await reconcile(PeerPodApi(api), cloud, OPTIONS, SweepState(), now=0.0)
    assert victim.id in cloud.instances and cloud.deleted == [], "an instance that is not ours must not be deleted"
    assert report.vms_deleted == [] and len(report.refused) == 1 and why in report.refused[0], report.refused
    [event] = warning_events(kubeapi, name)
    assert event["reason"] == "InstanceNotOwned" and victim.id in event["message"] and why in event["message"]
    assert kubeapi.get(PEERPODS, name, "default") is None, "the refused PeerPod's finalizer is released"


async def test_our_vm_named_by_its_peerpod_is_still_deleted(api, kubeapi, cloud, add_pod):
    add_pod("web")
    ours = cloud.add(pod="default/web", sandbox=SANDBOX)
    name = await peerpod_for(api, kubeapi, ours.id)
    report = await reconcile(PeerPodApi(api), cloud, OPTIONS, SweepState(), now=0.0)
    assert report.vms_deleted == [ours.id] and ours.id not in cloud.instances and not report.refused
    assert warning_events(kubeapi, name) == []


async def test_a_peerpod_naming_a_gone_instance_is_released_without_a_delete(api, kubeapi, cloud, add_pod):
    add_pod("web")
    name = await peerpod_for(api, kubeapi, "i-0000000000000dead")
    report = await reconcile(PeerPodApi(api), cloud, OPTIONS, SweepState(), now=0.0)
    assert cloud.deleted == [] and report.finalizers_released == [f"default/{name}"] and not report.refused


async def test_an_instance_outside_the_providers_scope_is_refused(api, kubeapi, cloud, add_pod):
    add_pod("web")
    ours = cloud.add(pod="default/web", sandbox=SANDBOX)

    async def foreign(instance_id: str) -> Instance | None:
        raise ForeignInstance(f"cannot read VM {instance_id}: it is in resource group other-rg")

    cloud.describe_instance = foreign
    name = await peerpod_for(api, kubeapi, ours.id)
    report = await reconcile(PeerPodApi(api), cloud, OPTIONS, SweepState(), now=0.0)
    assert ours.id in cloud.instances and "other-rg" in report.refused[0]
    assert warning_events(kubeapi, name)


async def test_the_sweep_keeps_another_clusters_vms_on_a_node_of_the_same_name(api, cloud):
    ours = cloud.add(pod="default/gone-a", node="worker-1").id
    theirs = cloud.add(pod="default/gone-b", node="worker-1", **{TAG_CLUSTER: "cluster-green"}).id
    options = ControllerOptions(provider_name="aws", cluster_id=CLUSTER, sweep_grace=0.0)
    report = await reconcile(PeerPodApi(api), cloud, options, SweepState(), now=0.0)
    assert report.vms_deleted == [ours] and theirs in cloud.instances


def test_the_controller_needs_a_cluster_id():
    with pytest.raises(ValueError, match="cluster"):
        ControllerOptions(provider_name="aws", cluster_id="")


async def test_the_cluster_uid_is_the_kube_system_namespace_uid(api, kubeapi):
    from fakes.kubeapi import NAMESPACES

    assert await PeerPodApi(api).cluster_uid() == kubeapi.get(NAMESPACES, "kube-system")["metadata"]["uid"]
