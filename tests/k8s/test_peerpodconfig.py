"""PeerPodConfig → node capacity, against the local Kubernetes API: the controller's passes, the
statuses and Events it writes, and the adaptor's side (it follows the node, never fights the controller)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio import client

from cloudadaptor.config import Settings
from cloudadaptor.k8s import nodelimits
from cloudadaptor.k8s.capacity import CONFIG_ANNOTATION, UNSELECTED, VM_RESOURCE
from cloudadaptor.k8s.node import NodeIntegration
from cloudadaptor.k8s.peerpodconfig import Invalid, parse
from cloudadaptor.k8s.peerpods import ANN_NODE
from fakes.kubeapi import EVENTS, NODES, PEERPODCONFIGS, PEERPODS

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "peerpodconfig-openshift.yaml"
NS, NAME = "openshift-sandboxed-containers-operator", "peerpodconfig-openshift"
KATA_OC = "node-role.kubernetes.io/kata-oc"
GROUP, VERSION, PLURAL = "confidentialcontainers.org", "v1alpha1", "peerpodconfigs"


def node(name: str, labels: dict | None = None, vm: str | None = None, annotation: str | None = None) -> dict:
    capacity = {"cpu": "4", **({VM_RESOURCE: vm} if vm is not None else {})}
    meta: dict = {"name": name, "labels": labels or {}}
    if annotation is not None:
        meta["annotations"] = {CONFIG_ANNOTATION: annotation}
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta,
            "status": {"capacity": dict(capacity), "allocatable": dict(capacity)}}


def vm_of(kubeapi, name: str) -> tuple[str | None, str | None, str | None]:
    """(capacity, allocatable, annotation) of kata.peerpods.io/vm on a node."""
    obj = kubeapi.get(NODES, name)
    status = obj["status"]
    return (status["capacity"].get(VM_RESOURCE), status["allocatable"].get(VM_RESOURCE),
            (obj["metadata"].get("annotations") or {}).get(CONFIG_ANNOTATION))


def config(name: str, limit: str, selector: dict, namespace: str = NS) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PeerPodConfig", "metadata": {"name": name, "namespace": namespace},
            "spec": {"limit": limit, "nodeSelector": selector}}


@pytest.fixture
def custom(api):
    return client.CustomObjectsApi(api)


@pytest.fixture
def cluster(kubeapi):
    """Two nodes labelled kata-oc, one not (it runs 10 from its adaptor's PEERPODS_LIMIT_PER_NODE)."""
    kubeapi.seed(NODES, node("worker-a", {KATA_OC: ""}))
    kubeapi.seed(NODES, node("worker-b", {KATA_OC: ""}))
    kubeapi.seed(NODES, node("plain", {"node-role.kubernetes.io/worker": ""}, vm="10"))
    return kubeapi


async def patch_limit(custom, value: str, name: str = NAME) -> None:
    """What `oc patch peerpodconfig ... --type merge --patch '{"spec":{"limit":"<value>"}}'` sends."""
    await custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name, {"spec": {"limit": value}},
                                                _content_type="application/merge-patch+json")


def status_of(kubeapi, name: str = NAME) -> dict:
    return kubeapi.get(PEERPODCONFIGS, name, NS).get("status") or {}


def events_for(kubeapi, name: str = NAME) -> list[dict]:
    return [e for e in kubeapi.all(EVENTS) if e["involvedObject"]["name"] == name]


async def test_the_example_sets_the_limit_on_matching_nodes_and_follows_a_patch(api, custom, cluster):
    example = yaml.safe_load(EXAMPLE.read_text())
    assert (example["metadata"]["namespace"], example["spec"]["limit"]) == (NS, "10")
    await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, example)
    controller = nodelimits.NodeLimitController(api)
    await controller.reconcile()
    for name in ("worker-a", "worker-b"):
        assert vm_of(cluster, name) == ("10", "10", f"{NS}/{NAME}")
    assert vm_of(cluster, "plain") == ("10", "10", None), "a node without the label is untouched"
    status = status_of(cluster)
    assert status["nodes"] == ["worker-a", "worker-b"] and status["limit"] == "10" and status["appliedAt"]
    assert status["conditions"][0]["reason"] == "Applied"

    plain_before = cluster.get(NODES, "plain")
    await patch_limit(custom, "3")
    report = await controller.reconcile()
    for name in ("worker-a", "worker-b"):
        assert vm_of(cluster, name) == ("3", "3", f"{NS}/{NAME}")
    assert cluster.get(NODES, "plain") == plain_before, "not even rewritten"
    assert status_of(cluster)["limit"] == "3" and status_of(cluster)["observedGeneration"] == 2
    assert not any("plain" in line for line in report.nodes_changed)
    assert await controller.reconcile() == nodelimits.NodeLimitReport(), "a pass with nothing to do writes nothing"


