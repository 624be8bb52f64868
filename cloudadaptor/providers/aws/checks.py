"""Start-up checks of the AWS configuration against EC2 (``verify``).

Each problem is one line naming the key, its value (never a secret's) and
what is expected. Blocking calls; the credentials are checked first and, if
EC2 refuses them, nothing else is tried (every later call would fail the
same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from cloudadaptor.providers.aws import catalog as cat
from cloudadaptor.providers.aws import network
from cloudadaptor.providers.aws.client import describe, error_code, is_auth_error
from cloudadaptor.providers.aws.config import AwsConfig

SEV_SNP_EXAMPLES = "m6a.large, c6a.large, r6a.large"


@dataclass(frozen=True)
class CheckResult:
    problems: list[str]
    image: cat.ImageInfo | None = None
    catalog: cat.TypeCatalog = field(default_factory=cat.TypeCatalog)
    subnet_cidr: str | None = None


def check_credentials(ec2: Any, config: AwsConfig, secrets: tuple[str, ...]) -> list[str]:
    """EC2 accepts the credentials in the region (DescribeAvailabilityZones)."""
    try:
        ec2.describe_availability_zones()
    except EndpointConnectionError as exc:
        return [f'AWS_REGION="{config.region}": the EC2 endpoint cannot be reached: {describe(exc, secrets)}']
    except (ClientError, BotoCoreError) as exc:
        if is_auth_error(exc):
            return [f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN: EC2 refused the credentials "
                    f"in {config.region}: {describe(exc, secrets)}"]
        raise
    return []


def check_image(ec2: Any, config: AwsConfig) -> tuple[cat.ImageInfo | None, list[str]]:
    """PODVM_AMI_ID exists and is available (required unless a launch template is used)."""
    if not config.image_id:
        if config.use_launch_template:
            return None, []
        return None, ["PODVM_AMI_ID is not set: expected the pod VM image (AMI) id, e.g. the peer-pod-ami "
                      "made by the aws-image-creation job"]
    info = cat.describe_image(ec2, config.image_id)
    if info is None:
        return None, [f'PODVM_AMI_ID="{config.image_id}": no such image in region {config.region} '
                      "(or it is not shared with this account)"]
    problems = []
    if info.state != "available":
        problems.append(f'PODVM_AMI_ID="{config.image_id}": image {info.name!r} is {info.state}, expected available')
    if config.wants_sev_snp and info.boot_mode and info.boot_mode not in cat.SEV_SNP_BOOT_MODES:
        problems.append(f'DISABLECVM="false": AMD SEV-SNP needs an AMI that boots uefi or uefi-preferred; '
                        f"PODVM_AMI_ID {config.image_id} boots {info.boot_mode}")
    return info, problems


def check_instance_types(ec2: Any, config: AwsConfig) -> tuple[cat.TypeCatalog, list[str]]:
    """The configured types exist; with DISABLECVM=false each supports AMD SEV-SNP."""
    named = config.instance_type_keys()
    catalog, unknown = cat.describe_types(ec2, named)
    problems = [f'{named[name]}: instance type "{name}" does not exist in region {config.region}' for name in unknown]
    if config.wants_sev_snp:
        for name, key in named.items():
            if name in catalog.types and name not in catalog.sev_snp:
                problems.append(
                    f'DISABLECVM="false": instance type "{name}" ({key}) does not support AMD SEV-SNP; '
                    f"choose one that does (e.g. {SEV_SNP_EXAMPLES}) or set DISABLECVM=true"
                )
    return catalog, problems


def check_network(ec2: Any, config: AwsConfig) -> tuple[str | None, list[str]]:
    """(the subnet's IPv4 CIDR, problems): the subnet and security groups
    exist, in AWS_VPC_ID and in one VPC."""
    problems = []
    vpc = config.vpc_id
    cidr = None
    if config.subnet_id:
        subnet = network.describe_subnet(ec2, config.subnet_id)
        cidr = subnet.get("CidrBlock") if subnet else None
        if subnet is None:
            problems.append(f'AWS_SUBNET_ID="{config.subnet_id}": no such subnet in region {config.region}')
        else:
            vpc = subnet.get("VpcId")  # what the groups must match: the VMs' VPC
            if config.vpc_id and vpc != config.vpc_id:
                problems.append(f'AWS_VPC_ID="{config.vpc_id}": subnet {config.subnet_id} is in {vpc}, '
                                "expected the subnet's VPC")
    elif config.vpc_id:
        try:
            ec2.describe_vpcs(VpcIds=[config.vpc_id])
        except ClientError as exc:
            if error_code(exc) not in ("InvalidVpcID.NotFound", "InvalidVpcID.Malformed"):
                raise
            problems.append(f'AWS_VPC_ID="{config.vpc_id}": no such VPC in region {config.region}')
    groups, missing = network.describe_groups(ec2, config.security_group_ids)
    for group_id in missing:
        problems.append(f'AWS_SG_IDS: security group "{group_id}" does not exist in region {config.region}')
    for group_id, group in groups.items():
        if vpc and group.get("VpcId") and group["VpcId"] != vpc:
            problems.append(f'AWS_SG_IDS: security group "{group_id}" is in {group["VpcId"]}, '
                            f"expected the pod VMs' VPC {vpc}")
    return cidr, problems


def check_key_pair(ec2: Any, config: AwsConfig) -> list[str]:
    if not config.key_name:
        return []
    try:
        ec2.describe_key_pairs(KeyNames=[config.key_name])
    except ClientError as exc:
        if error_code(exc) != "InvalidKeyPair.NotFound":
            raise
        return [f'SSH_KP_NAME="{config.key_name}": no such key pair in region {config.region}']
    return []


def check_launch_template(ec2: Any, config: AwsConfig) -> list[str]:
    if not config.use_launch_template:
        return []
    try:
        ec2.describe_launch_templates(LaunchTemplateNames=[config.launch_template_name])
    except ClientError as exc:
        if not error_code(exc).startswith("InvalidLaunchTemplateName"):
            raise
        return [f'PODVM_LAUNCHTEMPLATE_NAME="{config.launch_template_name}": no such launch template in region '
                f"{config.region} (USE_PODVM_LAUNCHTEMPLATE=true)"]
    return []


def check_tags(config: AwsConfig) -> list[str]:
    return [f'TAGS: key "{key}" is reserved by AWS (keys may not start with "aws:")'
            for key in config.tags if key.lower().startswith("aws:")]


def _guarded(what: str, secrets: tuple[str, ...], check: Callable[[], list[str]]) -> list[str]:
    """A check's problems; an unexpected AWS error becomes one problem line."""
    try:
        return check()
    except (ClientError, BotoCoreError) as exc:
        return [f"could not check {what}: {describe(exc, secrets)}"]


def run_checks(ec2: Any, config: AwsConfig, secrets: tuple[str, ...] = ()) -> CheckResult:
    """Every check; the AMI and type facts found are returned for later creates."""
    problems = _guarded("the credentials", secrets, lambda: check_credentials(ec2, config, secrets))
    if problems:
        return CheckResult(problems)
    found: dict[str, Any] = {}

    def image() -> list[str]:
        found["image"], image_problems = check_image(ec2, config)
        return image_problems

    def types() -> list[str]:
        found["catalog"], type_problems = check_instance_types(ec2, config)
        return type_problems

    problems += _guarded("PODVM_AMI_ID", secrets, image)
    problems += _guarded("the instance types", secrets, types)
    def subnet() -> list[str]:
        found["subnet_cidr"], network_problems = check_network(ec2, config)
        return network_problems

    problems += _guarded("AWS_SUBNET_ID / AWS_SG_IDS", secrets, subnet)
    problems += _guarded("SSH_KP_NAME", secrets, lambda: check_key_pair(ec2, config))
    problems += _guarded("PODVM_LAUNCHTEMPLATE_NAME", secrets, lambda: check_launch_template(ec2, config))
    problems += check_tags(config)
    return CheckResult(problems, found.get("image"), found.get("catalog") or cat.TypeCatalog(),
                       found.get("subnet_cidr"))
