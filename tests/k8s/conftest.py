"""Fixtures for the Kubernetes tests: the local API endpoint, a client on it, a fake cloud."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import AsyncIterator, Mapping

import pytest

from cloudadaptor.providers.base import (
    OWNER_VALUE, TAG_CLUSTER, TAG_NODE, TAG_OWNER, TAG_POD, TAG_SANDBOX, Instance, InstanceSpec, ProviderError,
)
from fakes.kubeapi import NODES, PODS, KubeApiServer

_ids = itertools.count(1)
CLUSTER = "cluster-blue"  # the cluster id the tests' controller runs with


@dataclass
class FakeCloud:
    """An in-memory provider: instances by id; deletes are idempotent and recorded."""

    name: str = "aws"
    instances: dict[str, Instance] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    fail_deletes: int = 0

    async def verify(self) -> list[str]:
        return []

    async def create_instance(self, spec: InstanceSpec) -> Instance:
        instance = Instance(id=f"i-{next(_ids):08x}", name=spec.name, ips=("192.0.2.10",), tags=dict(spec.tags))
        self.instances[instance.id] = instance
        return instance

    def add(self, *, pod: str = "default/web", node: str = "worker-1", sandbox: str = "sb", **extra: str) -> Instance:
        tags = {TAG_OWNER: OWNER_VALUE, TAG_CLUSTER: CLUSTER, TAG_NODE: node, TAG_SANDBOX: sandbox, TAG_POD: pod, **extra}
        instance = Instance(id=f"i-{next(_ids):08x}", name=f"podvm-{sandbox}", ips=("192.0.2.11",), tags=tags)
        self.instances[instance.id] = instance
        return instance

    async def delete_instance(self, instance_id: str) -> None:
        if self.fail_deletes:
            self.fail_deletes -= 1
            raise ProviderError("cloud says: throttled")
        self.instances.pop(instance_id, None)
        self.deleted.append(instance_id)

    async def list_owned(self, tags: Mapping[str, str]) -> list[Instance]:
        return [i for i in self.instances.values() if all(i.tags.get(k) == v for k, v in tags.items())]

    async def describe_instance(self, instance_id: str) -> Instance | None:
        return self.instances.get(instance_id)

    async def close(self) -> None:
        pass


@pytest.fixture
def cloud() -> FakeCloud:
    return FakeCloud()


@pytest.fixture
async def kubeapi() -> AsyncIterator[KubeApiServer]:
    async with KubeApiServer() as server:
        yield server


@pytest.fixture
async def api(kubeapi: KubeApiServer):
    from kubernetes_asyncio import client

    api_client = client.ApiClient(kubeapi.configuration())
    yield api_client
    await api_client.close()


def pod_object(name: str, namespace: str = "default", node: str = "worker-1", phase: str = "Running") -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node, "runtimeClassName": "kata-remote", "containers": [{"name": "app", "image": "busybox"}]},
        "status": {"phase": phase},
    }


def node_object(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"capacity": {"cpu": "4", "memory": "16Gi", "pods": "110"},
                       "allocatable": {"cpu": "4", "memory": "16Gi", "pods": "110"}}}


@pytest.fixture
def add_pod(kubeapi: KubeApiServer):
    """``add_pod("web", namespace="default", node="worker-1", phase="Running")`` -> the stored Pod."""
    def add(name: str, namespace: str = "default", node: str = "worker-1", phase: str = "Running") -> dict:
        return kubeapi.seed(PODS, pod_object(name, namespace, node, phase))
    return add


@pytest.fixture
def add_node(kubeapi: KubeApiServer):
    def add(name: str) -> dict:
        return kubeapi.seed(NODES, node_object(name))
    return add
