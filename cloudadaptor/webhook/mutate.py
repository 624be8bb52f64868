"""The peer-pod mutation: a pod's CPU and memory become its VM's size.

For a pod whose ``spec.runtimeClassName`` is the target runtime class
(``TARGET_RUNTIME_CLASS``, default ``kata-remote``), outside the system
namespaces, on CREATE:

- The pod's CPU and memory — per container its limit, else its request —
  are summed into ``io.katacontainers.config.hypervisor.default_vcpus``
  (rounded up to whole vCPUs) and ``.default_memory`` (MiB, rounded up), each
  only when the pod does not set it already and only when non-zero. Init
  containers follow Kubernetes' effective-request rule: the VM must fit the
  largest init container (plus the sidecars started before it) and the app
  containers plus all sidecars (``restartPolicy: Always`` init containers),
  whichever is larger. Pod-level ``spec.resources``, when set, is the total.
- Every resource spec is removed (containers, init containers, pod level):
  the pod runs in its own VM and must not consume the worker's CPU/memory.
- The first container gets ``kata.peerpods.io/vm: 1`` as limit and request,
  so the scheduler honours each node's pod VM limit.

The result is a JSON patch (RFC 6902). ``admission_response`` wraps it in an
AdmissionReview v1 response; a review that is not one raises ``BadReview``.
"""

from __future__ import annotations

import base64
import fnmatch
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from cloudadaptor.webhook.quantity import QuantityError, mebibytes, parse_quantity, whole_cpus

ANN_VCPUS = "io.katacontainers.config.hypervisor.default_vcpus"
ANN_MEMORY = "io.katacontainers.config.hypervisor.default_memory"
VM_RESOURCE = "kata.peerpods.io/vm"
DEFAULT_RUNTIME_CLASS = "kata-remote"
DEFAULT_SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease", "openshift", "openshift-*")
REVIEW_API_VERSION = "admission.k8s.io/v1"

JSON = dict[str, Any]


class BadReview(ValueError):
    """The request is not an AdmissionReview v1 we can answer (HTTP 400)."""


@dataclass(frozen=True)
class MutationOptions:
    runtime_class: str = DEFAULT_RUNTIME_CLASS
    system_namespaces: tuple[str, ...] = DEFAULT_SYSTEM_NAMESPACES  # fnmatch patterns

    def is_system(self, namespace: str) -> bool:
        return any(fnmatch.fnmatchcase(namespace, pattern) for pattern in self.system_namespaces)


