"""Kubernetes integration: API client setup, PeerPod objects, node capacity, the PeerPod controller.

Layering: the adaptor (lifecycle, daemon) depends on this package through the
``SandboxObserver`` protocol of ``cloudadaptor.adaptor.hooks``; this package
depends on providers (the controller deletes VMs), config and ttrpc (probe),
never on the adaptor. The Kubernetes client library is ``kubernetes_asyncio``.
"""

from collections.abc import Mapping


def cluster_configured(env: Mapping[str, str]) -> bool:
    """True when ``env`` names a cluster (``KUBECONFIG`` or ``KUBERNETES_SERVICE_HOST``).

    Lives here, away from ``k8s.client``, so a daemon outside a cluster never
    imports the Kubernetes client (about 40 MiB of resident memory).
    """
    return bool((env.get("KUBECONFIG") or "").strip() or (env.get("KUBERNETES_SERVICE_HOST") or "").strip())
