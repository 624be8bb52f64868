"""``ToyProvider``: a third-party provider built only on the public contract.

It declares its own key (``TOY_GREETING``, put on every VM as a tag) next to
the local cloud's, and delegates the VMs to the local provider: an IP that
really answers, with nothing to emulate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

from cloudadaptor.config import Settings
from cloudadaptor.providers.base import Instance, InstanceSpec, ProviderBase, ProviderError
from cloudadaptor.providers.config import option
from cloudadaptor.providers.local import LocalConfig, LocalProvider

GREETING_TAG = "toycloud/greeting"


def parse_greeting(text: str) -> str:
    if not text.isalnum():
        raise ValueError("expected letters and digits only")
    return text


@dataclass(frozen=True)
class ToyConfig(LocalConfig):
    greeting: str = option("TOY_GREETING", parse_greeting, "hello", help="tag value put on every toy VM")
    node: str = ""  # derived: from the common settings

    @classmethod
    def build(cls, settings: Settings, **options: object) -> ToyConfig:
        local = LocalConfig.build(settings, **{k: v for k, v in options.items() if k != "greeting"})
        return cls(**{**local.__dict__, "greeting": options["greeting"], "node": settings.node_name})


class ToyProvider(ProviderBase):
    name = "toy"
    config_type: ClassVar[type[ToyConfig]] = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        self.config = config
        self._local = LocalProvider(config)

    async def verify(self) -> list[str]:
        return await self._local.verify()

    async def create_instance(self, spec: InstanceSpec) -> Instance:
        tags = {**spec.tags, GREETING_TAG: self.config.greeting}
        try:
            return await self._local.create_instance(InstanceSpec(**{**spec.__dict__, "tags": tags}))
        except ProviderError as exc:
            raise ProviderError(f"toy: {exc}") from exc

    async def delete_instance(self, instance_id: str) -> None:
        await self._local.delete_instance(instance_id)

    async def list_owned(self, tags: Mapping[str, str]) -> list[Instance]:
        return await self._local.list_owned(tags)

    def network_hint(self) -> str | None:
        return self._local.network_hint()
