"""Typed settings from the environment (peer-pods-cm / peer-pods-secret), validated once.

Operators configure the adaptor through environment variables (docs/ARCHITECTURE.md, Configuration);
command-line flags may override them (``overrides=``). Everything is parsed
here into a frozen ``Settings`` and handed to constructors; nothing else reads
``os.environ``.

Bad configuration is refused with *every* problem at once, one line each,
naming the key, the bad value (``<hidden>`` for secrets) and what is expected.
A secret's value never appears in a message, a repr or ``config check``.

Providers declare their own keys as ``option`` fields of a typed config
(``cloudadaptor.providers.config``), parsed from ``Settings.provider_env``;
``cloudadaptor.providers.base.load_provider`` loads both at once.
"""

from __future__ import annotations

import dataclasses
import json
import socket as _socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from cloudadaptor import initdata, wire
from cloudadaptor.initdata import InitData

from cloudadaptor.parsers import (  # noqa: F401  (re-exported: providers import parsers from here)
    DURATION_EXPECTED, SHIM_STARTVM_DEADLINE, TLS_VERSIONS, format_duration, int_range, one_of, parse_abs_path, parse_bool,
    parse_csv, parse_duration, parse_host_port, parse_ip, parse_port, parse_positive_duration, parse_proxy_timeout,
    parse_readable_file, parse_cluster_id, parse_tags, parse_tls_version,
)

HIDDEN = "<hidden>"
UNSET = "<unset>"
LOG_LEVELS = ("debug", "info", "warning", "error")


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Key:
    """One configuration key.

    ``parse(text)`` turns the (stripped, non-empty) text into a value or raises
    ``ValueError("what is expected")``. ``default`` is the *typed* value used
    when the key is unset or empty; it is not parsed.
    """

    name: str
    parse: Callable[[str], Any]
    default: Any = None
    required: bool = False
    secret: bool = False
    help: str = ""
    show: Callable[[str], str] | None = None  # what config check prints for a set secret (default <hidden>)


@dataclass(frozen=True)
class Problem:
    """One bad setting. ``value`` is None when the key is unset; masked for secrets."""

    key: str
    value: str | None
    expected: str
    secret: bool = False

    def __post_init__(self) -> None:
        if self.secret and self.value is not None:
            object.__setattr__(self, "value", HIDDEN)

    def __str__(self) -> str:
        expected = " ".join(self.expected.split())  # always one line
        if self.value is None:
            return f"{self.key} is not set: {expected}"
        shown = f'"{HIDDEN}"' if self.secret else json.dumps(self.value, ensure_ascii=False)
        return f"{self.key}={shown}: {expected}"


class ConfigError(Exception):
    """Configuration refused; ``problems`` lists every problem found, str() is one line each."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def _text(env: Mapping[str, str], name: str) -> str | None:
    """The stripped value, or None when unset or blank (ConfigMaps carry empty keys)."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    return raw.strip()


def parse_keys(keys: Iterable[Key], env: Mapping[str, str]) -> tuple[dict[str, Any], list[Problem]]:
    """Parse ``keys`` from ``env``; returns (values by key name, problems).

    Unset or blank keys take their default; a required key that is unset is a
    problem. Every key is tried, so all problems come back together.
    """
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for key in keys:
        if key.name in COMMON_SECRET_KEYS and not key.secret:
            key = dataclasses.replace(key, secret=True)
        text = _text(env, key.name)
        if text is None:
            if key.required:
                expected = f"required: {key.help}" if key.help else "required"
                problems.append(Problem(key.name, None, expected, key.secret))
            values[key.name] = key.default
            continue
        try:
            values[key.name] = key.parse(text)
        except ValueError as exc:
            expected = str(exc) or "invalid value"
            if key.secret and text in expected:  # a parser echoed the secret
                expected = f"invalid value (expected {key.help or 'a valid value'})"
            problems.append(Problem(key.name, text, expected, key.secret))
            values[key.name] = key.default
    return values, problems


def _parse_provider(text: str) -> str:
    from cloudadaptor.providers import base

    names = base.provider_names()
    if text not in names:
        raise ValueError("expected one of: " + ", ".join(names))
    return text


# ------------------------------------------------------------------------ settings

# Secrets named here are masked everywhere even if no provider declares them.
COMMON_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_CLIENT_SECRET")


