"""``AwsProvider``: the ``Provider`` protocol on EC2.

Start: empty region/subnet/VPC/SGs are taken from the worker's IMDSv2, the
EC2 client is made once (botocore retries throttling and 5xx), and
``verify`` checks credentials, AMI, instance types, subnet, groups, key pair
and launch template, keeping the AMI and instance-type facts for creates.

boto3 blocks, so every call runs in a worker thread (``asyncio.to_thread``);
the one client is shared (boto3 clients are thread-safe). The provider holds
nothing per pod: EC2 tags are the record (owner, node, sandbox, pod, client
token), so a restarted daemon finds every VM it made.

USE_PUBLIC_IP asks EC2 for an auto-assigned public address on the VM's
interface (released by EC2 with the instance); we never allocate Elastic
IPs, so a delete has none to release.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import botocore.session
from botocore.exceptions import BotoCoreError, ClientError

from cloudadaptor.providers.aws import catalog as cat
from cloudadaptor.providers.aws import checks, instances
from cloudadaptor.providers.aws.client import describe, make_ec2_client
from cloudadaptor.providers.aws.config import AwsConfig, parse_ami_id
from cloudadaptor.providers.aws.imds import ImdsClient, fill_from_imds
from cloudadaptor.providers.base import ConsoleUnavailable, Instance, InstanceSpec, ProviderBase, ProviderError
from cloudadaptor.providers.selection import SelectionError, check_image, select_instance_type
from cloudadaptor.providers.telemetry import CloudCallRecorder, CloudCalls
from cloudadaptor.userdata import UserDataTooLarge, check_size
from cloudadaptor.wire import AWS_USER_DATA_LIMIT

log = logging.getLogger(__name__)

AWS_ERRORS = (ClientError, BotoCoreError)


@dataclass(frozen=True)
class _Facts:
    """What the start-up checks learned: the configured AMI and instance types."""

    image: cat.ImageInfo | None
    catalog: cat.TypeCatalog
    subnet_cidr: str | None = None


class AwsProvider(ProviderBase):
    """The ``aws`` provider. See the module docstring."""

    name = "aws"
    config_type: ClassVar[type[AwsConfig]] = AwsConfig

    def __init__(self, config: AwsConfig, *, imds: ImdsClient | None = None) -> None:
        self.config = config
        self._imds = imds or ImdsClient(config.imds_endpoint)
        self._lock = asyncio.Lock()
        self._ec2: Any = None
        self._facts: _Facts | None = None
        self.cloud_calls = CloudCalls(self.name)  # botocore's hooks report here (metrics)

    def __repr__(self) -> str:
        return f"AwsProvider(region={self.config.region!r}, subnet={self.config.subnet_id!r})"

    @property
    def _secrets(self) -> tuple[str, ...]:
        return self.config.credentials.values()

    # ------------------------------------------------------------------- start

    async def _discover(self) -> list[str]:
        """Fill empty keys from IMDS and make the client, once (lock held)."""
        if self._ec2 is not None:
            return []
        config = self.config
        if config.region is None:
            config = dataclasses.replace(config, region=await asyncio.to_thread(_sdk_default_region))
        config, problems = await asyncio.to_thread(fill_from_imds, config, self._imds)
        if problems or config.region is None:
            return problems or ["AWS_REGION is not set and could not be discovered"]
        self.config = config
        self._ec2 = await asyncio.to_thread(make_ec2_client, config, self.cloud_calls, model_cache=config.model_cache_dir)
        return []

    async def _verify_locked(self) -> list[str]:
        problems = await self._discover()
        if problems:
            return problems
        result = await asyncio.to_thread(checks.run_checks, self._ec2, self.config, self._secrets)
        if not result.problems:
            self._facts = _Facts(result.image, result.catalog, result.subnet_cidr)
            log.info("AWS: region %s, subnet %s, security groups %s, AMI %s (%s), types %s", self.config.region,
                     self.config.subnet_id, ",".join(self.config.security_group_ids) or "-", self.config.image_id,
                     result.image.name if result.image else "launch template",
                     ",".join(sorted(result.catalog.types)) or "launch template's")
        return result.problems

    async def verify(self) -> list[str]:
        """Discover what is empty, then check every configured resource; one line
        per problem naming the key. Safe to call again (e.g. after a fix)."""
        async with self._lock:
            return await self._verify_locked()

    async def client(self) -> Any:
        """The EC2 client (made on first use). Raises ProviderError if region discovery fails."""
        async with self._lock:
            problems = await self._discover()
        if problems:
            raise ProviderError("AWS provider not usable: " + "; ".join(problems))
        return self._ec2

    async def _ready(self) -> tuple[Any, _Facts]:
        async with self._lock:
            problems = [] if self._facts is not None else await self._verify_locked()
        if problems or self._facts is None:
            raise ProviderError("AWS provider not usable: " + "; ".join(problems))
        return self._ec2, self._facts

    # ------------------------------------------------------------------ create

    async def create_instance(self, spec: InstanceSpec) -> Instance:
        """Create the pod VM (or adopt the live one made for ``spec.client_token``)
        and block until it runs, at most ``boot_timeout`` (180 s by default).

        Returns ips (private, public) — (public, private) with USE_PUBLIC_IP.
        If anything fails (or the caller cancels) once the instance exists, it
        is terminated before this raises. Raises ProviderError.
        """
        ec2, facts = await self._ready()
        try:
            plan = await asyncio.to_thread(self._plan, ec2, facts, spec)
        except AWS_ERRORS as exc:
            raise ProviderError(f"preparing {spec.name} failed: {describe(exc, self._secrets)}") from None
        began = time.monotonic()
        instance_id = await self._launch(ec2, plan)
        launched_in = time.monotonic() - began
        try:
            described = await asyncio.to_thread(
                instances.wait_running, ec2, instance_id, self.config.boot_poll_interval, self.config.boot_timeout
            )
            instance = instances.to_instance(described, self.config.use_public_ip)
            if self.config.use_public_ip and not described.get("PublicIpAddress"):
                raise ProviderError(f"instance {instance_id} has no public IP (USE_PUBLIC_IP=true): "
                                    "the subnet must allow public addresses")
        except BaseException as exc:
            cleanup = await asyncio.shield(self._discard(ec2, instance_id))
            if isinstance(exc, ProviderError):
                raise ProviderError(f"{exc}; {cleanup}") from None
            if isinstance(exc, AWS_ERRORS):
                raise ProviderError(f"waiting for {instance_id} failed: {describe(exc, self._secrets)}; {cleanup}") from None
            raise
        log.info("instance %s (%s) running at %s", instance.id, spec.name, ", ".join(instance.ips))
        return dataclasses.replace(instance, launched_in=launched_in)

    async def _launch(self, ec2: Any, plan: instances.LaunchPlan) -> str:
        """RunInstances (or adoption) in a thread; a cancellation waits for the
        call to finish and terminates what it made."""
        task = asyncio.ensure_future(asyncio.to_thread(instances.launch, ec2, plan))
        try:
            instance_id, created = await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                instance_id, _ = await task
                await self._discard(ec2, instance_id)
            raise
        except AWS_ERRORS as exc:
            raise ProviderError(f"RunInstances for {plan.name} failed: {describe(exc, self._secrets)}") from None
        log.info("instance %s %s for %s (type %s)", instance_id, "created" if created else "adopted",
                 plan.name, plan.instance_type or "from launch template")
        return instance_id

    async def _discard(self, ec2: Any, instance_id: str) -> str:
        """Terminate after a failed create; what happened, for the error message."""
        try:
            await asyncio.to_thread(instances.terminate, ec2, instance_id)
        except AWS_ERRORS as exc:
            log.error("could not terminate %s after a failed create: %s", instance_id, describe(exc, self._secrets))
            return f"terminating {instance_id} also failed ({describe(exc, self._secrets)}); it is tagged for the sweeper"
        return f"instance {instance_id} terminated"

    def _plan(self, ec2: Any, facts: _Facts, spec: InstanceSpec) -> instances.LaunchPlan:
        """Everything RunInstances needs, checked before anything is created."""
        config = self.config
        try:
            check_size(spec.user_data, AWS_USER_DATA_LIMIT, "AWS")
        except UserDataTooLarge as exc:
            raise ProviderError(str(exc)) from None
        image_id = self._image_id(spec)
        instance_type = self._instance_type(spec, facts.catalog)
        sev_snp = config.wants_sev_snp and instance_type is not None
        if sev_snp and instance_type not in facts.catalog.types:
            more, unknown = cat.describe_types(ec2, [instance_type])
            if unknown:
                raise ProviderError(f"instance type {instance_type!r} does not exist in region {config.region}")
            facts = dataclasses.replace(facts, catalog=facts.catalog.merged(more))
        if sev_snp and instance_type not in facts.catalog.sev_snp:
            raise ProviderError(f"instance type {instance_type!r} does not support AMD SEV-SNP, "
                                "which DISABLECVM=false requires")
        root_device, root_size = self._root_volume(ec2, facts, image_id)
        return instances.LaunchPlan(
            name=spec.name,
            client_token=instances.ec2_client_token(spec.client_token),
            user_data=spec.user_data,
            tags={**config.tags, **spec.tags},
            image_id=image_id,
            instance_type=instance_type,
            subnet_id=config.subnet_id,
            security_group_ids=config.security_group_ids,
            key_name=config.key_name,
            launch_template=config.launch_template_name if config.use_launch_template else None,
            public_ip=config.use_public_ip,
            sev_snp=sev_snp,
            root_device=root_device,
            root_size_gib=root_size,
        )

    def _image_id(self, spec: InstanceSpec) -> str | None:
        if spec.image:
            try:
                check_image(spec.image, self.config.images)
                return parse_ami_id(spec.image)
            except ValueError as exc:  # SelectionError too
                raise ProviderError(f"image annotation {spec.image!r}: {exc}") from None
        if not self.config.image_id and not self.config.use_launch_template:
            raise ProviderError("no AMI: set PODVM_AMI_ID or the pod's image annotation")
        return self.config.image_id

    def _instance_type(self, spec: InstanceSpec, catalog: cat.TypeCatalog) -> str | None:
        """The instance type for ``spec`` (``selection``); None leaves it to the launch template."""
        config = self.config
        if config.use_launch_template and not (spec.instance_type or config.instance_type or config.instance_types):
            return None
        try:
            return select_instance_type(
                requested=spec.instance_type, vcpus=spec.vcpus, memory_mib=spec.memory_mib, gpus=spec.gpus,
                default=config.instance_type, allowed=config.instance_types, catalog=catalog.types,
            )
        except SelectionError as exc:
            raise ProviderError(str(exc)) from None

    def _root_volume(self, ec2: Any, facts: _Facts, image_id: str | None) -> tuple[str | None, int]:
        """(root device, GiB) for ROOT_VOLUME_SIZE, never below the AMI's size; (None, 0) when unset."""
        wanted = self.config.root_volume_size
        if wanted <= 0 or image_id is None:
            return None, 0
        image = facts.image if facts.image and facts.image.id == image_id else cat.describe_image(ec2, image_id)
        if image is None:
            raise ProviderError(f"image {image_id} does not exist in region {self.config.region}")
        if image.root_size_gib > wanted:
            log.info("ROOT_VOLUME_SIZE %d GiB is below the %d GiB of %s: using %d GiB",
                     wanted, image.root_size_gib, image_id, image.root_size_gib)
        return image.root_device, max(wanted, image.root_size_gib)

    # ------------------------------------------------------------ delete, list

    async def delete_instance(self, instance_id: str) -> None:
        """Terminate; returns once EC2 accepted it. An instance already gone
        (unknown id, terminated) is success. Raises ProviderError."""
        ec2 = await self.client()
        try:
            existed = await asyncio.to_thread(instances.terminate, ec2, instance_id)
        except AWS_ERRORS as exc:
            raise ProviderError(f"terminating {instance_id} failed: {describe(exc, self._secrets)}") from None
        log.info("instance %s %s", instance_id, "terminated" if existed else "already gone")

    def report_cloud_calls(self, recorder: CloudCallRecorder) -> None:
        """The SDK's hooks (installed with the client) report to ``recorder`` from now on."""
        self.cloud_calls.recorder = recorder

    async def console_output(self, instance_id: str) -> str:
        """EC2 ``GetConsoleOutput`` (latest), decoded. EC2 publishes it some time after boot."""
        try:
            ec2 = await self.client()
            reply = await asyncio.to_thread(ec2.get_console_output, InstanceId=instance_id, Latest=True)
        except (ProviderError, *AWS_ERRORS) as exc:
            text = str(exc) if isinstance(exc, ProviderError) else describe(exc, self._secrets)
            raise ConsoleUnavailable(f"EC2 GetConsoleOutput for {instance_id} failed: {text}") from None
        output = reply.get("Output")
        if not output:
            raise ConsoleUnavailable(f"EC2 has no console output for {instance_id} yet (it is published minutes after boot)")
        return _decode_console(output)
    async def describe_instance(self, instance_id: str) -> Instance | None:
        """The instance with its tags; None when unknown, shutting down or terminated."""
        ec2 = await self.client()
        try:
            described = await asyncio.to_thread(instances.describe_instance, ec2, instance_id)
        except AWS_ERRORS as exc:
            raise ProviderError(f"describing {instance_id} failed: {describe(exc, self._secrets)}") from None
        if described is None or described.get("State", {}).get("Name") not in instances.OWNED_STATES:
            return None
        return instances.to_instance(described, self.config.use_public_ip)

    async def list_owned(self, tags: Mapping[str, str]) -> list[Instance]:
        """Instances tagged ``peerpods.io/owner=cloud-api-adaptor`` and with every
        one of ``tags``, pending to stopped (not shutting down or terminated)."""
        ec2 = await self.client()
        try:
            return await asyncio.to_thread(instances.list_owned, ec2, dict(tags), self.config.use_public_ip)
        except AWS_ERRORS as exc:
            raise ProviderError(f"listing instances failed: {describe(exc, self._secrets)}") from None

    def user_data_limit(self) -> int | None:
        return AWS_USER_DATA_LIMIT

    def network_hint(self) -> str | None:
        """An address in the pod VMs' subnet (no I/O; known once ``verify`` passed):
        the worker's VXLAN address is the source of its route there."""
        cidr = self._facts.subnet_cidr if self._facts else None
        return str(ipaddress.ip_network(cidr, strict=False).network_address + 1) if cidr else None

    async def close(self) -> None:
        """Close the client's connections; instances keep running."""
        if self._ec2 is not None:
            with contextlib.suppress(Exception):
                self._ec2.close()


def _sdk_default_region() -> str | None:
    """The SDK's own region (AWS_DEFAULT_REGION, the profile), if any."""
    region = botocore.session.get_session().get_config_variable("region")
    return str(region) if region else None


def _decode_console(output: str) -> str:
    """EC2 documents ``Output`` as base64; emulators (moto) may hand back the text itself: accept both."""
    try:
        raw = base64.b64decode("".join(output.split()), validate=True)
    except (binascii.Error, ValueError):
        return output
    return raw.decode("utf-8", errors="replace")
