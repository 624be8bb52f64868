"""Deliver pod config: how a sandbox's user data reaches its VM.

``PodConfigDelivery.deliver(sandbox)`` returns the sandbox's VM (an
``Instance``) once it holds the pod's configuration (``sandbox.user_data``):

- ``BootDelivery`` (cold): a new VM gets it as user data at boot;
- ``pool.WarmPool`` (warm): a pre-booted pool VM gets the same text as a
  claim over mutual TLS, and falls back to ``BootDelivery`` when it cannot.

In the VM both end in ``process_user_data.receive``, so everything after the
delivery (pod network, agent, forwarder) is the same code on both paths.
"""

from __future__ import annotations

from typing import Mapping, Protocol

from cloudadaptor.adaptor.store import Sandbox
from cloudadaptor.adaptor.validation import instance_spec
from cloudadaptor.providers import base as providers


class PodConfigDelivery(Protocol):
    async def deliver(self, sandbox: Sandbox) -> providers.Instance:
        """The sandbox's VM, configured. Raises ``ProviderError`` when the cloud refuses.
        May record the VM in the sandbox row itself (a claimed pool VM is)."""
        ...


class BootDelivery:
    """Cold start: ``provider.create_instance`` with the pod's user data (idempotent by client token)."""

    def __init__(self, provider: providers.Provider, node_name: str, extra_tags: Mapping[str, str]) -> None:
        self.provider, self.node_name, self.extra_tags = provider, node_name, extra_tags

    async def deliver(self, sandbox: Sandbox) -> providers.Instance:
        return await self.provider.create_instance(instance_spec(sandbox, self.node_name, self.extra_tags))