@dataclass(frozen=True)
class Settings:
    """Common settings plus the adaptor's own paths and endpoints. Every field has a default (tests build one with
    what they need). ``provider_env``, the raw environment providers parse, is out of repr and comparison (secrets)."""

    cloud_provider: str = "local"
    vxlan_port: int = wire.VXLAN_PORT
    vxlan_min_id: int = wire.VXLAN_MIN_ID
    vxlan_worker_ip: str | None = None  # None: detected (route towards the VM network)
    proxy_timeout: float = 300.0
    podvm_instance_type: str | None = None
    podvm_instance_types: tuple[str, ...] = ()
    podvm_images: tuple[str, ...] = ()  # allow-list of the image annotation; () allows any
    cluster_id: str | None = None  # None: derived (daemon.resolve_cluster_id)
    disable_cvm: bool | None = None  # None: not set (distinct from explicitly false)
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)
    use_public_ip: bool = False
    root_volume_size: int = 0  # GiB; 0 = the image's default
    peerpods_limit_per_node: int = 10
    podvm_pool_size: int = 0  # config_pool: the warm pool
    podvm_pool_max_age: float = 86400.0
    podvm_pool_refill_concurrency: int = 2
    cacert_file: Path | None = None
    cert_file: Path | None = None
    cert_key: Path | None = None
    tls_skip_verify: bool = False
    disable_tls: bool = False
    tls_min_version: str = "1.2"
    socket: Path = Path("/run/peerpod/hypervisor.sock")
    pods_dir: Path = Path("/run/peerpod/pods")
    state_dir: Path = Path("/run/peerpod")
    grpc_endpoint: str | None = None  # host:port or unix:/path (config_security)
    grpc_tls_cert: Path | None = None
    grpc_tls_key: Path | None = None
    grpc_tls_client_ca: Path | None = None
    ttrpc_max_connections: int = 512
    ttrpc_max_requests: int = 64
    getinfo_wait_timeout: float = 600.0
    vm_cert_validity: float = 30 * 86400.0
    ca_validity: float = 365 * 86400.0
    node_name: str = field(default_factory=_socket.gethostname)
    log_level: str = "info"
    initdata: InitData | None = field(default=None, repr=False)  # INITDATA, decoded and checked
    log_format: str = "text"
    probe_address: str = "127.0.0.1"
    probe_port: int = 8000
    provider_env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @property
    def operator_tls(self) -> bool:
        """True when the operator supplied CACERT_FILE, CERT_FILE and CERT_KEY."""
        return None not in (self.cacert_file, self.cert_file, self.cert_key)

    @property
    def log_file(self) -> Path:
        """``STATE_DIR/adaptor.log``: the last log lines, written by ``serve`` (rotated, 0600), read by ``diagnose``."""
        return self.state_dir / "adaptor.log"


# Settings field = key name in lower case, except these.
_FIELD_NAMES = {"DISABLECVM": "disable_cvm"}


