"""The mutating webhook over real HTTPS with AdmissionReview v1 JSON.

Patches are applied with the independent ``jsonpatch`` library and the
result is validated against the Kubernetes Pod schema.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import socket
import ssl
import uuid

import aiohttp
import jsonpatch
import kubernetes_validate
import pytest

from cloudadaptor.webhook.mutate import ANN_MEMORY, ANN_VCPUS, VM_RESOURCE, MutationOptions
from cloudadaptor.webhook.server import CertificateReloader

VM = {"limits": {VM_RESOURCE: "1"}, "requests": {VM_RESOURCE: "1"}}


def container(name: str, limits: dict | None = None, requests: dict | None = None, **extra) -> dict:
    c: dict = {"name": name, "image": "registry.example/app:1", **extra}
    resources = {k: v for k, v in (("limits", limits), ("requests", requests)) if v}
    if resources:
        c["resources"] = resources
    return c


def pod(*containers: dict, init: list[dict] | None = None, runtime_class: str | None = "kata-remote",
        annotations: dict | None = None, namespace: str = "apps") -> dict:
    meta: dict = {"name": "web", "namespace": namespace}
    if annotations is not None:
        meta["annotations"] = annotations
    spec: dict = {"containers": list(containers)}
    if runtime_class:
        spec["runtimeClassName"] = runtime_class
    if init:
        spec["initContainers"] = init
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def review(obj: dict, operation: str = "CREATE", namespace: str | None = None) -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace or obj["metadata"].get("namespace", "default"),
            "operation": operation, "object": obj, "userInfo": {"username": "tester"},
        },
    }


async def mutated(webhook, obj: dict, **kw) -> dict:
    """POST the review; check the answer's shape; return the pod with the patch applied."""
    request = review(obj, **kw)
    status, answer = await webhook.post(request)
    assert status == 200, answer
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == request["request"]["uid"] and response["allowed"] is True
    if "patch" not in response:
        return obj
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    result = jsonpatch.apply_patch(copy.deepcopy(obj), patch)
    kubernetes_validate.validate(result, "1.30", strict=True)
    return result


async def test_a_kata_remote_pod_gets_its_vm_size_and_a_vm_resource(webhook):
    obj = pod(container("a", limits={"cpu": "500m", "memory": "512Mi"}),
              container("b", limits={"cpu": "1.5", "memory": "1G"}))
    result = await mutated(webhook, obj)
    assert result["metadata"]["annotations"] == {ANN_VCPUS: "2", ANN_MEMORY: "1466"}, "ceil(0.5+1.5)=2 vCPU; 512 + ceil(953.7) MiB"
    assert result["spec"]["containers"][0]["resources"] == VM
    assert "resources" not in result["spec"]["containers"][1]


async def test_vcpus_round_up_to_whole_cpus(webhook):
    result = await mutated(webhook, pod(container("a", limits={"cpu": "1100m", "memory": "2Gi"})))
    assert result["metadata"]["annotations"] == {ANN_VCPUS: "2", ANN_MEMORY: "2048"}


async def test_pods_of_other_runtime_classes_are_left_alone(webhook):
    for runtime_class in ("kata", "runc", None):
        obj = pod(container("a", limits={"cpu": "1"}), runtime_class=runtime_class)
        assert await mutated(webhook, obj) == obj


async def test_requests_are_used_when_there_are_no_limits(webhook):
    obj = pod(container("a", requests={"cpu": "250m", "memory": "100Mi"}), container("b", requests={"cpu": "2", "memory": "1Gi"}))
    result = await mutated(webhook, obj)
    assert result["metadata"]["annotations"] == {ANN_VCPUS: "3", ANN_MEMORY: "1124"}
    assert [c.get("resources") for c in result["spec"]["containers"]] == [VM, None]


