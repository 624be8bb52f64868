"""PeerPodTracker: a PeerPod per pod VM, owned by the Pod, finalizer released after the VM is deleted."""

from __future__ import annotations

import logging
import time

from cloudadaptor.adaptor.hooks import NoopObserver, SandboxObserver
from cloudadaptor.k8s.peerpods import ANN_NODE, ANN_SANDBOX, FINALIZER, PeerPodTracker, peerpod_name
from fakes.kubeapi import PEERPODS, KubeApiServer

SANDBOX = "0123456789abcdef" * 4


def stored(kubeapi: KubeApiServer, pod: str = "web", namespace: str = "default") -> dict | None:
    return kubeapi.get(PEERPODS, peerpod_name(pod, SANDBOX), namespace)


def test_tracker_and_noop_satisfy_the_observer_protocol(api):
    assert isinstance(PeerPodTracker(api, node_name="n"), SandboxObserver)
    assert isinstance(NoopObserver(), SandboxObserver)


def test_peerpod_name_is_per_sandbox_and_a_valid_object_name():
    assert peerpod_name("web", SANDBOX) == "web-01234567"
    long = peerpod_name("a" * 253, SANDBOX)
    assert len(long) <= 253 and long.endswith("-01234567")
    assert peerpod_name("x" * 243 + ".-", SANDBOX) == "x" * 243 + "-01234567", "no '.-' before the suffix"


async def test_vm_created_records_a_peerpod_owned_by_the_pod_with_a_finalizer(api, kubeapi, add_pod):
    pod = add_pod("web")
    await PeerPodTracker(api, node_name="worker-1").vm_created(SANDBOX, "default", "web", "i-0abc", "aws")
    peerpod = stored(kubeapi)
    assert peerpod is not None, "no PeerPod created"
    assert peerpod["spec"] == {"cloudProvider": "aws", "instanceID": "i-0abc"}
    assert peerpod["metadata"]["finalizers"] == [FINALIZER]
    owner = peerpod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Pod", "web", pod["metadata"]["uid"])
    assert peerpod["metadata"]["annotations"] == {ANN_SANDBOX: SANDBOX, ANN_NODE: "worker-1"}


async def test_vm_created_again_points_the_existing_peerpod_at_the_new_vm(api, kubeapi, add_pod):
    add_pod("web")
    tracker = PeerPodTracker(api, node_name="worker-1")
    await tracker.vm_created(SANDBOX, "default", "web", "i-first", "aws")
    await tracker.vm_created(SANDBOX, "default", "web", "i-first", "aws")
    assert stored(kubeapi)["spec"]["instanceID"] == "i-first"
    await tracker.vm_created(SANDBOX, "default", "web", "i-second", "aws")
    peerpod = stored(kubeapi)
    assert peerpod["spec"]["instanceID"] == "i-second"
    assert peerpod["metadata"]["finalizers"] == [FINALIZER]


async def test_vm_created_for_a_pod_that_is_gone_creates_nothing_and_does_not_raise(api, kubeapi):
    await PeerPodTracker(api, node_name="worker-1").vm_created(SANDBOX, "default", "ghost", "i-1", "aws")
    assert kubeapi.all(PEERPODS) == []


async def test_vm_created_without_pod_identity_calls_no_api(api, kubeapi):
    await PeerPodTracker(api, node_name="worker-1").vm_created(SANDBOX, "", "", "i-1", "aws")
    assert kubeapi.requests == []


async def test_transient_api_errors_are_retried(api, kubeapi, add_pod):
    add_pod("web")
    kubeapi.fail("POST", "/peerpods$", 503, times=2)
    await PeerPodTracker(api, node_name="worker-1").vm_created(SANDBOX, "default", "web", "i-1", "aws")
    assert stored(kubeapi) is not None, "a 503 must be retried within the timeout"


async def test_an_api_that_keeps_failing_is_logged_within_the_timeout_and_never_raises(api, kubeapi, add_pod, caplog):
    add_pod("web")
    kubeapi.fail("GET", "/pods/web$", 500, times=1000)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING):
        await PeerPodTracker(api, node_name="worker-1", timeout=0.5).vm_created(SANDBOX, "default", "web", "i-1", "aws")
    assert time.monotonic() - began < 5
    assert "not recorded" in caplog.text and "HTTP 500" in caplog.text