def common_keys() -> tuple[Key, ...]:
    """The common keys (built per call: the provider list and hostname are looked up now)."""
    from cloudadaptor import config_pool, config_security
    from cloudadaptor.providers import base

    providers = ", ".join(base.provider_names())
    return (
        Key("CLOUD_PROVIDER", _parse_provider, required=True,
            help=f"the cloud pod VMs run in; one of: {providers}"),
        Key("VXLAN_PORT", parse_port, wire.VXLAN_PORT, help="UDP port of the VXLAN tunnels"),
        Key("VXLAN_MIN_ID", int_range(1, wire.MAX_VNI), wire.VXLAN_MIN_ID, help="first VXLAN network id (VNI)"),
        Key("VXLAN_WORKER_IP", parse_ip, None,
            help="worker address pod VMs send VXLAN to (default: source of the route towards the VM network)"),
        Key("PROXY_TIMEOUT", parse_proxy_timeout, 300.0,
            help="how long StartVM waits for the pod VM's agent (below the shim's 600 s)"),
        Key("PODVM_INSTANCE_TYPE", str, help="default pod VM instance type"),
        Key("PODVM_INSTANCE_TYPES", parse_csv, (), help="allowed instance types (comma list)"),
        Key("PODVM_IMAGES", parse_csv, (), help="images the pod image annotation may pick (comma list; unset: any)"),
        Key("CLUSTER_ID", parse_cluster_id, help="this cluster's tag on every pod VM (default: kube-system namespace uid)"),
        Key("DISABLECVM", parse_bool, None, help="create ordinary VMs instead of confidential VMs"),
        Key("TAGS", parse_tags, {}, help="extra tags on pod VMs: k=v,k2=v2"),
        Key("USE_PUBLIC_IP", parse_bool, False, help="dial pod VMs on their public IP"),
        Key("ROOT_VOLUME_SIZE", int_range(0, None), 0, help="root disk GiB (0: image default)"),
        Key("PEERPODS_LIMIT_PER_NODE", int_range(0, None), 10, help="pod VMs per node"),
        *config_pool.pool_keys(),  # PODVM_POOL_SIZE, _MAX_AGE, _REFILL_CONCURRENCY
        Key("CACERT_FILE", parse_readable_file, help="CA the pod VMs trust for client certs"),
        Key("CERT_FILE", parse_readable_file, help="the adaptor's client certificate"),
        Key("CERT_KEY", parse_readable_file, help="the adaptor's client key"),
        Key("TLS_SKIP_VERIFY", parse_bool, False, help="do not verify pod VM certificates"),
        Key("DISABLE_TLS", parse_bool, False, help="plain TCP to pod VMs (development only)"),
        Key("TLS_MIN_VERSION", parse_tls_version, "1.2", help="1.2 or 1.3"),
        Key("SOCKET", parse_abs_path, Path("/run/peerpod/hypervisor.sock"),
            help="the hypervisor ttrpc socket the shim dials"),
        Key("PODS_DIR", parse_abs_path, Path("/run/peerpod/pods"),
            help="per-pod directories (agent.ttrpc sockets)"),
        Key("STATE_DIR", parse_abs_path, Path("/run/peerpod"), help="state store and TLS material"),
        *config_security.security_keys(),  # GRPC_ENDPOINT, GRPC_TLS_*, caps, certificate lifetimes
        Key("NODE_NAME", str, _socket.gethostname(), help="this worker node's name"),
        Key("LOG_LEVEL", one_of(*LOG_LEVELS, aliases={"warn": "warning"}), "info", help=", ".join(LOG_LEVELS)),
        Key("LOG_FORMAT", one_of("text", "json"), "text", help="text, or json: one object per line with sandbox/pod/instance"),
        Key("PROBE_ADDRESS", parse_ip, "127.0.0.1", help="address of /metrics, /healthz, /startup (the DaemonSet: pod IP)"),
        Key("PROBE_PORT", parse_port, 8000, help="TCP port of /metrics, /healthz, /startup"),
        Key("INITDATA", initdata.parse_setting, None, secret=True, show=initdata.summary,
            help="default initdata for every pod: base64 of gzip or plain TOML (the pod annotation overrides)"),
        *(Key(name, str, secret=True, help="credential (provider)") for name in COMMON_SECRET_KEYS),
    )


def _cross_checks(values: Mapping[str, Any], env: Mapping[str, str]) -> list[Problem]:
    from cloudadaptor import config_pool, config_security  # they import this module: loaded late
    problems = config_security.security_problems(values, env) + config_pool.pool_problems(values)
    allowed = values["PODVM_INSTANCE_TYPES"]
    chosen = values["PODVM_INSTANCE_TYPE"]
    if chosen and allowed and chosen not in allowed:
        problems.append(Problem(
            "PODVM_INSTANCE_TYPE", chosen,
            "expected one of PODVM_INSTANCE_TYPES: " + ", ".join(allowed)))
    tls_keys = ("CACERT_FILE", "CERT_FILE", "CERT_KEY")
    given = [k for k in tls_keys if _text(env, k) is not None]
    if given and len(given) < len(tls_keys):
        for k in tls_keys:
            if k not in given:
                problems.append(Problem(
                    k, None, "CACERT_FILE, CERT_FILE and CERT_KEY are set together or not at all"))
    return problems


def merge_overrides(env: Mapping[str, str], overrides: Mapping[str, str | None] | None) -> dict[str, str]:
    """``env`` with flag values on top (None values are flags not given)."""
    merged = dict(env)
    for name, value in (overrides or {}).items():
        if value is not None:
            merged[name] = str(value)
    return merged


