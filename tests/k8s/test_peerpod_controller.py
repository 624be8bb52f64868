"""The PeerPod controller's reconcile pass: finalize, orphaned PeerPods, sweep — and the crash scenario."""

from __future__ import annotations

import logging

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from cloudadaptor.k8s.controller import ControllerOptions, SweepState, reconcile
from cloudadaptor.k8s.peerpods import FINALIZER, PeerPodApi, PeerPodTracker, peerpod_name
from fakes.kubeapi import PEERPODS, PODS, KubeApiServer

SANDBOX = "feedface" * 8
CLUSTER = "cluster-blue"  # what FakeCloud.add tags VMs with (tests/k8s/conftest.py)
OPTIONS = ControllerOptions(provider_name="aws", cluster_id=CLUSTER, sweep_grace=60.0)


async def record_vm(api, cloud, pod: str = "web", namespace: str = "default", sandbox: str = SANDBOX) -> str:
    """What the adaptor does in StartVM: create the VM, then its PeerPod."""
    instance = cloud.add(pod=f"{namespace}/{pod}", sandbox=sandbox)
    await PeerPodTracker(api, node_name="worker-1").vm_created(sandbox, namespace, pod, instance.id, cloud.name)
    return instance.id


async def test_adaptor_killed_after_vm_created_then_pod_deleted_ends_with_the_vm_deleted(api, kubeapi, cloud, add_pod):
    add_pod("web")
    vm = await record_vm(api, cloud)
    # The adaptor dies here: no StopVM, no vm_deleted. The user deletes the pod;
    # the garbage collector deletes the PeerPod, which waits on our finalizer.
    kubeapi.delete(PODS, "web", "default")
    waiting = kubeapi.get(PEERPODS, peerpod_name("web", SANDBOX), "default")
    assert waiting is not None and waiting["metadata"]["deletionTimestamp"], "the finalizer must hold the PeerPod"
    report = await reconcile(PeerPodApi(api), cloud, OPTIONS, SweepState(), now=0.0)
    assert vm not in cloud.instances, "the VM must be deleted"
    assert report.vms_deleted == [vm]
    assert report.finalizers_released == [f"default/{peerpod_name('web', SANDBOX)}"]
    assert kubeapi.all(PEERPODS) == [], "the PeerPod must be gone once the finalizer is released"


async def test_without_garbage_collection_a_peerpod_whose_pod_is_gone_is_deleted_with_its_vm(cloud):
    async with KubeApiServer(garbage_collect=False) as kubeapi:
        api2 = client.ApiClient(kubeapi.configuration())
        kubeapi.seed(PODS, {"metadata": {"name": "web", "namespace": "default"}, "spec": {"containers": [{"name": "c"}]}})
        vm = await record_vm(api2, cloud)
        kubeapi.delete(PODS, "web", "default")
        assert kubeapi.get(PEERPODS, peerpod_name("web", SANDBOX), "default") is not None
        report = await reconcile(PeerPodApi(api2), cloud, OPTIONS, SweepState(), now=0.0)
        await api2.close()
        assert vm not in cloud.instances and report.peerpods_deleted
        assert kubeapi.all(PEERPODS) == []


async def test_a_peerpod_of_a_recreated_pod_with_the_same_name_is_orphaned(api, kubeapi, cloud, add_pod):
    add_pod("web")
    vm = await record_vm(api, cloud)
    kubeapi.store.objects.pop(("pods", "default", "web"))  # gone without garbage collection...
    add_pod("web")  # ...and a new pod (new uid) of the same name
    await reconcile(PeerPodApi(api), cloud, OPTIONS, SweepState(), now=0.0)
    assert vm not in cloud.instances


async def test_a_peerpod_with_a_live_pod_is_left_alone(api, kubeapi, cloud, add_pod):
    add_pod("web")
    vm = await record_vm(api, cloud)
    report = await reconcile(PeerPodApi(api), cloud, OPTIONS, SweepState(), now=1e9)
    assert vm in cloud.instances and not report.vms_deleted and not report.errors
    assert kubeapi.get(PEERPODS, peerpod_name("web", SANDBOX), "default")["metadata"]["finalizers"] == [FINALIZER]


async def test_a_failed_vm_delete_keeps_the_finalizer_and_is_retried_next_pass(api, kubeapi, cloud, add_pod):
    add_pod("web")
    vm = await record_vm(api, cloud)
    kubeapi.delete(PODS, "web", "default")
    cloud.fail_deletes = 1
    first = await reconcile(PeerPodApi(api), cloud, OPTIONS, SweepState(), now=0.0)
    assert first.errors and "throttled" in first.errors[0]
    assert kubeapi.get(PEERPODS, peerpod_name("web", SANDBOX), "default") is not None, "finalizer must stay until the VM is gone"
    await reconcile(PeerPodApi(api), cloud, OPTIONS, SweepState(), now=0.0)
    assert vm not in cloud.instances and kubeapi.all(PEERPODS) == []


