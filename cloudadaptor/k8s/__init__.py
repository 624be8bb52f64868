"""Kubernetes integration: API client setup, PeerPod objects, node capacity, the PeerPod controller.

Layering: the adaptor (lifecycle, daemon) depends on this package through the
``SandboxObserver`` protocol of ``cloudadaptor.adaptor.hooks``; this package
depends on providers (the controller deletes VMs), config and ttrpc (probe),
never on the adaptor. The Kubernetes client library is ``kubernetes_asyncio``.
"""