async def test_a_limit_wins_over_a_request_per_container(webhook):
    obj = pod(container("a", limits={"cpu": "3", "memory": "3Gi"}, requests={"cpu": "1", "memory": "1Gi"}))
    assert (await mutated(webhook, obj))["metadata"]["annotations"] == {ANN_VCPUS: "3", ANN_MEMORY: "3072"}


async def test_init_containers_count_by_the_largest_one_and_lose_their_resources(webhook):
    obj = pod(container("app", limits={"cpu": "1", "memory": "1Gi"}),
              init=[container("migrate", limits={"cpu": "4", "memory": "512Mi"}),
                    container("warm", requests={"cpu": "2", "memory": "3Gi"})])
    result = await mutated(webhook, obj)
    assert result["metadata"]["annotations"] == {ANN_VCPUS: "4", ANN_MEMORY: "3072"}, "max(app, largest init) per resource"
    assert all("resources" not in c for c in result["spec"]["initContainers"])
    assert result["spec"]["containers"][0]["resources"] == VM


async def test_sidecar_init_containers_add_to_the_app_containers(webhook):
    obj = pod(container("app", limits={"cpu": "1", "memory": "1Gi"}),
              init=[container("proxy", limits={"cpu": "1", "memory": "256Mi"}, restartPolicy="Always"),
                    container("setup", limits={"cpu": "1", "memory": "2Gi"})])
    result = await mutated(webhook, obj)
    # setup runs beside the proxy: 2 CPU, 2304 MiB; afterwards app + proxy: 2 CPU, 1280 MiB.
    assert result["metadata"]["annotations"] == {ANN_VCPUS: "2", ANN_MEMORY: "2304"}


async def test_annotations_already_set_are_kept(webhook):
    obj = pod(container("a", limits={"cpu": "2", "memory": "2Gi"}), annotations={ANN_VCPUS: "8", "team": "blue"})
    result = await mutated(webhook, obj)
    assert result["metadata"]["annotations"] == {ANN_VCPUS: "8", ANN_MEMORY: "2048", "team": "blue"}
    assert result["spec"]["containers"][0]["resources"] == VM, "resources are removed all the same"


async def test_a_pod_without_resources_gets_only_the_vm_resource(webhook):
    result = await mutated(webhook, pod(container("a"), container("b")))
    assert "annotations" not in result["metadata"]
    assert result["spec"]["containers"][0]["resources"] == VM


async def test_system_namespaces_are_left_alone(webhook):
    for namespace in ("kube-system", "openshift-monitoring", "openshift"):
        obj = pod(container("a", limits={"cpu": "1"}), namespace=namespace)
        assert await mutated(webhook, obj) == obj, namespace
    obj = pod(container("a", limits={"cpu": "1"}), namespace="openshiftish")
    assert await mutated(webhook, obj) != obj, "a pattern is not a prefix match"


async def test_only_pod_creation_is_mutated(webhook):
    obj = pod(container("a", limits={"cpu": "1"}))
    assert await mutated(webhook, obj, operation="UPDATE") == obj


async def test_an_unreadable_quantity_is_refused_with_its_field_named(webhook):
    status, answer = await webhook.post(review(pod(container("a", limits={"cpu": "lots"}))))
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is False and response["status"]["code"] == 400
    assert "limits.cpu" in response["status"]["message"] and "'a'" in response["status"]["message"]


@pytest.mark.parametrize("body", [
    b"not json", b"", b"[1, 2]", b"\xff\xfe",
    json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}}).encode(),
    json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
    json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 5}}).encode(),
    json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": "CREATE", "object": "pod"}}).encode(),
    json.dumps(review({"metadata": {"name": "p"}, "spec": {"runtimeClassName": "kata-remote", "containers": "nope"}})).encode(),
    json.dumps(review({"metadata": {"name": "p"}, "spec": {"runtimeClassName": "kata-remote", "containers": [1]}})).encode(),
], ids=["text", "empty", "list", "binary", "v1beta1", "no-request", "uid-not-string", "object-not-a-pod",
        "containers-not-a-list", "container-not-an-object"])
