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
from cloudadaptor.retry import Backoff

# A claimed pool VM has booted already: its agent answers within about a second of the claim,
# and until its forwarder listens a dial is refused at once. Polling it every 20-100 ms costs a
# few refused connections and no more than 0.1 s of latency (the default backoff, for a VM still
# booting, grows to 0.5 s and made a warm start wait up to that long after the agent was ready).
CLAIMED_READY_POLL = Backoff(initial=0.02, factor=1.5, maximum=0.1)


class PodConfigDelivery(Protocol):
    async def deliver(self, sandbox: Sandbox) -> providers.Instance:
        """The sandbox's VM, configured. Raises ``ProviderError`` when the cloud refuses.
        May record the VM in the sandbox row itself (a claimed pool VM is)."""
        ...


def readiness_poll(instance: providers.Instance) -> Backoff | None:
    """How to poll the agent of a delivered VM: tightly for a claimed pool VM (it carries
    ``TAG_POOL``), None (the proxy's default) for a VM that is still booting."""
    return CLAIMED_READY_POLL if providers.TAG_POOL in instance.tags else None


class BootDelivery:
    """Cold start: ``provider.create_instance`` with the pod's user data (idempotent by client token)."""

    def __init__(self, provider: providers.Provider, node_name: str, extra_tags: Mapping[str, str]) -> None:
        self.provider, self.node_name, self.extra_tags = provider, node_name, extra_tags

    async def deliver(self, sandbox: Sandbox) -> providers.Instance:
        return await self.provider.create_instance(instance_spec(sandbox, self.node_name, self.extra_tags))
