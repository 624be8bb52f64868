"""The worker's EC2 instance metadata (IMDSv2): where this node runs.

When AWS_REGION, AWS_SUBNET_ID, AWS_VPC_ID or AWS_SG_IDS are empty, the pod
VMs go where the worker is: same region, subnet, VPC and security groups.
IMDSv2 only (a session token from ``PUT /latest/api/token``); the endpoint
is ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` (botocore's own name for it), which
tests point at a local HTTP server. Blocking; call from a worker thread.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass

from cloudadaptor.providers.aws.config import AwsConfig

log = logging.getLogger(__name__)

TOKEN_PATH = "/latest/api/token"
META = "/latest/meta-data/"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL = "300"


class ImdsError(Exception):
    """The metadata service did not answer as expected; the message says what failed."""


@dataclass(frozen=True)
class WorkerPlacement:
    region: str
    subnet_id: str
    vpc_id: str
    security_group_ids: tuple[str, ...]


class ImdsClient:
    """Reads a few metadata paths with an IMDSv2 session token."""

    def __init__(self, endpoint: str, timeout: float = 2.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout

    def _open(self, request: urllib.request.Request) -> str:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read().decode("utf-8").strip()
        except urllib.error.HTTPError as exc:
            raise ImdsError(f"{request.get_method()} {request.full_url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ImdsError(f"{request.get_method()} {request.full_url}: {reason}") from None

    def token(self) -> str:
        request = urllib.request.Request(
            self.endpoint + TOKEN_PATH, method="PUT", headers={TOKEN_TTL_HEADER: TOKEN_TTL}
        )
        return self._open(request)

    def get(self, path: str, token: str) -> str:
        request = urllib.request.Request(self.endpoint + META + path, headers={TOKEN_HEADER: token})
        return self._open(request)

    def placement(self) -> WorkerPlacement:
        """Region, subnet, VPC and security groups of the worker's primary interface."""
        token = self.token()
        mac = self.get("mac", token)
        nic = f"network/interfaces/macs/{mac}/"
        return WorkerPlacement(
            region=self.get("placement/region", token),
            subnet_id=self.get(nic + "subnet-id", token),
            vpc_id=self.get(nic + "vpc-id", token),
            security_group_ids=tuple(self.get(nic + "security-group-ids", token).split()),
        )


def needs_discovery(config: AwsConfig) -> bool:
    """Whether a key the provider needs is empty (IMDS is asked only then)."""
    if config.region is None:
        return True
    if config.use_launch_template:
        return False  # the template carries subnet and security groups
    return config.subnet_id is None or not config.security_group_ids


def fill_from_imds(config: AwsConfig, client: ImdsClient) -> tuple[AwsConfig, list[str]]:
    """``config`` with empty region/subnet/VPC/SGs taken from the worker's metadata
    (only the region when a launch template supplies the network).

    Returns (config, problems): a problem only for a key that is still needed
    and could not be discovered (region always; subnet unless a launch
    template is used). Empty security groups are left empty (EC2 then uses
    the VPC's default group) when the metadata service cannot be reached.
    """
    if not needs_discovery(config):
        return config, []
    try:
        found = client.placement()
    except ImdsError as exc:
        log.warning("instance metadata unavailable: %s", exc)
        problems = []
        why = f"is not set and the worker's instance metadata ({client.endpoint}) did not answer: {exc}"
        if config.region is None:
            problems.append(f"AWS_REGION {why}")
        if config.subnet_id is None and not config.use_launch_template:
            problems.append(f"AWS_SUBNET_ID {why}")
        return config, problems
    if config.use_launch_template:  # the template carries subnet and security groups
        filled = dataclasses.replace(config, region=config.region or found.region)
        log.info("from instance metadata: region %s", filled.region)
        return filled, []
    filled = dataclasses.replace(
        config,
        region=config.region or found.region,
        subnet_id=config.subnet_id or found.subnet_id,
        # The worker's VPC only describes the worker's subnet.
        vpc_id=config.vpc_id or (found.vpc_id if config.subnet_id is None else None),
        security_group_ids=config.security_group_ids or found.security_group_ids,
    )
    log.info(
        "from instance metadata: region %s, subnet %s, VPC %s, security groups %s",
        filled.region, filled.subnet_id, filled.vpc_id, ",".join(filled.security_group_ids) or "-",
    )
    return filled, []