async def test_a_newly_labelled_node_gets_the_limit_and_an_unlabelled_one_loses_it(api, custom, cluster):
    await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, config(NAME, "4", {KATA_OC: ""}))
    controller = nodelimits.NodeLimitController(api)
    await controller.reconcile()
    core = client.CoreV1Api(api)
    await core.patch_node("plain", {"metadata": {"labels": {KATA_OC: ""}}}, _content_type="application/merge-patch+json")
    await core.patch_node("worker-b", {"metadata": {"labels": {KATA_OC: None}}}, _content_type="application/merge-patch+json")
    await controller.reconcile()
    assert vm_of(cluster, "plain") == ("4", "4", f"{NS}/{NAME}")
    assert vm_of(cluster, "worker-b") == (None, None, UNSELECTED), "the resource is removed, the node marked"
    assert status_of(cluster)["nodes"] == ["plain", "worker-a"]

    await custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, NAME)
    await controller.reconcile()
    for name in ("plain", "worker-a", "worker-b"):
        assert vm_of(cluster, name) == (None, None, None), \
            f"{name}: no PeerPodConfig left: the node is handed back to its adaptor (PEERPODS_LIMIT_PER_NODE)"


async def test_two_configs_selecting_a_node_both_say_so_and_the_lower_limit_wins(api, custom, cluster):
    await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, config(NAME, "10", {KATA_OC: ""}))
    await custom.create_namespaced_custom_object(GROUP, VERSION, "team", PLURAL,
                                                 config("small", "2", {"kubernetes.io/hostname": "worker-b"}, "team"))
    cluster.store.objects[("nodes", "", "worker-b")]["metadata"]["labels"]["kubernetes.io/hostname"] = "worker-b"
    await nodelimits.NodeLimitController(api).reconcile()
    assert vm_of(cluster, "worker-b") == ("2", "2", "team/small")
    assert vm_of(cluster, "worker-a") == ("10", "10", f"{NS}/{NAME}")
    for name, namespace in ((NAME, NS), ("small", "team")):
        status = cluster.get(PEERPODCONFIGS, name, namespace)["status"]
        assert status["conflicts"] == [{"node": "worker-b", "peerPodConfigs": ["team/small", f"{NS}/{NAME}"],
                                        "winner": "team/small", "appliedLimit": "2"}], name
        assert status["conditions"][0]["reason"] == "NodeConflict"
        assert "worker-b" in status["conditions"][0]["message"]
    assert status_of(cluster)["nodes"] == ["worker-a"]
    assert [e["reason"] for e in events_for(cluster)] == ["NodeConflict"]


@pytest.mark.parametrize("spec, problem", [
    ({"limit": "ten", "nodeSelector": {KATA_OC: ""}}, "spec.limit: 'ten' is not a non-negative integer"),
    ({"limit": "-1", "nodeSelector": {KATA_OC: ""}}, "spec.limit: '-1'"),
    ({"limit": "5", "nodeSelector": {}}, "spec.nodeSelector: required"),
    ({"limit": "5"}, "spec.nodeSelector: required"),
    ({"limit": "5", "nodeSelector": {"bad key!": ""}}, "label key 'bad key!'"),
    ({"limit": "5", "nodeSelector": {KATA_OC: "no spaces"}}, "value 'no spaces'"),
])
async def test_a_bad_spec_is_reported_in_the_status_and_an_event_and_the_nodes_stay(api, custom, cluster, spec, problem):
    await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, config(NAME, "6", {KATA_OC: ""}))
    controller = nodelimits.NodeLimitController(api)
    await controller.reconcile()
    before = {n: cluster.get(NODES, n) for n in ("worker-a", "worker-b", "plain")}
    # The fake API does not enforce the CRD schema (a real one refuses most of these: test_peerpodconfig_crd.py).
    cluster.store.objects[("peerpodconfigs", NS, NAME)]["spec"] = spec
    await controller.reconcile()
    assert {n: cluster.get(NODES, n) for n in before} == before, "bad input changes no node"
    status = status_of(cluster)
    condition = status["conditions"][0]
    assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
    assert problem in condition["message"], condition["message"]
    assert status["nodes"] == ["worker-a", "worker-b"] and status["limit"] == "6", "what the nodes carry, still"
    warnings = [e for e in events_for(cluster) if e["reason"] == "InvalidSpec"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning" and problem in warnings[0]["message"]
    await controller.reconcile()
    assert len([e for e in events_for(cluster) if e["reason"] == "InvalidSpec"]) == 1, "one Event, not one per pass"

    cluster.store.objects[("peerpodconfigs", NS, NAME)]["spec"] = {"limit": "2", "nodeSelector": {KATA_OC: ""}}  # fixed
    await controller.reconcile()
    assert vm_of(cluster, "worker-a") == ("2", "2", f"{NS}/{NAME}")
    assert status_of(cluster)["conditions"][0]["reason"] == "Applied"


async def test_a_node_running_more_vms_than_the_limit_is_reported_and_nothing_is_stopped(api, custom, cluster):
    for i in range(4):
        cluster.seed(PEERPODS, {"metadata": {"name": f"vm-{i}", "namespace": "prod", "annotations": {ANN_NODE: "worker-a"}},
                                "spec": {"cloudProvider": "local", "instanceID": f"i-{i}"}})
    await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, config(NAME, "10", {KATA_OC: ""}))
    controller = nodelimits.NodeLimitController(api)
    await controller.reconcile()
    assert "aboveLimit" not in status_of(cluster)
    await patch_limit(custom, "3")
    await controller.reconcile()
    status = status_of(cluster)
    assert status["aboveLimit"] == [{"node": "worker-a", "running": 4, "limit": "3"}]
    assert status["conditions"][0]["reason"] == "AboveLimit"
    assert "runs 4 pod VMs, more than the limit 3: they keep running" in status["conditions"][0]["message"]
    assert len(cluster.all(PEERPODS)) == 4 and not any(p["metadata"].get("deletionTimestamp") for p in cluster.all(PEERPODS))
    assert vm_of(cluster, "worker-a")[0] == "3"