async def test_a_peerpod_of_another_cloud_provider_is_not_touched(api, kubeapi, cloud, add_pod):
    add_pod("web")
    vm = await record_vm(api, cloud)
    kubeapi.delete(PODS, "web", "default")
    report = await reconcile(PeerPodApi(api), cloud, ControllerOptions(provider_name="azure", cluster_id=CLUSTER, sweep=False), SweepState(), now=0.0)
    assert vm in cloud.instances and report.errors
    assert kubeapi.get(PEERPODS, peerpod_name("web", SANDBOX), "default") is not None


async def test_sweep_deletes_an_unreferenced_vm_only_after_the_grace_period(api, cloud):
    orphan = cloud.add(pod="default/ghost").id
    state = SweepState()
    peerpods = PeerPodApi(api)
    assert (await reconcile(peerpods, cloud, OPTIONS, state, now=100.0)).vms_deleted == []
    assert (await reconcile(peerpods, cloud, OPTIONS, state, now=159.0)).vms_deleted == [], "grace is 60 s"
    assert (await reconcile(peerpods, cloud, OPTIONS, state, now=160.0)).vms_deleted == [orphan]
    assert orphan not in cloud.instances and state.first_seen == {}


async def test_sweep_spares_vms_of_peerpods_and_of_live_pods(api, cloud, add_pod):
    add_pod("web")
    tracked = await record_vm(api, cloud)
    add_pod("db", node="worker-1")
    live = cloud.add(pod="default/db", sandbox="s2").id  # its PeerPod was never written
    state = SweepState()
    for now in (0.0, 1000.0):
        await reconcile(PeerPodApi(api), cloud, OPTIONS, state, now=now)
    assert tracked in cloud.instances and live in cloud.instances


async def test_sweep_counts_a_finished_pod_or_a_pod_on_another_node_as_gone(api, cloud, add_pod):
    add_pod("job", phase="Succeeded")
    add_pod("moved", node="worker-2")
    done = cloud.add(pod="default/job", node="worker-1").id
    moved = cloud.add(pod="default/moved", node="worker-1").id
    state = SweepState()
    await reconcile(PeerPodApi(api), cloud, OPTIONS, state, now=0.0)
    report = await reconcile(PeerPodApi(api), cloud, OPTIONS, state, now=60.0)
    assert sorted(report.vms_deleted) == sorted([done, moved])


async def test_the_grace_period_restarts_when_a_live_pod_goes(api, kubeapi, cloud, add_pod):
    add_pod("web")
    vm = cloud.add(pod="default/web").id
    state = SweepState()
    await reconcile(PeerPodApi(api), cloud, OPTIONS, state, now=0.0)
    kubeapi.delete(PODS, "web", "default")
    await reconcile(PeerPodApi(api), cloud, OPTIONS, state, now=100.0)
    assert vm in cloud.instances, "first seen unreferenced at 100: not yet"
    await reconcile(PeerPodApi(api), cloud, OPTIONS, state, now=160.0)
    assert vm not in cloud.instances


async def test_sweep_only_touches_vms_carrying_the_configured_tags(api, cloud):
    ours = cloud.add(pod="default/a", cluster="blue").id
    theirs = cloud.add(pod="default/b", cluster="green").id
    options = ControllerOptions(provider_name="aws", cluster_id=CLUSTER, sweep_grace=0.0, sweep_tags={"cluster": "blue"})
    await reconcile(PeerPodApi(api), cloud, options, SweepState(), now=0.0)
    assert ours not in cloud.instances and theirs in cloud.instances


async def test_sweep_disabled_deletes_nothing(api, cloud):
    orphan = cloud.add(pod="default/ghost").id
    await reconcile(PeerPodApi(api), cloud, ControllerOptions(provider_name="aws", cluster_id=CLUSTER, sweep=False, sweep_grace=0.0), SweepState(), 0.0)
    assert orphan in cloud.instances


async def test_when_peerpods_cannot_be_listed_nothing_is_swept(api, kubeapi, cloud):
    orphan = cloud.add(pod="default/ghost").id
    kubeapi.fail("GET", "/peerpods$", 500, times=1)
    with pytest.raises(ApiException):
        await reconcile(PeerPodApi(api), cloud, ControllerOptions(provider_name="aws", cluster_id=CLUSTER, sweep_grace=0.0), SweepState(), 0.0)
    assert orphan in cloud.instances


