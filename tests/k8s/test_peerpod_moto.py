"""The crash scenario against the real AWS provider: boto3 → moto server (HTTP on loopback) + the local Kubernetes API.

"The adaptor is killed after the VM was created, then the Pod is deleted" must
end with the EC2 instance terminated; so must a VM whose PeerPod was never written.
"""

from __future__ import annotations



from cloudadaptor.k8s.controller import ControllerOptions, SweepState, reconcile
from cloudadaptor.k8s.peerpods import PeerPodApi, PeerPodTracker
from cloudadaptor.providers import base
from fakes.kubeapi import PEERPODS, PODS

SANDBOX = "c0ffee00" * 8
CLUSTER = "cluster-blue"


def state_of(ec2, instance_id: str) -> str:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]


async def start_vm(provider, pod: str, cluster: str = CLUSTER, sandbox: str = SANDBOX) -> str:
    spec = base.InstanceSpec(
        name=f"podvm-{pod}-{sandbox[:8]}", sandbox_id=sandbox, user_data="#cloud-config\nwrite_files: []\n",
        client_token=sandbox[:32], vcpus=1, memory_mib=2048,
        tags={base.TAG_OWNER: base.OWNER_VALUE, base.TAG_CLUSTER: cluster, base.TAG_NODE: "worker-1",
              base.TAG_SANDBOX: sandbox, base.TAG_POD: f"default/{pod}"},
    )
    return (await provider.create_instance(spec)).id


async def test_adaptor_killed_after_vm_created_then_pod_deleted_terminates_the_ec2_instance(ec2_provider, api, kubeapi, add_pod):
    provider, ec2 = ec2_provider
    add_pod("web")
    instance_id = await start_vm(provider, "web")
    await PeerPodTracker(api, node_name="worker-1").vm_created(SANDBOX, "default", "web", instance_id, "aws")
    # The adaptor is killed here. The user deletes the pod; GC marks the PeerPod deleted.
    kubeapi.delete(PODS, "web", "default")
    report = await reconcile(PeerPodApi(api), provider, ControllerOptions(provider_name="aws", cluster_id=CLUSTER), SweepState(), now=0.0)
    await provider.close()
    assert report.vms_deleted == [instance_id] and not report.errors
    assert state_of(ec2, instance_id) in ("shutting-down", "terminated")
    assert kubeapi.all(PEERPODS) == []


async def test_a_vm_whose_peerpod_was_never_written_is_swept_after_its_pod_goes(ec2_provider, api, kubeapi, add_pod):
    provider, ec2 = ec2_provider
    add_pod("web")
    instance_id = await start_vm(provider, "web")  # killed before the PeerPod was written
    options = ControllerOptions(provider_name="aws", cluster_id=CLUSTER, sweep_grace=30.0)
    state = SweepState()
    await reconcile(PeerPodApi(api), provider, options, state, now=0.0)
    assert state_of(ec2, instance_id) == "running", "its pod is live: the VM stays"
    kubeapi.delete(PODS, "web", "default")
    await reconcile(PeerPodApi(api), provider, options, state, now=10.0)
    assert state_of(ec2, instance_id) == "running", "within the grace period"
    report = await reconcile(PeerPodApi(api), provider, options, state, now=40.0)
    await provider.close()
    assert report.vms_deleted == [instance_id]
    assert state_of(ec2, instance_id) in ("shutting-down", "terminated")


async def test_a_peerpod_naming_an_ec2_instance_we_did_not_launch_leaves_it_running(ec2_provider, api, kubeapi, add_pod):
    provider, ec2 = ec2_provider
    ami = ec2.describe_images(Owners=["self"])["Images"][0]["ImageId"]
    [theirs] = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, InstanceType="t3.micro")["Instances"]
    other_cluster = await start_vm(provider, "db", cluster="cluster-green", sandbox="d00d" * 16)
    for pod, instance_id in (("web", theirs["InstanceId"]), ("db", other_cluster)):
        add_pod(pod)
        await PeerPodTracker(api, node_name="worker-1").vm_created("ab" * 32, "default", pod, instance_id, "aws")
        kubeapi.delete(PODS, pod, "default")
    report = await reconcile(PeerPodApi(api), provider, ControllerOptions(provider_name="aws", cluster_id=CLUSTER),
                             SweepState(), now=0.0)
    await provider.close()
    assert report.vms_deleted == [] and len(report.refused) == 2, report
    assert state_of(ec2, theirs["InstanceId"]) == "running" and state_of(ec2, other_cluster) == "running"


async def test_two_clusters_sharing_an_account_with_colliding_node_names_keep_each_others_vms(ec2_provider, api):
    provider, ec2 = ec2_provider
    blue = await start_vm(provider, "web", cluster="cluster-blue", sandbox="b1" * 32)
    green = await start_vm(provider, "web", cluster="cluster-green", sandbox="9e" * 32)
    # Both pods are gone and no PeerPod names either VM: each cluster's sweep sees an orphan on "worker-1".
    blue_options = ControllerOptions(provider_name="aws", cluster_id="cluster-blue", sweep_grace=0.0)
    report = await reconcile(PeerPodApi(api), provider, blue_options, SweepState(), now=0.0)
    assert report.vms_deleted == [blue], "the blue cluster sweeps its own orphan only"
    assert state_of(ec2, green) == "running"
    green_options = ControllerOptions(provider_name="aws", cluster_id="cluster-green", sweep_grace=0.0)
    report = await reconcile(PeerPodApi(api), provider, green_options, SweepState(), now=0.0)
    await provider.close()
    assert report.vms_deleted == [green]
