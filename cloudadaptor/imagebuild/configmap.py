"""``--update-configmap``: put the image id into ``peer-pods-cm`` through the Kubernetes API.

One JSON merge patch of ``data.<key>`` (``PODVM_AMI_ID`` on AWS,
``AZURE_IMAGE_ID`` on Azure): it touches no other key and needs only
``patch`` on that one ConfigMap (the image Jobs' Role grants exactly that).
The client comes from ``cloudadaptor.k8s.client.connect`` (``KUBECONFIG``,
else the in-cluster service account). The adaptor reads the ConfigMap at
start: restart the DaemonSet to use the new image.
"""

from __future__ import annotations

import asyncio
from typing import Mapping

from kubernetes_asyncio import client as k8s

from cloudadaptor.imagebuild.common import BuildError
from cloudadaptor.k8s.client import API_ERRORS, KubeConfigError, connect, describe

CONFIGMAP = "peer-pods-cm"
DEFAULT_NAMESPACE = "openshift-sandboxed-containers-operator"
MERGE_PATCH = "application/merge-patch+json"


def default_namespace(env: Mapping[str, str]) -> str:
    """``POD_NAMESPACE`` (the Job's own, from the downward API), else the OpenShift sandboxed containers namespace."""
    return (env.get("POD_NAMESPACE") or "").strip() or DEFAULT_NAMESPACE


async def _patch(env: Mapping[str, str], namespace: str, name: str, key: str, value: str) -> None:
    try:
        api = await connect(env)
    except KubeConfigError as exc:
        raise BuildError(f"cannot update {namespace}/{name}: {exc}") from None
    if api is None:
        raise BuildError(f"cannot update {namespace}/{name}: no Kubernetes configuration "
                         "(set KUBECONFIG, or run in a pod with a service account)")
    try:
        await k8s.CoreV1Api(api).patch_namespaced_config_map(
            name, namespace, {"data": {key: value}}, _content_type=MERGE_PATCH)
    except API_ERRORS as exc:  # one line; anything else is a bug and keeps its traceback
        raise BuildError(f"updating {key} in ConfigMap {namespace}/{name}: {describe(exc)}") from None
    finally:
        await api.close()


def update(env: Mapping[str, str], namespace: str, key: str, value: str, name: str = CONFIGMAP) -> None:
    """Set ``data[key] = value`` in ConfigMap ``namespace/name``; BuildError saying why not. Blocking."""
    asyncio.run(_patch(env, namespace, name, key, value))
