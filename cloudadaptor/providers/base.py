"""The provider interface: the only thing the sandbox lifecycle knows of a cloud.

A provider creates an instance from an ``InstanceSpec`` (user data included),
deletes by id (idempotent: deleting a gone instance is success) and lists the
instances carrying our ownership tags so orphans can be swept. It never sees a
network namespace, a socket or a Kubernetes object.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Mapping, Protocol, runtime_checkable

# Tag keys every provider puts on the instances it creates.
TAG_OWNER = "peerpods.io/owner"  # value: "cloud-api-adaptor"
TAG_NODE = "peerpods.io/node"
TAG_SANDBOX = "peerpods.io/sandbox-id"
TAG_POD = "peerpods.io/pod"  # "<namespace>/<name>"
OWNER_VALUE = "cloud-api-adaptor"


@dataclass(frozen=True)
class InstanceSpec:
    """What to create. ``client_token`` makes a retried create idempotent."""

    name: str
    sandbox_id: str
    user_data: str
    client_token: str
    tags: Mapping[str, str] = field(default_factory=dict)
    image: str | None = None
    instance_type: str | None = None
    vcpus: int | None = None
    memory_mib: int | None = None
    gpus: int = 0


@dataclass(frozen=True)
class Instance:
    id: str
    name: str
    ips: tuple[str, ...]  # private first; the agent proxy dials ips[0]
    tags: Mapping[str, str] = field(default_factory=dict)


class ProviderError(Exception):
    """A provider call failed; ``message`` is safe to show to the shim."""


@runtime_checkable
class Provider(Protocol):
    name: str

    async def verify(self) -> list[str]:
        """Check credentials and configured resources; one line per problem."""
        ...

    async def create_instance(self, spec: InstanceSpec) -> Instance:
        """Create (or adopt, for a repeated ``client_token``) and return it.

        Blocks until the instance has its private IP. If creation fails after
        the instance exists, the instance is deleted before raising.
        """
        ...

    async def delete_instance(self, instance_id: str) -> None:
        """Delete; an instance that is already gone is success."""
        ...

    async def list_owned(self, tags: Mapping[str, str]) -> list[Instance]:
        """Instances carrying every one of ``tags`` (for orphan sweeps)."""
        ...

    async def close(self) -> None: ...


# Provider name -> "module:Class". Modules (and their SDKs) are imported only
# when that provider is chosen.
REGISTRY: dict[str, str] = {
    "aws": "cloudadaptor.providers.aws.provider:AwsProvider",
    "azure": "cloudadaptor.providers.azure.provider:AzureProvider",
    "local": "cloudadaptor.providers.local:LocalProvider",
}


def provider_names() -> list[str]:
    return sorted(REGISTRY)


def load_provider_class(name: str) -> type:
    try:
        target = REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown cloud provider {name!r}; expected one of: {', '.join(provider_names())}"
        ) from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_provider(settings) -> Provider:
    """Build the provider ``settings.cloud_provider`` names from its own KEYS.

    Raises ``cloudadaptor.config.ConfigError`` listing every bad provider key.
    """
    from cloudadaptor.config import ConfigError, parse_keys

    cls = load_provider_class(settings.cloud_provider)
    values, problems = parse_keys(getattr(cls, "KEYS", ()), settings.provider_env)
    if problems:
        raise ConfigError(problems)
    return cls.from_config(values, settings)