async def test_a_malformed_review_is_answered_400(webhook, body):
    status, answer = await webhook.post(None, raw=body)
    assert status == 400, answer
    assert answer["error"]
    healthy = await mutated(webhook, pod(container("a")))
    assert healthy["spec"]["containers"][0]["resources"] == VM, "the server keeps serving"


@pytest.mark.parametrize("depth", [100, 100_000], ids=["past-our-limit", "past-the-parsers-limit"])
@pytest.mark.parametrize("where", ["array", "pod-annotation"])
async def test_deeply_nested_json_is_answered_400_not_500(webhook, depth, where):
    nested = "[" * depth + "]" * depth
    if where == "array":
        body = nested.encode()
    else:
        text = json.dumps(review(pod(container("a"))))
        body = text.replace('"metadata": {', '"metadata": {"x": ' + nested + ", ", 1).encode()
    status, answer = await webhook.post(None, raw=body)
    assert status == 400, answer
    assert "nests deeper" in answer["error"]
    healthy = await mutated(webhook, pod(container("a")))
    assert healthy["spec"]["containers"][0]["resources"] == VM, "the server keeps serving"


async def test_a_real_pod_is_far_from_the_depth_limit():
    from cloudadaptor.webhook.server import MAX_DEPTH, too_deep

    deep_pod = review(pod(container("a")))
    assert not too_deep(deep_pod) and too_deep(deep_pod, limit=3)
    assert not too_deep([[[]]], limit=3) and too_deep([[[[]]]], limit=3) and MAX_DEPTH >= 32


async def test_an_oversized_body_is_refused(webhook):
    status, _ = await webhook.post(None, raw=b" " * (9 * 1024 * 1024))
    assert status == 413


async def test_plain_http_is_not_served(webhook):
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(webhook.url.replace("https", "http") + "/mutate-pods", data=b"{}") as response:
                await response.read()


async def test_a_configured_runtime_class_and_namespaces_are_honoured(start_webhook):
    client = await start_webhook(MutationOptions(runtime_class="kata-remote-cc", system_namespaces=("infra-*",)))
    obj = pod(container("a", limits={"cpu": "1"}), runtime_class="kata-remote-cc")
    assert (await mutated(client, obj))["metadata"]["annotations"] == {ANN_VCPUS: "1"}
    plain = pod(container("a", limits={"cpu": "1"}))
    assert await mutated(client, plain) == plain, "kata-remote is not the target any more"
    skipped = pod(container("a", limits={"cpu": "1"}), runtime_class="kata-remote-cc", namespace="infra-db")
    assert await mutated(client, skipped) == skipped
    kube_system = pod(container("a", limits={"cpu": "1"}), runtime_class="kata-remote-cc", namespace="kube-system")
    assert await mutated(client, kube_system) != kube_system, "the configured list replaces the default"


async def test_a_rotated_certificate_is_served_without_a_restart(webhook, tls):
    def served_subject() -> str:
        with socket.create_connection(("127.0.0.1", int(webhook.url.rsplit(":", 1)[1]))) as raw:
            with tls.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                cert = conn.getpeercert()
        return dict(item[0] for item in cert["subject"])["commonName"]

    assert await asyncio.to_thread(served_subject) == "peer-pods-webhook"
    tls.issue("peer-pods-webhook-rotated")
    os.utime(tls.cert_file, (1, 1))  # a different mtime even within the same second
    assert webhook.server.certificates.reload_if_changed()
    assert await asyncio.to_thread(served_subject) == "peer-pods-webhook-rotated"
    assert not webhook.server.certificates.reload_if_changed(), "unchanged files are not reloaded"


def test_a_broken_certificate_keeps_the_old_one(tls):
    reloader = CertificateReloader(tls.cert_file, tls.key_file)
    tls.cert_file.write_text("garbage")
    os.utime(tls.cert_file, (2, 2))
    assert reloader.reload_if_changed() is False
    assert isinstance(reloader.context, ssl.SSLContext)