def _escape(key: str) -> str:
    """A JSON pointer token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _amount(resources: Any, name: str, where: str) -> Decimal:
    """The limit, else the request, of ``name`` in a ``resources`` block; 0 when neither."""
    if not isinstance(resources, dict):
        return Decimal(0)
    for section in ("limits", "requests"):
        values = resources.get(section)
        if isinstance(values, dict) and values.get(name) is not None:
            try:
                return parse_quantity(values[name])
            except QuantityError as exc:
                raise QuantityError(f"{where}: {section}.{name}: {exc}") from None
    return Decimal(0)


def _containers(spec: JSON, field: str) -> list[JSON]:
    value = spec.get(field)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise BadReview(f"spec.{field} must be a list of containers")
    return value


def pod_total(spec: JSON, name: str) -> Decimal:
    """What the pod needs of resource ``name`` (cpu in cores, memory in bytes)."""
    pod_level = _amount(spec.get("resources"), name, "spec.resources")
    if pod_level:
        return pod_level
    app = sum((_amount(c.get("resources"), name, f"container {c.get('name')!r}") for c in _containers(spec, "containers")),
              Decimal(0))
    sidecars = Decimal(0)
    init_peak = Decimal(0)
    for c in _containers(spec, "initContainers"):
        amount = _amount(c.get("resources"), name, f"init container {c.get('name')!r}")
        if c.get("restartPolicy") == "Always":  # a sidecar: runs from here to the end
            sidecars += amount
            init_peak = max(init_peak, sidecars)
        else:
            init_peak = max(init_peak, sidecars + amount)
    return max(app + sidecars, init_peak)


def _annotation_ops(metadata: Any, wanted: dict[str, str]) -> list[JSON]:
    if not isinstance(metadata, dict):
        return [{"op": "add", "path": "/metadata", "value": {"annotations": wanted}}] if wanted else []
    annotations = metadata.get("annotations")
    if not isinstance(annotations, dict):
        return [{"op": "add", "path": "/metadata/annotations", "value": wanted}] if wanted else []
    return [{"op": "add", "path": f"/metadata/annotations/{_escape(k)}", "value": v} for k, v in wanted.items()]


def pod_patch(pod: JSON, options: MutationOptions) -> list[JSON]:
    """The JSON patch for one pod (empty when it is not a peer pod). Raises ``QuantityError``, ``BadReview``."""
    spec = pod.get("spec")
    if not isinstance(spec, dict) or spec.get("runtimeClassName") != options.runtime_class:
        return []
    containers = _containers(spec, "containers")
    init_containers = _containers(spec, "initContainers")
    metadata = pod.get("metadata")
    existing = metadata.get("annotations") if isinstance(metadata, dict) else None
    existing = existing if isinstance(existing, dict) else {}
    wanted: dict[str, str] = {}
    vcpus = whole_cpus(pod_total(spec, "cpu"))
    memory = mebibytes(pod_total(spec, "memory"))
    if vcpus and not existing.get(ANN_VCPUS):
        wanted[ANN_VCPUS] = str(vcpus)
    if memory and not existing.get(ANN_MEMORY):
        wanted[ANN_MEMORY] = str(memory)
    ops = _annotation_ops(metadata, wanted)
    if "resources" in spec:
        ops.append({"op": "remove", "path": "/spec/resources"})
    for i, container in enumerate(init_containers):
        if "resources" in container:
            ops.append({"op": "remove", "path": f"/spec/initContainers/{i}/resources"})
    for i, container in enumerate(containers):
        if i == 0:
            vm = {VM_RESOURCE: "1"}
            ops.append({"op": "add", "path": "/spec/containers/0/resources", "value": {"limits": dict(vm), "requests": dict(vm)}})
        elif "resources" in container:
            ops.append({"op": "remove", "path": f"/spec/containers/{i}/resources"})
    return ops


def _request_of(review: Any) -> JSON:
    if not isinstance(review, dict):
        raise BadReview("expected a JSON object (an AdmissionReview)")
    if review.get("kind") != "AdmissionReview" or review.get("apiVersion") != REVIEW_API_VERSION:
        raise BadReview(f"expected kind AdmissionReview, apiVersion {REVIEW_API_VERSION}; got "
                        f"{review.get('kind')!r}, {review.get('apiVersion')!r}")
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReview("expected request with a uid")
    return request


def admission_response(review: Any, options: MutationOptions) -> JSON:
    """The AdmissionReview v1 answer to ``review``. Raises ``BadReview`` when it is malformed.

    Pods are always allowed; a peer pod gets a JSONPatch. A pod whose
    quantities cannot be read is refused with a message naming the field.
    """
    request = _request_of(review)
    response: JSON = {"uid": request["uid"], "allowed": True}
    answer = {"apiVersion": REVIEW_API_VERSION, "kind": "AdmissionReview", "response": response}
    kind = request.get("kind")
    resource = request.get("resource")
    is_pod = (isinstance(kind, dict) and kind.get("kind") == "Pod" and kind.get("group", "") == "") or (
        isinstance(resource, dict) and resource.get("resource") == "pods" and resource.get("group", "") == "")
    if not is_pod or request.get("operation") != "CREATE" or request.get("subResource"):
        return answer
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise BadReview("expected request.object to be the Pod")
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
    namespace = request.get("namespace") or metadata.get("namespace") or ""
    if not isinstance(namespace, str):
        raise BadReview("request.namespace must be a string")
    if options.is_system(namespace):
        return answer
    try:
        patch = pod_patch(pod, options)
    except QuantityError as exc:
        response.update(allowed=False, status={"code": 400, "reason": "BadRequest", "message": f"peer pod: {exc}"})
        return answer
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return answer