async def test_an_unreachable_api_server_never_fails_the_pod(api, kubeapi, add_pod, caplog):
    add_pod("web")
    await kubeapi.close()
    tracker = PeerPodTracker(api, node_name="worker-1", timeout=0.5)
    with caplog.at_level(logging.WARNING, logger="cloudadaptor.k8s.peerpods"):
        await tracker.vm_created(SANDBOX, "default", "web", "i-1", "aws")
        await tracker.vm_deleted(SANDBOX, "default", "web", "i-1")
    assert kubeapi.all(PEERPODS) == [], "no PeerPod (and so no finalizer) was left while the API was away"
    assert "not recorded" in caplog.text and "not released" in caplog.text
    assert not [r for r in caplog.records if r.exc_info], "an unreachable API is expected: one line, no traceback"


async def test_a_peerpod_recorded_before_the_api_went_away_keeps_its_finalizer_for_the_controller(api, kubeapi, add_pod):
    add_pod("web")
    tracker = PeerPodTracker(api, node_name="worker-1", timeout=0.5)
    await tracker.vm_created(SANDBOX, "default", "web", "i-1", "aws")
    await kubeapi.close()
    await tracker.vm_deleted(SANDBOX, "default", "web", "i-1")
    peerpod = stored(kubeapi)
    assert peerpod is not None and peerpod["metadata"]["finalizers"] == [FINALIZER], \
        "the finalizer stays until someone confirms the VM is gone"
    assert peerpod["spec"]["instanceID"] == "i-1"


async def test_a_bug_in_the_tracker_is_logged_with_its_traceback_and_never_fails_the_pod(api, kubeapi, add_pod, caplog):
    add_pod("web")
    tracker = PeerPodTracker(api, node_name="worker-1", timeout=0.5)

    async def broken(namespace: str, name: str):
        raise KeyError("uid")

    tracker.peerpods.pod = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="cloudadaptor.k8s.peerpods"):
        await tracker.vm_created(SANDBOX, "default", "web", "i-1", "aws")
    with_traceback = [r for r in caplog.records if r.exc_info]
    assert len(with_traceback) == 1 and with_traceback[0].exc_info[0] is KeyError, caplog.text
    assert "not recorded" in with_traceback[0].getMessage()
    assert kubeapi.all(PEERPODS) == []


async def test_vm_deleted_releases_the_finalizer_and_the_peerpod_goes(api, kubeapi, add_pod):
    add_pod("web")
    tracker = PeerPodTracker(api, node_name="worker-1")
    await tracker.vm_created(SANDBOX, "default", "web", "i-1", "aws")
    await tracker.vm_deleted(SANDBOX, "default", "web", "i-1")
    assert stored(kubeapi) is None


async def test_vm_deleted_retries_on_conflict(api, kubeapi, add_pod):
    add_pod("web")
    tracker = PeerPodTracker(api, node_name="worker-1")
    await tracker.vm_created(SANDBOX, "default", "web", "i-1", "aws")
    kubeapi.fail("PATCH", "/peerpods/", 409, times=2)
    await tracker.vm_deleted(SANDBOX, "default", "web", "i-1")
    assert stored(kubeapi) is None, "a 409 must be re-read and re-applied"
    assert sum(r.method == "PATCH" for r in kubeapi.requests) == 3


async def test_vm_deleted_leaves_a_peerpod_of_another_vm_alone(api, kubeapi, add_pod):
    add_pod("web")
    tracker = PeerPodTracker(api, node_name="worker-1")
    await tracker.vm_created(SANDBOX, "default", "web", "i-new", "aws")
    await tracker.vm_deleted(SANDBOX, "default", "web", "i-old")
    assert stored(kubeapi)["metadata"]["finalizers"] == [FINALIZER]


async def test_vm_deleted_without_a_peerpod_is_harmless(api, kubeapi):
    await PeerPodTracker(api, node_name="worker-1").vm_deleted(SANDBOX, "default", "web", "i-1")
    assert kubeapi.all(PEERPODS) == []
