"""The local Kubernetes API endpoint behaves like the real one where our code relies on it.

Driven through the real client library (kubernetes_asyncio), as the product code is.
"""

from __future__ import annotations

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from fakes.kubeapi import PEERPODS, PODS, KubeApiServer

G, V, P = "confidentialcontainers.org", "v1alpha1", "peerpods"
MERGE = "application/merge-patch+json"


def peerpod(name: str, finalizers: list[str] | None = None, owner_uid: str | None = None) -> dict:
    meta: dict = {"name": name, "namespace": "default", "finalizers": finalizers or []}
    if owner_uid:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": "web", "uid": owner_uid}]
    return {"apiVersion": f"{G}/{V}", "kind": "PeerPod", "metadata": meta, "spec": {"cloudProvider": "aws", "instanceID": "i-1"}}


async def test_delete_with_finalizer_only_marks_the_object_until_the_finalizer_is_removed(api, kubeapi: KubeApiServer):
    custom = client.CustomObjectsApi(api)
    await custom.create_namespaced_custom_object(G, V, "default", P, peerpod("pp", ["x/f"]))
    deleted = await custom.delete_namespaced_custom_object(G, V, "default", P, "pp")
    assert deleted["metadata"]["deletionTimestamp"], "DELETE with a finalizer must set deletionTimestamp"
    assert kubeapi.get(PEERPODS, "pp", "default") is not None, "object must stay while a finalizer remains"
    current = await custom.get_namespaced_custom_object(G, V, "default", P, "pp")
    await custom.patch_namespaced_custom_object(G, V, "default", P, "pp", {"metadata": {
        "resourceVersion": current["metadata"]["resourceVersion"], "finalizers": []}}, _content_type=MERGE)
    assert kubeapi.get(PEERPODS, "pp", "default") is None, "removing the last finalizer must remove the object"


async def test_stale_resource_version_is_a_conflict(api):
    custom = client.CustomObjectsApi(api)
    created = await custom.create_namespaced_custom_object(G, V, "default", P, peerpod("pp"))
    stale = created["metadata"]["resourceVersion"]
    await custom.patch_namespaced_custom_object(G, V, "default", P, "pp", {"spec": {"instanceID": "i-2"}}, _content_type=MERGE)
    with pytest.raises(ApiException) as err:
        await custom.patch_namespaced_custom_object(G, V, "default", P, "pp", {"metadata": {"resourceVersion": stale},
                                                    "spec": {"instanceID": "i-3"}}, _content_type=MERGE)
    assert err.value.status == 409
    body = {**created, "spec": {"cloudProvider": "aws", "instanceID": "i-4"}}
    with pytest.raises(ApiException) as err:
        await custom.replace_namespaced_custom_object(G, V, "default", P, "pp", body)
    assert err.value.status == 409, "PUT with a stale resourceVersion must be a conflict"


async def test_no_finalizer_can_be_added_to_an_object_being_deleted(api):
    custom = client.CustomObjectsApi(api)
    await custom.create_namespaced_custom_object(G, V, "default", P, peerpod("pp", ["x/f"]))
    await custom.delete_namespaced_custom_object(G, V, "default", P, "pp")
    with pytest.raises(ApiException) as err:
        await custom.patch_namespaced_custom_object(G, V, "default", P, "pp", {"metadata": {"finalizers": ["x/f", "y/g"]}},
                                                    _content_type=MERGE)
    assert err.value.status == 422


async def test_creating_an_existing_name_is_a_conflict(api):
    custom = client.CustomObjectsApi(api)
    await custom.create_namespaced_custom_object(G, V, "default", P, peerpod("pp"))
    with pytest.raises(ApiException) as err:
        await custom.create_namespaced_custom_object(G, V, "default", P, peerpod("pp"))
    assert err.value.status == 409


async def test_strategic_merge_patch_is_refused_for_custom_resources(api):
    custom = client.CustomObjectsApi(api)
    await custom.create_namespaced_custom_object(G, V, "default", P, peerpod("pp"))
    with pytest.raises(ApiException) as err:
        await custom.patch_namespaced_custom_object(G, V, "default", P, "pp", {"spec": {}},
                                                    _content_type="application/strategic-merge-patch+json")
    assert err.value.status == 415


async def test_node_status_subresource_changes_only_status(api, add_node):
    add_node("n1")
    core = client.CoreV1Api(api)
    await core.patch_node_status("n1", {"metadata": {"labels": {"a": "b"}}, "status": {"capacity": {"x/y": "3"}}},
                                 _content_type=MERGE)
    await core.patch_node("n1", {"status": {"capacity": {"x/y": "99"}}}, _content_type=MERGE)
    node = await core.read_node("n1")
    assert node.status.capacity["x/y"] == "3", "main resource must ignore status; /status must apply it"
    assert node.status.capacity["cpu"] == "4", "a merge patch keeps the other capacities"
    assert not (node.metadata.labels or {}).get("a"), "/status must ignore metadata changes"


async def test_deleting_the_owner_garbage_collects_dependents_honouring_finalizers(api, kubeapi: KubeApiServer, add_pod):
    pod = add_pod("web")
    custom = client.CustomObjectsApi(api)
    await custom.create_namespaced_custom_object(G, V, "default", P, peerpod("kept", ["x/f"], pod["metadata"]["uid"]))
    await custom.create_namespaced_custom_object(G, V, "default", P, peerpod("gone", None, pod["metadata"]["uid"]))
    await client.CoreV1Api(api).delete_namespaced_pod("web", "default")
    assert kubeapi.get(PODS, "web", "default") is None
    assert kubeapi.get(PEERPODS, "gone", "default") is None
    kept = kubeapi.get(PEERPODS, "kept", "default")
    assert kept is not None and kept["metadata"]["deletionTimestamp"]


async def test_list_filters_by_namespace_and_selectors(api, add_pod):
    add_pod("a", "ns1", node="n1")
    add_pod("b", "ns1", node="n2")
    add_pod("c", "ns2", node="n1")
    core = client.CoreV1Api(api)
    in_ns1 = await core.list_namespaced_pod("ns1")
    on_n1 = await core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    assert sorted(p.metadata.name for p in in_ns1.items) == ["a", "b"]
    assert sorted(p.metadata.name for p in on_n1.items) == ["a", "c"]


async def test_injected_failures_are_answered_as_status_objects(api, kubeapi: KubeApiServer, add_pod):
    add_pod("web")
    kubeapi.fail("GET", r"/pods/web$", 503, times=1)
    core = client.CoreV1Api(api)
    with pytest.raises(ApiException) as err:
        await core.read_namespaced_pod("web", "default")
    assert err.value.status == 503
    assert (await core.read_namespaced_pod("web", "default")).metadata.name == "web", "only `times` requests fail"
