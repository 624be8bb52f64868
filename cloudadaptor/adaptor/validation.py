"""What the shim's requests carry, checked: sandbox ids, netns paths, annotations,
and what is derived from them (VM names, idempotency tokens, the instance spec).

Pure functions, no I/O beyond ``os.path.exists`` and ``os.stat``; a refusal is a
``LifecycleError`` with ``INVALID_ARGUMENT`` whose message says what was
expected, so the shim's user sees it.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Mapping

from cloudadaptor.adaptor.errors import LifecycleError
from cloudadaptor.adaptor.store import Sandbox
from cloudadaptor.providers import base as providers
from cloudadaptor.ttrpc.errors import Code
from cloudadaptor.vmlimit import VmLimit

# Annotations the kata shim sends with every CreateVM.
ANN_POD_NAME = "io.kubernetes.cri.sandbox-name"
ANN_POD_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
_HV = "io.katacontainers.config.hypervisor."
ANN_MACHINE_TYPE = _HV + "machine_type"
ANN_IMAGE = _HV + "image"
ANN_VCPUS = _HV + "default_vcpus"
ANN_MEMORY = _HV + "default_memory"
ANN_GPUS = _HV + "default_gpus"
ANN_INITDATA = _HV + "cc_init_data"

MAX_ID_LENGTH = 128
AGENT_SOCKET_NAME = "agent.ttrpc"
MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the NUL


# containerd's identifier rule (github.com/containerd/containerd/identifiers): a letter or digit first,
# then letters, digits, '_', '.', '-'. ASCII only (re.ASCII): a unicode digit is not a path-safe id.
_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*", re.ASCII)


def validate_sandbox_id(sandbox_id: str) -> None:
    """Refuse an id that is not a containerd identifier: it names a directory under PODS_DIR,
    so ``.``, ``..``, ``/``, NUL or a leading ``-`` must never get through (``.`` would make
    StopVM remove every pod's directory)."""
    problem = None
    if not sandbox_id:
        problem = "must not be empty"
    elif len(sandbox_id) > MAX_ID_LENGTH:
        problem = f"is {len(sandbox_id)} characters long, the limit is {MAX_ID_LENGTH}"
    elif sandbox_id in (".", "..") or "/" in sandbox_id:
        problem = "must not contain '/' or '..', nor be '.' (it names a directory under PODS_DIR)"
    elif not _SANDBOX_ID.fullmatch(sandbox_id):
        problem = "must start with a letter or digit and contain only letters, digits, '_', '.' and '-' (ASCII)"
    if problem:
        raise LifecycleError(Code.INVALID_ARGUMENT, f"sandbox id {sandbox_id[:MAX_ID_LENGTH]!r} {problem}")


def validate_netns_path(path: str) -> None:
    """Refuse a netns path that is empty, relative or missing (CNI has not run, or the shim is confused)."""
    if not path:
        raise LifecycleError(Code.INVALID_ARGUMENT, "networkNamespacePath is empty; expected the pod's network namespace (e.g. /run/netns/cni-...)")
    if "\x00" in path or not os.path.isabs(path):
        raise LifecycleError(Code.INVALID_ARGUMENT, f"networkNamespacePath {path!r} must be an absolute path")
    if not os.path.exists(path):
        raise LifecycleError(Code.INVALID_ARGUMENT, f"networkNamespacePath {path!r} does not exist")
    node_ns = _node_namespace_named(path)
    if node_ns:
        # StartVM would move the pod's interface into a VXLAN: on the node's own namespace that
        # takes the node's network away. Compared by identity, so any spelling or bind mount is caught.
        raise LifecycleError(
            Code.INVALID_ARGUMENT,
            f"networkNamespacePath {path!r} is {node_ns}, not a pod's own network namespace; "
            "expected the namespace CNI made for the pod (e.g. /run/netns/cni-...)",
        )


# The node's namespaces a pod must never be given: the adaptor's own and PID 1's.
_NODE_NAMESPACES = (("/proc/self/ns/net", "the adaptor's own network namespace"),
                    ("/proc/1/ns/net", "the network namespace of PID 1 (the node's)"))


def _node_namespace_named(path: str) -> str | None:
    """Which node namespace ``path`` is (same device and inode), or None.

    A namespace we may not stat (PID 1's in a container) cannot be compared and is skipped."""
    try:
        given = os.stat(path)
    except OSError:
        return None
    for node_path, description in _NODE_NAMESPACES:
        try:
            node = os.stat(node_path)
        except OSError:
            continue
        if (given.st_dev, given.st_ino) == (node.st_dev, node.st_ino):
            return description
    return None


_NAME_CHARS = re.compile(r"[^a-z0-9-]+")


def vm_name_for(pod_name: str, sandbox_id: str) -> str:
    """``podvm-<pod name sanitized>-<first 8 of sandbox id>``, at most 63 chars."""
    suffix = re.sub(r"[^a-z0-9]", "", sandbox_id.lower())[:8] or hashlib.sha256(sandbox_id.encode()).hexdigest()[:8]
    room = 63 - len("podvm-") - len(suffix) - 1
    pod = _NAME_CHARS.sub("-", pod_name.lower()).strip("-")[:room].strip("-")
    return f"podvm-{pod}-{suffix}" if pod else f"podvm-{suffix}"


def client_token_for(sandbox_id: str, cluster_id: str = "") -> str:
    """Stable idempotency token: a retried create of this sandbox adopts its VM —
    and only this cluster's (two clusters in one account never adopt each other's)."""
    return hashlib.sha256((f"{cluster_id}/{sandbox_id}" if cluster_id else sandbox_id).encode()).hexdigest()[:64]


def annotation_problems(annotations: Mapping[str, str]) -> list[str]:
    """One line per sizing annotation that is not a non-negative integer; empty when all are fine."""
    problems = []
    for key in (ANN_VCPUS, ANN_MEMORY, ANN_GPUS):
        value = annotations.get(key, "")
        if value and not (value.isdigit() and int(value) >= 0):
            problems.append(f"annotation {key}={value!r} is not a non-negative integer")
    return problems


def _int_annotation(annotations: Mapping[str, str], key: str) -> int | None:
    value = annotations.get(key, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def check_vm_limit(limit: VmLimit, node_name: str, busy: set[str]) -> None:
    """Refuse (RESOURCE_EXHAUSTED) one more pod VM when ``busy`` sandboxes already fill ``limit``.

    The limit is read now (None: no limit): a PeerPodConfig's change applies to the next StartVM."""
    value, source = limit.current(), limit.source
    if value is not None and len(busy) >= value:
        raise LifecycleError(
            Code.RESOURCE_EXHAUSTED,
            f"node {node_name} already runs {len(busy)} pod VMs ({source}={value})",
        )


def instance_spec(sandbox: Sandbox, node_name: str, extra_tags: Mapping[str, str]) -> providers.InstanceSpec:
    """What the provider is asked to create for ``sandbox``: its name, user data, idempotency token, tags and size."""
    ann = sandbox.annotations
    tags = {
        **extra_tags,
        providers.TAG_OWNER: providers.OWNER_VALUE,
        providers.TAG_NODE: node_name,
        providers.TAG_SANDBOX: sandbox.id,
        providers.TAG_POD: f"{sandbox.pod_namespace}/{sandbox.pod_name}",
    }
    return providers.InstanceSpec(
        name=sandbox.vm_name,
        sandbox_id=sandbox.id,
        user_data=sandbox.user_data,
        client_token=client_token_for(sandbox.id, tags.get(providers.TAG_CLUSTER, "")),
        tags=tags,
        image=ann.get(ANN_IMAGE) or None,
        instance_type=ann.get(ANN_MACHINE_TYPE) or None,
        vcpus=_int_annotation(ann, ANN_VCPUS),
        memory_mib=_int_annotation(ann, ANN_MEMORY),
        gpus=_int_annotation(ann, ANN_GPUS) or 0,
    )
