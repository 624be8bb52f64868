"""The lifecycle tests' fake provider and fake pod network (tests/adaptor; used by their
conftest's fixtures and imported by tests that build their own, e.g. the pool crash campaign).

Checked by mypy (tests/test_lint.py): they must keep satisfying the protocols they stand in for.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Collection, Mapping

from cloudadaptor.podconfig import PodInterface, PodRoute
from cloudadaptor.podnetwork.api import PodNetwork, TunnelSpec
from cloudadaptor.providers.base import ConsoleUnavailable, Instance, InstanceSpec, Provider, ProviderError

POD_INTERFACE = PodInterface(
    name="eth0", mac="02:00:00:00:00:0a", mtu=1500, addresses=("198.51.100.10/24",),
    routes=(PodRoute("0.0.0.0/0", gateway="198.51.100.1"),),
)


@dataclass
class FakeProvider:
    """Records calls; every instance answers on 127.0.0.1 (the fake agent)."""

    name: str = "fake"
    instances: dict[str, Instance] = field(default_factory=dict)
    by_token: dict[str, str] = field(default_factory=dict)
    created: list[InstanceSpec] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    fail_create: str | None = None
    limit: int | None = None  # user_data_limit(): None as the local provider, a number as a cloud
    consoles: dict[str, str] = field(default_factory=dict)  # instance id -> its console text
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def verify(self) -> list[str]:
        return []

    async def create_instance(self, spec: InstanceSpec) -> Instance:
        if self.fail_create:
            raise ProviderError(self.fail_create)
        if spec.client_token in self.by_token:
            return self.instances[self.by_token[spec.client_token]]
        instance = Instance(f"i-fake-{next(self._ids)}", spec.name, ("127.0.0.1",), dict(spec.tags))
        self.instances[instance.id] = instance
        self.by_token[spec.client_token] = instance.id
        self.created.append(spec)
        return instance

    async def delete_instance(self, instance_id: str) -> None:
        self.deleted.append(instance_id)
        self.instances.pop(instance_id, None)

    async def list_owned(self, tags: Mapping[str, str]) -> list[Instance]:
        return [i for i in self.instances.values() if all(i.tags.get(k) == v for k, v in tags.items())]

    async def describe_instance(self, instance_id: str) -> Instance | None:
        return self.instances.get(instance_id)

    async def close(self) -> None:
        pass

    def network_hint(self) -> str | None:
        return None

    def report_cloud_calls(self, recorder: object) -> None:
        pass

    def user_data_limit(self) -> int | None:
        return self.limit
    async def console_output(self, instance_id: str) -> str:
        if instance_id not in self.consoles:
            raise ConsoleUnavailable(f"fake VM {instance_id} has no console")
        return self.consoles[instance_id]


# Checked by mypy (tests/test_lint.py): the fakes must keep satisfying the protocols they stand in for.
_FAKE_IS_A_PROVIDER: type[Provider] = FakeProvider


@dataclass
class FakePodNetwork:
    """Records tunnel calls; ``up`` holds the tunnels currently up (by VNI).

    ``fail`` maps a method name to the exception it raises (once set, always).
    """

    worker: str = "192.0.2.1"
    hints: list[str | None] = field(default_factory=list)
    up: dict[int, TunnelSpec] = field(default_factory=dict)
    calls: list[tuple[str, int]] = field(default_factory=list)
    fail: dict[str, Exception] = field(default_factory=dict)
    swept: list[frozenset[int]] = field(default_factory=list)

    def _maybe_fail(self, method: str) -> None:
        if method in self.fail:
            raise self.fail[method]

    async def inspect(self, netns_path: str) -> PodInterface:
        self._maybe_fail("inspect")
        return POD_INTERFACE

    async def worker_ip(self, vm_network_hint: str | None) -> str:
        self._maybe_fail("worker_ip")
        self.hints.append(vm_network_hint)
        return self.worker

    async def tunnel_up(self, tunnel: TunnelSpec) -> None:
        self.calls.append(("up", tunnel.vni))
        self._maybe_fail("tunnel_up")
        self.up[tunnel.vni] = tunnel

    async def tunnel_down(self, tunnel: TunnelSpec) -> None:
        self.calls.append(("down", tunnel.vni))
        self._maybe_fail("tunnel_down")
        self.up.pop(tunnel.vni, None)

    async def sweep(self, known_vnis: Collection[int]) -> list[str]:
        self.swept.append(frozenset(known_vnis))
        return []


_FAKE_IS_A_POD_NETWORK: type[PodNetwork] = FakePodNetwork


