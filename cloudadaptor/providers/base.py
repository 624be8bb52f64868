"""The provider interface: the only thing the sandbox lifecycle knows of a cloud.

A provider creates an instance from an ``InstanceSpec`` (user data included),
deletes by id (idempotent: deleting a gone instance is success) and lists the
instances carrying our ownership tags so orphans can be swept. It never sees a
network namespace, a socket or a Kubernetes object.

Providers are plugins: entry points of the group ``cloudadaptor.providers``
(the built-in ones too), imported only when chosen. ``load_provider`` is the
one configuration loader (common ``Settings`` plus the provider's typed
config); the contract for plugin authors is docs/PROVIDERS.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, distributions
from typing import TYPE_CHECKING, ClassVar, Mapping, Protocol, cast, runtime_checkable

if TYPE_CHECKING:
    from cloudadaptor.config import Problem, Settings
    from cloudadaptor.providers.config import ProviderConfig
    from cloudadaptor.providers.telemetry import CloudCallRecorder

log = logging.getLogger(__name__)

# The entry-point group providers register in (built-in ones included):
#   [project.entry-points."cloudadaptor.providers"]
#   name = "package.module:ProviderClass"
ENTRY_POINT_GROUP = "cloudadaptor.providers"

# Tag keys every provider puts on the instances it creates.
TAG_OWNER = "peerpods.io/owner"  # value: "cloud-api-adaptor"
TAG_NODE = "peerpods.io/node"
TAG_SANDBOX = "peerpods.io/sandbox-id"
TAG_POD = "peerpods.io/pod"  # "<namespace>/<name>"
# The cluster identity (CLUSTER_ID, else derived): every list-to-delete requires
# it, so clusters sharing an account never delete each other's VMs.
TAG_CLUSTER = "peerpods.io/cluster"
TAG_POOL = "peerpods.io/pool"  # a warm-pool VM of this node: its pool name (no sandbox until claimed)
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
    instance_type: str = ""  # the cloud's size name ("" when unknown), for events and logs
    # Seconds from the create call until the cloud accepted the instance (StartVM's create_instance
    # phase; the rest, until it ran, is instance_running). None: the provider does not tell them apart.
    launched_in: float | None = field(default=None, compare=False)


class ConsoleUnavailable(Exception):
    """The VM's console cannot be read; the message says why (not supported, turned off, refused)."""


class ProviderError(Exception):
    """A provider call failed; ``message`` is safe to show to the shim.

    Every failure of a provider call is a ``ProviderError`` (SDK errors are
    wrapped, the original chained as ``__cause__``); its text names no secret.
    """


class ForeignInstance(ProviderError):
    """The id names an instance outside what this provider's config manages
    (e.g. another Azure resource group): it is neither read nor deleted."""


def not_ours(instance: Instance, cluster_id: str) -> str | None:
    """Why ``instance`` is not this cluster's pod VM, or None when it is (the
    owner tag and this cluster's tag both present): checked before any delete
    of an instance named from outside (a PeerPod)."""
    owner = instance.tags.get(TAG_OWNER)
    if owner != OWNER_VALUE:
        return f"its tag {TAG_OWNER} is {owner!r}, not {OWNER_VALUE!r}"
    cluster = instance.tags.get(TAG_CLUSTER)
    if cluster != cluster_id:
        return f"its tag {TAG_CLUSTER} is {cluster!r}, not this cluster's {cluster_id!r}"
    return None


@runtime_checkable
class Provider(Protocol):
    """What the lifecycle, the controller and the daemon use of a provider."""

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

    async def describe_instance(self, instance_id: str) -> Instance | None:
        """The instance with its tags, or None when it does not exist (or is
        being deleted). Raises ``ForeignInstance`` for an id outside what the
        config manages; read before deleting an instance named from outside."""
        ...

    async def close(self) -> None: ...

    def network_hint(self) -> str | None:
        """An address inside the VM network, without I/O (None: not known), so the
        worker's VXLAN address can be the source of its route there."""
        ...

    def user_data_limit(self) -> int | None:
        """The most user data bytes this cloud accepts (None: no limit), so CreateVM can
        refuse or trim what does not fit before any VM exists."""
        ...

    def report_cloud_calls(self, recorder: CloudCallRecorder) -> None:
        """From now on report every cloud API call (operation, outcome, SDK retries,
        throttles) to ``recorder``, from the SDK's own hooks (the daemon's metrics)."""
        ...

    async def console_output(self, instance_id: str) -> str:
        """The VM's serial console so far (the cloud may lag by minutes), for diagnosing a VM
        that never answered. Raises ``ConsoleUnavailable`` saying why when it cannot be read."""
        ...


class ProviderClass(Protocol):
    """What an entry point of ``cloudadaptor.providers`` loads: a provider class
    with its config type, constructed from a loaded config."""

    config_type: type[ProviderConfig]

    def __call__(self, config: ProviderConfig) -> Provider: ...


