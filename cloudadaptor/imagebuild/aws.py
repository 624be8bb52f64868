"""AWS: build ``peer-pod-ami`` from a RHEL 9 AMI (or ``--base-image``) with a temporary builder instance.

Temporaries, each undone through the cleanup stack (found by name or by the
``peerpods.io/image-build`` tag, so a lost reply cannot orphan one):

- an EC2 key pair ``peerpod-image-builder-<id>`` (RSA, made by EC2; the
  private key lives only in this process);
- a security group of that name in the subnet's VPC allowing 22/tcp from
  ``AWS_SG_IDS`` (the workers' groups) and any ``--ssh-cidr``, else from the
  VPC's CIDR;
- the builder instance in ``AWS_SUBNET_ID`` with ``AWS_SG_IDS`` plus that
  group (RunInstances with a ClientToken: a retried launch adopts it), its
  root volume deleted with it; its user data gives it a host key made for
  this build, the only one SSH accepts (``buildkeys``).

Then: stop the instance, CreateImage (tags on the image, then on its
snapshots), wait with the ``image_available`` waiter; an image that fails is
deregistered and its snapshots deleted. Uses the provider's EC2 client
(``make_ec2_client``: botocore retries, ``AWS_ENDPOINT_URL`` untouched).
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Callable, Iterator, Mapping

import paramiko
from botocore.exceptions import BotoCoreError, ClientError, WaiterError

from cloudadaptor.config import Settings
from cloudadaptor.imagebuild import buildkeys
from cloudadaptor.imagebuild.cleanup import CleanupStack
from cloudadaptor.imagebuild.common import (
    TAG_BUILD, TAG_BUILT_BY, BuildError, BuildOptions, ImageInfo, SshAccess, builder_backoff, builder_name, temporary_tags,
)
from cloudadaptor.providers.aws import instances
from cloudadaptor.providers.aws.client import describe, error_code, make_ec2_client
from cloudadaptor.providers.aws.config import DEFAULT_INSTANCE_TYPE, AwsConfig
from cloudadaptor.providers.aws.imds import ImdsClient, fill_from_imds
from cloudadaptor.providers.aws.network import describe_subnet
from cloudadaptor.providers.base import ProviderError, load_provider
from cloudadaptor.retry import retry_call

RHEL_OWNER = "309956199498"  # Red Hat's AWS account: its RHEL AMIs
RHEL9_NAME = "RHEL-9.*_HVM-*-x86_64-*"
DEFAULT_SSH_USER = "ec2-user"
GONE_IMAGE_CODES = frozenset({"InvalidAMIID.NotFound", "InvalidAMIID.Unavailable", "InvalidAMIID.Malformed"})
GONE_SNAPSHOT_CODES = frozenset({"InvalidSnapshot.NotFound"})
GONE_GROUP_CODES = frozenset({"InvalidGroup.NotFound", "InvalidGroupId.NotFound"})
GROUP_DELETE_TIMEOUT = 300.0  # a terminated instance's ENI takes a while to let go of the group


def load_config(env: Mapping[str, str]) -> tuple[AwsConfig, Settings]:
    """The AWS keys (peer-pods-cm / peer-pods-secret) as the provider parses them.

    Raises ``ConfigError`` listing every bad key. Empty region/subnet/security
    groups are discovered from the worker's IMDSv2, as ``serve`` does;
    ``BuildError`` when that is needed and fails.
    """
    settings, config = load_provider(env, provider="aws")
    assert isinstance(config, AwsConfig)
    config, missing = fill_from_imds(config, ImdsClient(config.imds_endpoint))
    if missing:
        raise BuildError("\n".join(missing))
    return config, settings


class AwsImageBackend:
    """The AWS half of ``image build`` / ``list`` / ``delete`` (see the module docstring). Blocking."""

    cloud = "aws"

    def __init__(self, config: AwsConfig, ec2: Any = None, *, poll_interval: float = 5.0,
                 ssh_cidrs: tuple[str, ...] = (), timeout: float = 900.0) -> None:
        self.config = config
        self.ec2 = ec2 if ec2 is not None else make_ec2_client(config)
        self.extra_tags = dict(config.tags)  # TAGS, on everything made
        self.poll = poll_interval
        self.ssh_cidrs = ssh_cidrs
        self.timeout = timeout  # bound of each wait for an instance state
        self._instance_id: str | None = None

    def close(self) -> None:
        self.ec2.close()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """AWS errors become one-line BuildErrors saying what was being done (never a secret)."""
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            raise BuildError(f"{what}: {describe(exc, self.config.credentials.values())}") from None
        except ProviderError as exc:
            raise BuildError(f"{what}: {exc}") from None

    def _attempts(self, timeout: float) -> int:
        return max(1, math.ceil(timeout / max(self.poll, 1.0)))

    # ------------------------------------------------------------ images

    def find_image(self, name: str) -> ImageInfo | None:
        with self._errors(f"looking up image {name}"):
            found = self.ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])["Images"]
        images = [_info(i) for i in found if i.get("State") != "deregistered"]
        return images[0] if images else None

    def list_images(self) -> list[ImageInfo]:
        with self._errors("listing images"):
            found = self.ec2.describe_images(Owners=["self"], Filters=[{"Name": "tag-key", "Values": [TAG_BUILT_BY]}])
        return sorted((_info(i) for i in found["Images"]), key=lambda i: (i.name, i.created))

    def delete_image(self, image: ImageInfo) -> None:
        """Deregister the AMI and delete its snapshots; an AMI already gone is success."""
        with self._errors(f"deleting image {image.id}"):
            try:
                described = self.ec2.describe_images(ImageIds=[image.id])["Images"]
            except ClientError as exc:
                if error_code(exc) in GONE_IMAGE_CODES:
                    return
                raise
            snapshots = [s for i in described for s in _snapshots(i)]
            if described:
                self.ec2.deregister_image(ImageId=image.id)
            for snapshot in snapshots:
                self._delete_snapshot(snapshot)

    def _delete_snapshot(self, snapshot_id: str) -> None:
        _unless_gone(GONE_SNAPSHOT_CODES, lambda: self.ec2.delete_snapshot(SnapshotId=snapshot_id))

    def resolve_base_image(self, requested: str | None) -> str:
        if requested:
            with self._errors(f"base image {requested}"):
                try:
                    found = self.ec2.describe_images(ImageIds=[requested])["Images"]
                except ClientError as exc:
                    if error_code(exc) not in GONE_IMAGE_CODES:
                        raise
                    found = []
            if not found or found[0].get("State") != "available":
                raise BuildError(f"base image {requested} does not exist or is not available in {self.config.region}")
            return requested
        with self._errors("looking up the newest RHEL 9 AMI"):
            found = self.ec2.describe_images(Owners=[RHEL_OWNER], Filters=[
                {"Name": "name", "Values": [RHEL9_NAME]}, {"Name": "architecture", "Values": ["x86_64"]},
                {"Name": "state", "Values": ["available"]},
            ])["Images"]
        if not found:
            raise BuildError(f"no RHEL 9 AMI of Red Hat (owner {RHEL_OWNER}, name {RHEL9_NAME}) in {self.config.region}; "
                             "pass --base-image ami-...")
        return max(found, key=lambda i: i.get("CreationDate", ""))["ImageId"]

    # ------------------------------------------------------------ builder VM

    def launch(self, stack: CleanupStack, build_id: str, base_image: str, options: BuildOptions) -> SshAccess:
        name = builder_name(build_id)
        tags = temporary_tags(build_id, self.extra_tags)
        with self._errors(f"key pair {name}"):
            stack.push(f"key pair {name}", lambda: self.ec2.delete_key_pair(KeyName=name))
            made = self.ec2.create_key_pair(KeyName=name, KeyType="rsa", TagSpecifications=[_spec("key-pair", tags)])
        key = paramiko.RSAKey.from_private_key(io.StringIO(made["KeyMaterial"]))
        host_key = buildkeys.new_host_key()
        group_id = self._security_group(stack, name, tags)
        plan = instances.LaunchPlan(
            name=name, client_token=build_id, user_data=buildkeys.host_key_cloud_config(host_key), tags=tags,
            image_id=base_image,
            instance_type=options.instance_type or DEFAULT_INSTANCE_TYPE, subnet_id=self.config.subnet_id,
            security_group_ids=(*self.config.security_group_ids, group_id), key_name=name,
            public_ip=self.config.use_public_ip,
        )
        with self._errors(f"builder instance {name}"):
            stack.push(f"builder VM {name}", lambda: self._terminate(build_id))
            self._instance_id, _ = instances.launch(self.ec2, plan)
            described = instances.wait_running(self.ec2, self._instance_id, self.poll, self.timeout)
        address = described.get("PublicIpAddress") if self.config.use_public_ip else described.get("PrivateIpAddress")
        if not address:
            raise BuildError(f"builder instance {self._instance_id} has no {'public' if self.config.use_public_ip else 'private'} address")
        return SshAccess(address, 22, options.ssh_user or DEFAULT_SSH_USER, key, host_key)

    def _security_group(self, stack: CleanupStack, name: str, tags: Mapping[str, str]) -> str:
        with self._errors(f"security group {name}"):
            subnet = describe_subnet(self.ec2, self.config.subnet_id or "")
            if subnet is None:
                raise BuildError(f"AWS_SUBNET_ID {self.config.subnet_id} does not exist in {self.config.region}")
            vpc_id = subnet["VpcId"]
            stack.push(f"security group {name}", lambda: self._delete_group(name, vpc_id))
            group_id = self.ec2.create_security_group(
                GroupName=name, Description="temporary: SSH to the peer pod image builder VM", VpcId=vpc_id,
                TagSpecifications=[_spec("security-group", tags)])["GroupId"]
            rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                    "UserIdGroupPairs": [{"GroupId": g} for g in self.config.security_group_ids],
                                    "IpRanges": [{"CidrIp": c} for c in self.ssh_cidrs]}
            if not rule["UserIdGroupPairs"] and not rule["IpRanges"]:
                vpc = self.ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]
                rule["IpRanges"] = [{"CidrIp": vpc["CidrBlock"]}]
            self.ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[rule])
        return group_id

    def _terminate(self, build_id: str) -> None:
        """Terminate every instance of this build and wait until they are gone."""
        found = self.ec2.describe_instances(Filters=[
            {"Name": f"tag:{TAG_BUILD}", "Values": [build_id]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped", "shutting-down"]},
        ])
        ids = [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]]
        for instance_id in ids:
            instances.terminate(self.ec2, instance_id)
        if ids:
            self.ec2.get_waiter("instance_terminated").wait(
                InstanceIds=ids, WaiterConfig={"Delay": self.poll, "MaxAttempts": self._attempts(self.timeout)})

    def _delete_group(self, name: str, vpc_id: str) -> None:
        groups = self.ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}])["SecurityGroups"]
        for group in groups:
            retry_call(lambda: self._delete_group_id(group["GroupId"]), timeout=GROUP_DELETE_TIMEOUT,
                       backoff=builder_backoff(self.poll), retryable=lambda exc: error_code(exc) == "DependencyViolation")

    def _delete_group_id(self, group_id: str) -> None:
        _unless_gone(GONE_GROUP_CODES, lambda: self.ec2.delete_security_group(GroupId=group_id))

    # ------------------------------------------------------------ image

    def capture(self, stack: CleanupStack, build_id: str, options: BuildOptions, tags: Mapping[str, str],
                before_create: Callable[[], None]) -> str:
        instance_id = self._instance_id
        assert instance_id is not None, "launch() first"
        with self._errors(f"stopping builder instance {instance_id}"):
            self.ec2.stop_instances(InstanceIds=[instance_id])
            self.ec2.get_waiter("instance_stopped").wait(
                InstanceIds=[instance_id], WaiterConfig={"Delay": self.poll, "MaxAttempts": self._attempts(self.timeout)})
        before_create()
        stack.push(f"incomplete image {options.name}", lambda: self._delete_build_images(build_id), on_success=False)
        with self._errors(f"creating image {options.name}"):
            image_id = self.ec2.create_image(
                InstanceId=instance_id, Name=options.name, TagSpecifications=[_spec("image", tags)],
                Description=f"peer pod VM image built by cloud-api-adaptor from {tags.get('peerpods.io/base-image', '?')}",
            )["ImageId"]
            self._wait_available(image_id, options.image_timeout)
            snapshots = [s for i in self.ec2.describe_images(ImageIds=[image_id])["Images"] for s in _snapshots(i)]
            if snapshots:
                self.ec2.create_tags(Resources=snapshots, Tags=_tag_list(tags))
        return image_id

    def _wait_available(self, image_id: str, timeout: float) -> None:
        try:
            self.ec2.get_waiter("image_available").wait(
                ImageIds=[image_id], WaiterConfig={"Delay": self.poll, "MaxAttempts": self._attempts(timeout)})
        except WaiterError:
            found = self.ec2.describe_images(ImageIds=[image_id])["Images"]
            state = found[0].get("State", "?") if found else "gone"
            reason = (found[0].get("StateReason") or {}).get("Message", "") if found else ""
            raise BuildError(f"image {image_id} did not become available (state {state}"
                             f"{': ' + reason if reason else ''})") from None

    def _delete_build_images(self, build_id: str) -> None:
        found = self.ec2.describe_images(Owners=["self"], Filters=[{"Name": f"tag:{TAG_BUILD}", "Values": [build_id]}])
        for image in found["Images"]:
            self.delete_image(_info(image))


def _spec(resource_type: str, tags: Mapping[str, str]) -> dict[str, Any]:
    return {"ResourceType": resource_type, "Tags": _tag_list(tags)}


def _tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v[:256]} for k, v in tags.items()]


def _snapshots(image: Mapping[str, Any]) -> list[str]:
    return [m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings", []) if m.get("Ebs", {}).get("SnapshotId")]


def _info(image: Mapping[str, Any]) -> ImageInfo:
    return ImageInfo(image["ImageId"], image.get("Name", ""), image.get("State", ""), image.get("CreationDate", ""),
                     {t["Key"]: t["Value"] for t in image.get("Tags", [])})


def _unless_gone(gone_codes: frozenset[str], delete: Callable[[], Any]) -> None:
    """``delete()``; a ClientError whose code says the resource is already gone is success (idempotent delete)."""
    try:
        delete()
    except ClientError as exc:
        if error_code(exc) not in gone_codes:
            raise
