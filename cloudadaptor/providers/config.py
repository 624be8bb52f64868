"""How a provider declares its configuration: one typed dataclass, one field per key.

A provider's config is a frozen dataclass deriving from ``ProviderConfig``.
Each field an operator sets is declared with ``option(key, parse, default,
secret=..., help=...)``; the key's name, parser, default, secrecy and help
live on that one line, and ``config check``, ``serve``, ``image build``,
``open-ports`` and the controller all read them from there. Fields without an
``option`` are derived: ``build`` fills them from the common ``Settings``
(instance types, tags, DISABLECVM...), so a common key is never declared twice.

``ProviderConfig.load(settings)`` parses every option from
``settings.provider_env``, runs ``build`` and the cross-key ``problems``, and
raises ``ConfigError`` listing every problem at once (secrets masked).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Mapping, TypeVar

from cloudadaptor.config import ConfigError, Key, Problem, Settings, parse_keys

_KEY = "cloudadaptor.key"
C = TypeVar("C", bound="ProviderConfig")


def option(
    key: str,
    parse: Callable[[str], Any],
    default: Any = None,
    *,
    required: bool = False,
    secret: bool = False,
    help: str = "",
) -> Any:
    """A config field read from the environment key ``key``.

    ``parse(text)`` gets the stripped, non-empty text and returns the typed
    value or raises ``ValueError("what is expected")``. ``default`` is the typed
    value used when the key is unset or blank. A required option has no
    default, so it must come before the optional fields. Secrets are left out
    of the dataclass repr.
    """
    metadata = {_KEY: Key(key, parse, default, required=required, secret=secret, help=help)}
    if required:
        return dataclasses.field(metadata=metadata, repr=not secret)
    if isinstance(default, (dict, list, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, repr=not secret)
    return dataclasses.field(default=default, metadata=metadata, repr=not secret)


def _own(value: Any, key: Key) -> Any:
    """A mutable default copied, so configs never share it."""
    if value is key.default and isinstance(value, (dict, list, set)):
        return type(value)(value)
    return value


class ProviderConfig:
    """Base of every provider's typed configuration (subclasses are frozen dataclasses)."""

    @classmethod
    def options(cls) -> tuple[tuple[str, Key], ...]:
        """(field name, key) of every ``option`` field, in declaration order."""
        return tuple(
            (f.name, f.metadata[_KEY]) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if _KEY in f.metadata
        )

    @classmethod
    def keys(cls) -> tuple[Key, ...]:
        """The environment keys this provider reads (for ``config check`` and docs)."""
        return tuple(key for _, key in cls.options())

    @classmethod
    def parse(cls, env: Mapping[str, str], *, relaxed: Collection[str] = ()) -> tuple[dict[str, Any], list[Problem]]:
        """(option values by field name, problems). Keys in ``relaxed`` are not
        required (a command that does not need them); unset, they are ""."""
        options = cls.options()
        keys = [
            dataclasses.replace(key, required=False, default="") if key.name in relaxed else key
            for _, key in options
        ]
        values, problems = parse_keys(keys, env)
        return {name: _own(values[key.name], key) for name, key in options}, problems

    @classmethod
    def build(cls: type[C], settings: Settings, **options: Any) -> C:
        """The config from parsed option values and the common settings.

        Override to fill derived fields from ``settings``; the default uses the
        options alone. Runs even when some keys were bad (their defaults, or
        None for a missing required key, stand in), so that ``problems`` can
        be reported together with the parse problems: it must not raise."""
        return cls(**options)

    def problems(self) -> list[Problem]:
        """Problems between keys (e.g. a secret without its id); none by default."""
        return []

    @classmethod
    def load(cls: type[C], settings: Settings, *, relaxed: Collection[str] = ()) -> C:
        """Parse, build and cross-check from ``settings.provider_env``.

        Raises ``ConfigError`` with every problem of the provider's keys at once.
        """
        options, problems = cls.parse(settings.provider_env, relaxed=relaxed)
        config = cls.build(settings, **options)
        problems += config.problems()
        if problems:
            raise ConfigError(problems)
        return config