def _load(env: Mapping[str, str]) -> tuple[Settings | None, list[Problem]]:
    values, problems = parse_keys(common_keys(), env)
    problems += _cross_checks(values, env)
    if problems:
        return None, problems
    kwargs = {
        _FIELD_NAMES.get(key, key.lower()): value
        for key, value in values.items()
        if key not in COMMON_SECRET_KEYS
    }
    return Settings(**kwargs, provider_env=dict(env)), []


def load_settings(env: Mapping[str, str], *, overrides: Mapping[str, str | None] | None = None) -> Settings:
    """Parse and validate the common settings; raises ``ConfigError`` listing every problem."""
    settings, problems = _load(merge_overrides(env, overrides))
    if problems:
        raise ConfigError(problems)
    assert settings is not None
    return settings


# ------------------------------------------------------------------- config check


def _provider_keys(env: Mapping[str, str]) -> tuple[tuple[Key, ...], list[Problem]]:
    """The chosen provider's keys (empty when CLOUD_PROVIDER is bad)."""
    from cloudadaptor.providers import base

    name = _text(env, "CLOUD_PROVIDER")
    if name is None or name not in base.provider_names():
        return (), []
    try:
        cls = base.load_provider_class(name)
    except ConfigError as exc:  # its SDK is not installed
        return (), exc.problems
    except (ImportError, AttributeError) as exc:
        return (), [Problem("CLOUD_PROVIDER", name, f"provider could not be loaded ({exc})")]
    return cls.config_type.keys(), []


def _display(key: Key, value: Any) -> str:
    if value is None or value == () or value == {}:
        return UNSET
    if key.secret:
        return HIDDEN
    if isinstance(value, bool):
        return "true" if value else "false"
    if key.parse in (parse_duration, parse_proxy_timeout, parse_positive_duration):
        return format_duration(value)
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _all_keys(env: Mapping[str, str]) -> tuple[list[Key], list[Key], list[Problem]]:
    """(common keys, provider keys, load problems); a key declared secret by
    either side is secret on both, and a key both declare is listed once."""
    declared, problems = _provider_keys(env)
    secret_names = set(COMMON_SECRET_KEYS) | {k.name for k in declared if k.secret}
    common = [dataclasses.replace(k, secret=k.secret or k.name in secret_names) for k in common_keys()]
    common_names = {k.name for k in common}
    provider = [
        dataclasses.replace(k, secret=k.secret or k.name in secret_names)
        for k in declared if k.name not in common_names
    ]
    return common, provider, problems


def effective_settings(
    env: Mapping[str, str], *, overrides: Mapping[str, str | None] | None = None
) -> list[tuple[str, str, str]]:
    """Rows of (key, value shown, source) for ``config check``; secrets are never shown.

    Source is "flag", "env" or "default". Values shown are the text given, or the
    default when unset; secrets show ``<hidden>`` (set) or ``<unset>``.
    """
    return check(env, overrides=overrides)[0]


def _cross_key_problems(settings: Settings) -> list[Problem]:
    """What the provider's config refuses between its keys (what ``serve`` would refuse)."""
    from cloudadaptor.providers import base

    try:
        base.load_provider_config(settings.cloud_provider, settings)
    except ConfigError as exc:
        return exc.problems
    return []


def check(
    env: Mapping[str, str], *, overrides: Mapping[str, str | None] | None = None
) -> tuple[list[tuple[str, str, str]], list[Problem]]:
    """(rows as in ``effective_settings``, every problem of the common and provider keys)."""
    merged_env = merge_overrides(env, overrides)
    flagged = {k for k, v in (overrides or {}).items() if v is not None}
    common, provider, problems = _all_keys(merged_env)
    settings, common_problems = _load(merged_env)
    declared = _provider_keys(merged_env)[0]  # with their own parsers, shared keys included
    _, provider_problems = parse_keys(declared, merged_env)
    if settings is not None and declared:
        provider_problems += _cross_key_problems(settings)
    rows = []
    for key in [*common, *provider]:
        text = _text(merged_env, key.name)
        if text is None:
            rows.append((key.name, _display(key, key.default), "default"))
            continue
        shown = (key.show(text) if key.show else HIDDEN) if key.secret else text
        rows.append((key.name, shown, "flag" if key.name in flagged else "env"))
    unique: dict[str, Problem] = {}
    for problem in [*common_problems, *problems, *provider_problems]:
        unique.setdefault(str(problem), problem)
    return rows, list(unique.values())
