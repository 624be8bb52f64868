"""Azure: build ``peer-pod-vmimage`` (a managed image) from RHEL 9 (or ``--base-image``) with a builder VM.

Temporaries, named after the build and deleted by name (so a lost reply
cannot orphan one), VM first, then NIC, then OS disk:

- the NIC ``peerpod-image-builder-<id>-nic`` in ``AZURE_SUBNET_ID`` with
  ``AZURE_NSG_ID`` (Azure's default rules let the VNet reach 22/tcp);
- the VM ``peerpod-image-builder-<id>`` (an ordinary VM, never confidential:
  a managed image cannot back a confidential VM), its OS disk ``...-osdisk``,
  logging in as ``SSH_USERNAME`` with a key pair made for this build (its
  private half only in this process: the ``ssh-key-secret`` is not needed),
  and given a host key made for this build through ``customData``
  (cloud-init), the only one SSH accepts (``buildkeys``).

After provisioning and ``seal`` (which runs ``waagent -deprovision+user``):
deallocate, generalize, create the managed image from the VM (tags on it);
an image that fails is deleted. Uses the provider's SDK clients
(``build_clients``: azure-core retries, ``AZURE_RESOURCE_MANAGER_ENDPOINT``).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping

from azure.core.exceptions import AzureError

from cloudadaptor.imagebuild import buildkeys
from cloudadaptor.imagebuild.cleanup import CleanupStack
from cloudadaptor.imagebuild.common import (
    TAG_BUILT_BY, BuildError, BuildOptions, ImageInfo, SshAccess, builder_backoff, builder_name, temporary_tags,
)
from cloudadaptor.providers.azure import client as az
from cloudadaptor.providers.azure import network, vms
from cloudadaptor.providers.azure.config import DEFAULT_SIZE  # the plain (non-confidential) size
from cloudadaptor.providers.azure.config import AzureConfig, ImageRef, parse_image_id
from cloudadaptor.providers.base import load_provider
from cloudadaptor.providers.azure.tags import azure_tag_name, from_azure_tags, to_azure_tags
from cloudadaptor.retry import retry_call

DEFAULT_BASE_IMAGE = "RedHat:RHEL:9-lvm-gen2:latest"
DEFAULT_HYPERV_GENERATION = "V2"


def load_config(env: Mapping[str, str]) -> AzureConfig:
    """The Azure keys (peer-pods-cm / peer-pods-secret) as the provider parses them; ConfigError listing problems."""
    _, config = load_provider(env, provider="azure")
    assert isinstance(config, AzureConfig)
    return config


@dataclasses.dataclass(frozen=True)
class MarketplaceImage:
    """``publisher:offer:sku:version`` as an ARM ``imageReference``."""

    publisher: str
    offer: str
    sku: str
    version: str

    @property
    def text(self) -> str:
        return f"{self.publisher}:{self.offer}:{self.sku}:{self.version}"

    def reference(self) -> dict[str, str]:
        return {"publisher": self.publisher, "offer": self.offer, "sku": self.sku, "version": self.version}


def parse_base_image(text: str) -> MarketplaceImage | ImageRef:
    """A marketplace URN (``RedHat:RHEL:9-lvm-gen2:latest``) or an image id; BuildError saying what is accepted."""
    parts = text.split(":")
    if len(parts) == 4 and all(parts):
        return MarketplaceImage(*parts)
    try:
        return parse_image_id(text)
    except ValueError as exc:
        raise BuildError(f"--base-image {text}: expected publisher:offer:sku:version or {exc}") from None


class AzureImageBackend:
    """The Azure half of ``image build`` / ``list`` / ``delete`` (see the module docstring). Blocking."""

    cloud = "azure"

    def __init__(self, config: AzureConfig, clients: az.AzureClients, *,
                 hyper_v_generation: str = DEFAULT_HYPERV_GENERATION) -> None:
        self.config = config
        self.clients = clients
        self.extra_tags = dict(config.extra_tags)  # TAGS, on everything made
        self.hyper_v_generation = hyper_v_generation
        self.rg = config.resource_group
        self._vm_name: str | None = None

    def close(self) -> None:
        self.clients.close()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except AzureError as exc:
            raise BuildError(f"{what}: {az.describe(exc)}") from None

    def _gone_ok(self, delete: Callable[[], Any]) -> None:
        try:
            delete()
        except AzureError as exc:
            if not az.is_not_found(exc):
                raise

    # ------------------------------------------------------------ images

    def _info(self, image: Any) -> ImageInfo:
        return ImageInfo(image.id, image.name, az.text(image.provisioning_state), "", from_azure_tags(image.tags))

    def find_image(self, name: str) -> ImageInfo | None:
        with self._errors(f"looking up image {name} in {self.rg}"):
            try:
                return self._info(self.clients.compute.images.get(self.rg, name))
            except AzureError as exc:
                if az.is_not_found(exc):
                    return None
                raise

    def list_images(self) -> list[ImageInfo]:
        with self._errors(f"listing images in {self.rg}"):
            found = list(self.clients.compute.images.list_by_resource_group(self.rg))
        ours = [self._info(i) for i in found if azure_tag_name(TAG_BUILT_BY) in (i.tags or {})]
        return sorted(ours, key=lambda i: i.name)

    def delete_image(self, image: ImageInfo) -> None:
        with self._errors(f"deleting image {image.id}"):
            self._gone_ok(lambda: self.clients.compute.images.begin_delete(self.rg, image.name).result())

    def resolve_base_image(self, requested: str | None) -> str:
        return parse_base_image(requested or DEFAULT_BASE_IMAGE).text

    # ------------------------------------------------------------ builder VM

    def launch(self, stack: CleanupStack, build_id: str, base_image: str, options: BuildOptions) -> SshAccess:
        public, key = buildkeys.new_login_key()
        host_key = buildkeys.new_host_key()
        name = builder_name(build_id)
        self._vm_name = name
        tags = temporary_tags(build_id, self.extra_tags)
        compute, net = self.clients.compute, self.clients.network
        disk = vms.os_disk_name(name)
        stack.push(f"OS disk {disk}", lambda: self._delete_in_use(lambda: compute.disks.begin_delete(self.rg, disk).result()))
        nic_name = network.nic_name(name)
        stack.push(f"NIC {nic_name}",
                   lambda: self._delete_in_use(lambda: net.network_interfaces.begin_delete(self.rg, nic_name).result()))
        with self._errors(f"NIC {nic_name}"):
            # The generated models are mappings of ARM's JSON, which is what nic_of reads.
            nic = network.nic_of(net.network_interfaces.begin_create_or_update(
                self.rg, nic_name, network.nic_body(self.config, tags)).result())
        plain = dataclasses.replace(self.config, disable_cvm=True, secure_boot=False)
        body = vms.vm_body(plain, name=name, size=options.instance_type or DEFAULT_SIZE,
                           image=parse_base_image(base_image), nic_id=nic.id,  # type: ignore[arg-type]
                           ssh_public_key=public, user_data="", tags=tags)
        body["properties"].pop("userData", None)
        # customData is what cloud-init reads on Azure (userData is only for IMDS readers).
        body["properties"]["osProfile"]["customData"] = base64.b64encode(
            buildkeys.host_key_cloud_config(host_key).encode()).decode("ascii")
        stack.push(f"builder VM {name}",
                   lambda: self._gone_ok(lambda: compute.virtual_machines.begin_delete(self.rg, name).result()))
        with self._errors(f"builder VM {name}"):
            compute.virtual_machines.begin_create_or_update(self.rg, name, body).result()
        return SshAccess(nic.private_ip, 22, self.config.ssh_username, key, host_key)  # the VM's admin user

    def _delete_in_use(self, delete: Callable[[], Any]) -> None:
        """A NIC/disk delete: gone is success, "in use" (its VM is just going) is retried."""
        retry_call(lambda: self._gone_ok(delete), timeout=self.config.in_use_timeout,
                   backoff=builder_backoff(self.config.in_use_backoff), retryable=az.is_in_use)

    # ------------------------------------------------------------ image

    def capture(self, stack: CleanupStack, build_id: str, options: BuildOptions, tags: Mapping[str, str],
                before_create: Callable[[], None]) -> str:
        name = self._vm_name
        assert name is not None, "launch() first"
        compute = self.clients.compute
        with self._errors(f"deallocating and generalizing builder VM {name}"):
            compute.virtual_machines.begin_deallocate(self.rg, name).result()
            compute.virtual_machines.generalize(self.rg, name)
        before_create()
        image_name = options.name
        stack.push(f"incomplete image {image_name}",
                   lambda: self._gone_ok(lambda: compute.images.begin_delete(self.rg, image_name).result()),
                   on_success=False)
        body = {
            "location": self.config.region,
            "tags": to_azure_tags(tags),
            "properties": {
                "sourceVirtualMachine": {"id": vms.vm_id(self.config.subscription_id, self.rg, name)},
                "hyperVGeneration": self.hyper_v_generation,
            },
        }
        with self._errors(f"creating image {image_name}"):
            image = compute.images.begin_create_or_update(self.rg, image_name, body).result()
        return str(image.id)