async def test_when_a_pod_cannot_be_read_its_vm_is_kept(api, kubeapi, cloud):
    vm = cloud.add(pod="default/web").id
    kubeapi.fail("GET", "/pods/web$", 503, times=1)
    report = await reconcile(PeerPodApi(api), cloud, ControllerOptions(provider_name="aws", cluster_id=CLUSTER, sweep_grace=0.0), SweepState(), 0.0)
    assert vm in cloud.instances and report.errors


# ------------------------------------------------------------------ errors keep their cause


async def buggy_list_owned(tags):
    """A provider with a bug: listing raises what no API or cloud would."""
    raise TypeError("'NoneType' object is not subscriptable")


def tracebacks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info and r.name == "cloudadaptor.k8s.controller"]


async def test_a_bug_is_logged_with_its_traceback_once_not_every_pass(api, cloud, caplog):
    cloud.list_owned = buggy_list_owned
    state = SweepState()
    options = ControllerOptions(provider_name="aws", cluster_id=CLUSTER, sweep_grace=0.0)
    with caplog.at_level(logging.ERROR, logger="cloudadaptor.k8s.controller"):
        for _ in range(3):
            report = await reconcile(PeerPodApi(api), cloud, options, state, 0.0)
            assert report.errors == ["listing owned VMs: TypeError: 'NoneType' object is not subscriptable"]
            state.errors.end_pass()
    assert len(tracebacks(caplog)) == 1, "the traceback once, then one line per pass"
    assert tracebacks(caplog)[0].exc_info[0] is TypeError
    assert sum("sweep: listing owned VMs failed" in r.getMessage() for r in caplog.records) == 3


async def test_a_bug_that_comes_back_after_a_clean_pass_logs_its_traceback_again(api, cloud, caplog):
    state = SweepState()
    options = ControllerOptions(provider_name="aws", cluster_id=CLUSTER, sweep_grace=0.0)
    with caplog.at_level(logging.ERROR, logger="cloudadaptor.k8s.controller"):
        cloud.list_owned = buggy_list_owned
        await reconcile(PeerPodApi(api), cloud, options, state, 0.0)
        state.errors.end_pass()
        del cloud.list_owned  # fixed...
        assert not (await reconcile(PeerPodApi(api), cloud, options, state, 0.0)).errors
        state.errors.end_pass()
        cloud.list_owned = buggy_list_owned  # ...and broken again
        await reconcile(PeerPodApi(api), cloud, options, state, 0.0)
    assert len(tracebacks(caplog)) == 2


async def test_an_expected_cloud_error_is_one_line_without_a_traceback(api, kubeapi, cloud, add_pod, caplog):
    add_pod("web")
    await record_vm(api, cloud)
    kubeapi.delete(PODS, "web", "default")
    cloud.fail_deletes = 1
    with caplog.at_level(logging.ERROR, logger="cloudadaptor.k8s.controller"):
        report = await reconcile(PeerPodApi(api), cloud, OPTIONS, SweepState(), now=0.0)
    assert report.errors and "throttled" in report.errors[0]
    assert "finalizing PeerPod" in caplog.text and "throttled" in caplog.text
    assert tracebacks(caplog) == []


async def test_the_controller_loop_survives_a_failing_pass(api, kubeapi, cloud, caplog):
    import asyncio

    from cloudadaptor.k8s.controller import run

    kubeapi.fail("GET", "/peerpods$", 500, times=1)
    stop = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="cloudadaptor.k8s.controller"):
        task = asyncio.create_task(run(PeerPodApi(api), cloud, OPTIONS, interval=0.05, stop=stop))
        await asyncio.sleep(0.5)
        stop.set()
        report = await asyncio.wait_for(task, 5)
    assert report is not None and not report.errors, "later passes ran"
    assert "reconcile pass failed (nothing swept)" in caplog.text and "HTTP 500" in caplog.text
    assert tracebacks(caplog) == [], "an API error is expected: no traceback"


async def test_sweep_leaves_pool_vms_to_their_nodes_adaptor_until_the_node_is_gone(api, kubeapi, cloud, add_node):
    from cloudadaptor.providers.base import TAG_POOL
    add_node("worker-1")
    pooled = cloud.add(pod="", sandbox="", node="worker-1", **{TAG_POOL: "podvm-pool-0a1b2c3d"}).id
    dead_node = cloud.add(pod="", sandbox="", node="worker-9", **{TAG_POOL: "podvm-pool-99999999"}).id
    state = SweepState()
    for now in (0.0, 1000.0):
        await reconcile(PeerPodApi(api), cloud, OPTIONS, state, now=now)
    assert pooled in cloud.instances, "a pool VM of a live node is not the controller's to delete"
    assert dead_node not in cloud.instances, "a pool VM of a node that is gone is swept after the grace"