class ProviderBase:
    """Optional base class of a provider: the defaults of the protocol's optional parts.

    Subclasses set ``name`` and ``config_type`` and take their config as the
    one constructor argument.
    """

    name: ClassVar[str]
    config_type: ClassVar[type[ProviderConfig]]

    def network_hint(self) -> str | None:
        """No hint: the worker address follows the default route."""
        return None

    def user_data_limit(self) -> int | None:
        """No limit of its own."""
        return None

    def report_cloud_calls(self, recorder: CloudCallRecorder) -> None:
        """No cloud API to report on."""

    async def close(self) -> None:
        """Nothing to release."""

    async def console_output(self, instance_id: str) -> str:
        """Not supported unless the provider overrides it."""
        raise ConsoleUnavailable(f"the {self.name} provider cannot read VM consoles")
    async def describe_instance(self, instance_id: str) -> Instance | None:
        """Found among ``list_owned({})`` (one listing; a provider with a direct
        read should override this)."""
        listed = await cast(Provider, self).list_owned({})
        return next((instance for instance in listed if instance.id == instance_id), None)


def installed_providers() -> dict[str, EntryPoint]:
    """Provider name -> its entry point, from every installed distribution.

    Nothing is imported: a provider's module (and its SDK) is loaded only when
    it is chosen. When two distributions claim a name, the first one wins.
    """
    found: dict[str, EntryPoint] = {}
    # Every distribution, not ``entry_points()``: that keeps one distribution per
    # name, and a stale ``*.egg-info`` of a source checkout on sys.path would hide
    # the installed one's providers.
    points = [p for dist in distributions() for p in dist.entry_points if p.group == ENTRY_POINT_GROUP]
    for point in points:
        if point.name in found and found[point.name].value != point.value:
            log.warning("provider %r: %s ignored, %s registered it first", point.name, point.value,
                        found[point.name].value)
            continue
        found.setdefault(point.name, point)
    return found


def provider_names() -> list[str]:
    """The installed providers' names, sorted."""
    return sorted(installed_providers())


def load_provider_class(name: str) -> ProviderClass:
    """Import the provider ``name`` (ValueError listing the installed ones when unknown;
    ``ConfigError`` naming the extra to install when its SDK is missing)."""
    providers = installed_providers()
    try:
        point = providers[name]
    except KeyError:
        raise ValueError(
            f"unknown cloud provider {name!r}; expected one of: {', '.join(sorted(providers))}"
        ) from None
    try:
        return cast(ProviderClass, point.load())
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if not missing or point.module == missing or point.module.startswith(missing + "."):
            raise  # the provider itself is broken, not one of its libraries
        # An image carries only some SDKs (package extras named after the built-in providers).
        from cloudadaptor.config import ConfigError, Problem

        hint = f"pip install 'cloudadaptor[{name}]'" if point.module.startswith("cloudadaptor.") else "install its dependencies"
        raise ConfigError([Problem("CLOUD_PROVIDER", name, (
            f"a provider whose libraries are installed; {missing} is missing ({hint})"))]) from None


def load_provider_config(name: str, settings: Settings, *, relaxed: tuple[str, ...] = ()) -> ProviderConfig:
    """The typed config of provider ``name`` from ``settings.provider_env``.

    Raises ``ConfigError`` listing every bad provider key; ``relaxed`` keys are
    not required (for commands that do not use them)."""
    return load_provider_class(name).config_type.load(settings, relaxed=relaxed)


def load_provider(
    env: Mapping[str, str],
    *,
    overrides: Mapping[str, str | None] | None = None,
    provider: str | None = None,
    relaxed: tuple[str, ...] = (),
) -> tuple[Settings, ProviderConfig]:
    """The one loader: common settings and the chosen provider's typed config.

    ``provider`` forces CLOUD_PROVIDER (commands that belong to one cloud);
    ``overrides`` are command-line flags on top of ``env``. Raises
    ``ConfigError`` with every problem of the common and the provider keys.
    """
    from cloudadaptor.config import ConfigError, Settings, load_settings, merge_overrides

    merged = merge_overrides(env, overrides)
    if provider is not None:
        merged["CLOUD_PROVIDER"] = provider
    try:
        settings = load_settings(merged)
    except ConfigError as exc:
        # Check the provider's keys too (against default common settings), so
        # one run shows every problem.
        name = merged.get("CLOUD_PROVIDER", "").strip()
        extra: list[Problem] = []
        if name in installed_providers():
            try:
                load_provider_config(name, Settings(cloud_provider=name, provider_env=merged), relaxed=relaxed)
            except ConfigError as provider_exc:
                extra = provider_exc.problems
        raise ConfigError([*exc.problems, *extra]) from None
    return settings, load_provider_config(settings.cloud_provider, settings, relaxed=relaxed)


def create_provider(settings: Settings, config: ProviderConfig | None = None) -> Provider:
    """The provider ``settings.cloud_provider`` names, from ``config`` (as
    ``load_provider`` returned it) or else loaded from ``settings.provider_env``.
    Makes no cloud call (``verify`` does).

    Raises ``cloudadaptor.config.ConfigError`` listing every bad provider key.
    """
    cls = load_provider_class(settings.cloud_provider)
    return cls(config if config is not None else cls.config_type.load(settings))
