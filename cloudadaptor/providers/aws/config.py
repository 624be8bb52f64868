"""AWS keys (peer-pods-cm / peer-pods-secret) and the typed ``AwsConfig``.

The key names are the ones operators already use (docs/ARCHITECTURE.md, Configuration). Common keys
(PODVM_INSTANCE_TYPE(S), DISABLECVM, TAGS, USE_PUBLIC_IP, ROOT_VOLUME_SIZE)
come from ``Settings``; the AWS ones are declared on ``AwsConfig``. boto3's own variables
(``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_EC2``, ``AWS_DEFAULT_REGION``,
profiles, web identity) are read by boto3 itself and never overridden.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from cloudadaptor.config import Problem, Settings, int_range, parse_bool, parse_csv
from cloudadaptor.providers.config import ProviderConfig, option

DEFAULT_INSTANCE_TYPE = "t3.medium"
DEFAULT_LAUNCH_TEMPLATE = "kata"
DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
RETRY_MODES = ("standard", "adaptive")
DEFAULT_MAX_ATTEMPTS = 8
MODEL_CACHE_SUBDIR = "aws-models"

_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")


def _resource_id(prefix: str, what: str) -> Any:
    pattern = re.compile(rf"{prefix}-[0-9a-f]{{8,17}}")

    def parse(text: str) -> str:
        text = text.strip()
        if not pattern.fullmatch(text):
            raise ValueError(f"expected {what} id like {prefix}-0123456789abcdef0")
        return text

    return parse


parse_ami_id = _resource_id("ami", "an AMI")
parse_subnet_id = _resource_id("subnet", "a subnet")
parse_vpc_id = _resource_id("vpc", "a VPC")
parse_sg_id = _resource_id("sg", "a security group")


def parse_region(text: str) -> str:
    text = text.strip()
    if not _REGION.fullmatch(text):
        raise ValueError("expected an AWS region like us-east-1 or eu-central-1")
    return text


def parse_sg_ids(text: str) -> tuple[str, ...]:
    """Comma list of security group ids; the first bad one is named."""
    ids = parse_csv(text)
    for item in ids:
        try:
            parse_sg_id(item)
        except ValueError:
            raise ValueError(f"expected security group ids like sg-0123456789abcdef0 separated by commas; bad item {item!r}") from None
    return ids


def parse_http_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http:// URL such as http://169.254.169.254")
    return text.strip().rstrip("/")


def parse_retry_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode == "legacy":
        raise ValueError("legacy retries do not back off on throttling; expected standard or adaptive")
    if mode not in RETRY_MODES:
        raise ValueError("expected standard or adaptive")
    return mode


@dataclass(frozen=True)
class Credentials:
    """Static keys from peer-pods-secret; all None means boto3's default chain
    (web identity / IRSA, instance profile, shared files). Never shown."""

    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return "Credentials(<hidden>)" if self.access_key_id else "Credentials(<default chain>)"

    def values(self) -> tuple[str, ...]:
        """The secret strings, for scrubbing them out of messages."""
        return tuple(v for v in (self.access_key_id, self.secret_access_key, self.session_token) if v)


@dataclass(frozen=True)
class AwsConfig(ProviderConfig):
    """Everything the AWS provider needs, parsed once. ``None`` region, subnet,
    VPC or empty SGs are discovered from the worker's IMDSv2 at start."""

    region: str | None = option("AWS_REGION", parse_region, help="region of the pod VMs (default: the worker's, from IMDS)")
    subnet_id: str | None = option("AWS_SUBNET_ID", parse_subnet_id, help="subnet of the pod VMs (default: the worker's)")
    vpc_id: str | None = option("AWS_VPC_ID", parse_vpc_id, help="VPC of the subnet (checked at start; default: the worker's)")
    security_group_ids: tuple[str, ...] = option(
        "AWS_SG_IDS", parse_sg_ids, (), help="security groups of the pod VMs, comma list (default: the worker's)")
    image_id: str | None = option(
        "PODVM_AMI_ID", parse_ami_id, help="the pod VM image (AMI); the image annotation may override it")
    key_name: str | None = option("SSH_KP_NAME", str, help="EC2 key pair for the pod VMs (optional, debugging)")
    use_launch_template: bool = option(
        "USE_PODVM_LAUNCHTEMPLATE", parse_bool, False, help="launch pod VMs from an EC2 launch template")
    launch_template_name: str = option(
        "PODVM_LAUNCHTEMPLATE_NAME", str, DEFAULT_LAUNCH_TEMPLATE, help="that launch template's name")
    access_key_id: str | None = option(
        "AWS_ACCESS_KEY_ID", str, secret=True, help="access key (unset: boto3's default credential chain)")
    secret_access_key: str | None = option("AWS_SECRET_ACCESS_KEY", str, secret=True, help="secret key")
    session_token: str | None = option(
        "AWS_SESSION_TOKEN", str, secret=True, help="session token of temporary credentials")
    imds_endpoint: str = option(
        "AWS_EC2_METADATA_SERVICE_ENDPOINT", parse_http_url, DEFAULT_IMDS_ENDPOINT,
        help="the instance metadata service used to discover region, subnet and SGs")
    retry_mode: str = option("AWS_RETRY_MODE", parse_retry_mode, "standard", help="botocore retry mode: standard or adaptive")
    max_attempts: int = option("AWS_MAX_ATTEMPTS", int_range(1, 20), DEFAULT_MAX_ATTEMPTS,
                               help="attempts per EC2 call on throttling and 5xx")
    # Common settings, as the provider uses them (``build`` copies them from ``Settings``).
    instance_type: str | None = DEFAULT_INSTANCE_TYPE  # None: the launch template's
    instance_types: tuple[str, ...] = ()
    images: tuple[str, ...] = ()  # PODVM_IMAGES: what the image annotation may pick
    disable_cvm: bool | None = None  # only an explicit False asks for SEV-SNP
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)
    use_public_ip: bool = False
    root_volume_size: int = 0
    # How long a create waits for "running" (boto3 waiter: delay, bound).
    boot_poll_interval: float = 5.0
    boot_timeout: float = 180.0
    # The daemon's cache of slim EC2 model data (``slimmodel``): <STATE_DIR>/aws-models.
    model_cache_dir: Path | None = None

    @classmethod
    def build(cls, settings: Settings, **options: Any) -> AwsConfig:
        """The options plus the common settings; an unset PODVM_INSTANCE_TYPE means
        t3.medium, or the launch template's type when one is used."""
        template = bool(options.get("use_launch_template"))
        return cls(
            **options,
            instance_type=settings.podvm_instance_type or (None if template else DEFAULT_INSTANCE_TYPE),
            instance_types=tuple(settings.podvm_instance_types),
            images=tuple(settings.podvm_images),
            disable_cvm=settings.disable_cvm,
            tags=dict(settings.tags),
            use_public_ip=settings.use_public_ip,
            root_volume_size=settings.root_volume_size,
            model_cache_dir=Path(settings.state_dir) / MODEL_CACHE_SUBDIR,
        )

    def problems(self) -> list[Problem]:
        """Static keys come in pairs."""
        if bool(self.access_key_id) == bool(self.secret_access_key):
            return []
        missing = "AWS_SECRET_ACCESS_KEY" if self.access_key_id else "AWS_ACCESS_KEY_ID"
        return [Problem(missing, None, "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are set together or not at all",
                        secret=True)]

    @property
    def credentials(self) -> Credentials:
        """The static keys (all None: boto3's default chain)."""
        return Credentials(self.access_key_id, self.secret_access_key, self.session_token)

    @property
    def wants_sev_snp(self) -> bool:
        return self.disable_cvm is False

    def instance_type_keys(self) -> dict[str, str]:
        """Each configured instance type -> the key that names it."""
        named = {name: "PODVM_INSTANCE_TYPES" for name in self.instance_types}
        if self.instance_type:
            named.setdefault(self.instance_type, "PODVM_INSTANCE_TYPE")
        return named