async def test_the_controller_loop_carries_a_patch_to_the_nodes_within_its_interval(api, custom, cluster):
    await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, config(NAME, "10", {KATA_OC: ""}))
    stop = asyncio.Event()
    loop = asyncio.create_task(nodelimits.run(nodelimits.NodeLimitController(api), stop=stop, interval=0.05))
    try:
        await _until(lambda: vm_of(cluster, "worker-a")[0] == "10")
        await patch_limit(custom, "3")
        await _until(lambda: vm_of(cluster, "worker-a")[0] == "3" and vm_of(cluster, "worker-b")[0] == "3")
    finally:
        stop.set()
        await loop


async def test_an_api_error_on_one_node_is_reported_and_the_others_still_change(api, custom, cluster):
    await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, config(NAME, "5", {KATA_OC: ""}))
    cluster.fail("PATCH", "/nodes/worker-a/status$", 503)
    report = await nodelimits.NodeLimitController(api).reconcile()
    assert vm_of(cluster, "worker-b") == ("5", "5", f"{NS}/{NAME}")
    assert vm_of(cluster, "worker-a") == (None, None, None), "capacity first: no annotation before the capacity is there"
    assert report.errors and "worker-a" in report.errors[0]
    assert status_of(cluster)["conditions"][0]["reason"] == "NodeUpdateFailed"
    await nodelimits.NodeLimitController(api).reconcile()
    assert vm_of(cluster, "worker-a") == ("5", "5", f"{NS}/{NAME}"), "retried on the next pass"


# ------------------------------------------------------------- the adaptor's side


async def test_the_adaptor_follows_a_managed_node_and_never_overwrites_it(api, kubeapi):
    kubeapi.seed(NODES, node("worker-a", {KATA_OC: ""}, vm="3", annotation=f"{NS}/{NAME}"))
    integration = NodeIntegration(api, Settings(node_name="worker-a", peerpods_limit_per_node=10), follow_interval=0.05)
    await integration.start()
    try:
        assert integration.vm_limit.current() == 3 and integration.vm_limit.managed
        assert f"PeerPodConfig {NS}/{NAME}" in integration.vm_limit.source
        assert vm_of(kubeapi, "worker-a")[0] == "3", "the adaptor did not advertise its PEERPODS_LIMIT_PER_NODE"
        assert not [r for r in kubeapi.requests if r.method == "PATCH"], "no write at all"
        kubeapi.store.objects[("nodes", "", "worker-a")]["status"]["capacity"][VM_RESOURCE] = "7"
        await _until(lambda: integration.vm_limit.current() == 7)
        kubeapi.store.objects[("nodes", "", "worker-a")]["metadata"]["annotations"][CONFIG_ANNOTATION] = UNSELECTED
        await _until(lambda: integration.vm_limit.current() == 0)
        del kubeapi.store.objects[("nodes", "", "worker-a")]["metadata"]["annotations"][CONFIG_ANNOTATION]
        await _until(lambda: vm_of(kubeapi, "worker-a")[:2] == ("10", "10"))
        assert integration.vm_limit.current() == 10 and not integration.vm_limit.managed
    finally:
        await integration.close()


def test_parse_accepts_the_docs_example():
    spec = parse(yaml.safe_load(EXAMPLE.read_text()))
    assert not isinstance(spec, Invalid)
    assert (spec.ref, spec.limit, dict(spec.node_selector)) == (f"{NS}/{NAME}", 10, {KATA_OC: ""})


async def _until(check, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)
