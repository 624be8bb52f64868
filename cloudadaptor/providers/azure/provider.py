"""``AzureProvider``: pod VMs on Azure (create, delete, list owned, verify).

A pod VM named ``<name>`` is three resources in ``AZURE_RESOURCE_GROUP``: the
VM, its NIC ``<name>-nic`` and its OS disk ``<name>-osdisk``. NIC and disk
are created with ``deleteOption: Delete`` so Azure removes them with the VM;
a delete still removes whatever is left of the three, so a failed or
interrupted create never leaks a NIC or a disk.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, HttpResponseError

from cloudadaptor import userdata
from cloudadaptor.providers.azure import arm, checks, network, vms
from cloudadaptor.providers.azure import client as az
from cloudadaptor.providers.azure.config import (
    AzureConfig, ImageRef, ResourceId, parse_image_id, parse_vm_id, read_ssh_public_key,
)
from cloudadaptor.providers.azure.tags import from_azure_tags, matches
from cloudadaptor.providers.base import (
    TAG_SANDBOX, ConsoleUnavailable, ForeignInstance, Instance, InstanceSpec, ProviderBase, ProviderError,
)
from cloudadaptor.providers.selection import InstanceTypeInfo, SelectionError, check_image, select_instance_type
from cloudadaptor.providers.telemetry import CloudCallRecorder, CloudCalls
from cloudadaptor.wire import AZURE_USER_DATA_LIMIT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Plan:
    """Everything a create needs, decided before the first cloud write."""

    name: str
    sandbox_id: str
    size: str
    image: ImageRef
    ssh_public_key: str
    user_data: str
    tags: Mapping[str, str]


def _rg_and_name(resource_id: str) -> tuple[str, str]:
    parts = resource_id.strip("/").split("/")
    lower = [p.lower() for p in parts]
    return parts[lower.index("resourcegroups") + 1], parts[-1]


class AzureProvider(ProviderBase):
    """The ``azure`` provider. Holds its ARM client and, once loaded, the
    region's size catalog and the subnet's prefix (both immutable); nothing else."""

    name = "azure"
    config_type: ClassVar[type[AzureConfig]] = AzureConfig

    def __init__(self, config: AzureConfig, *, credential: TokenCredential | None = None) -> None:
        self.config = config
        self.cloud_calls = CloudCalls(self.name)  # azure-core's pipeline reports here (metrics)
        self.clients = az.build_clients(config, credential, self.cloud_calls)
        self._catalog: dict[str, InstanceTypeInfo] | None = None
        self._subnet_prefix: str | None = None

    # ------------------------------------------------------------- interface

    async def verify(self) -> list[str]:
        """Startup checks (credentials, resource group, subnet, NSG, image, sizes,
        SSH key); one line per problem naming the key. Keeps the size catalog
        and the subnet prefix it learns."""
        result = await checks.run(self.clients, self.config)
        if result.catalog:
            self._catalog = result.catalog
        if result.subnet_prefix:
            self._subnet_prefix = result.subnet_prefix
        return result.problems

    def user_data_limit(self) -> int | None:
        return AZURE_USER_DATA_LIMIT

    def network_hint(self) -> str | None:
        """An address in the pod VMs' subnet (no I/O; known once ``verify`` ran), so
        the worker's VXLAN address can be the source of its route there."""
        if self._subnet_prefix is None:
            return None
        try:
            network = ipaddress.ip_network(self._subnet_prefix, strict=False)
        except ValueError:
            return None
        return str(network.network_address + min(4, network.num_addresses - 1))

    async def create_instance(self, spec: InstanceSpec) -> Instance:
        """Create the NIC, then the VM; block until both are provisioned.

        A VM of the same name already provisioned for this sandbox is adopted.
        On any failure (or cancellation) after the first write, the VM, NIC and
        OS disk are deleted before this raises ``ProviderError``.
        """
        plan = await self._plan(spec)
        adopted = await self._adoptable(plan)
        if adopted is not None:
            log.info("VM %s already exists for sandbox %s; adopting it", plan.name, plan.sandbox_id)
            return adopted
        try:
            return await self._create(plan)
        except BaseException as exc:
            cleanup = asyncio.ensure_future(self._remove(self.config.resource_group, plan.name))
            problems = await asyncio.shield(cleanup)
            done = f"cleanup failed: {'; '.join(problems)}" if problems else "its VM, NIC and disk were removed"
            if isinstance(exc, ProviderError):
                raise ProviderError(f"{exc}; {done}") from exc
            if isinstance(exc, (AzureError, OSError)):
                raise ProviderError(f"creating VM {plan.name} failed: {az.describe(exc)}; {done}") from exc
            raise

    def _managed_vm(self, instance_id: str, doing: str) -> ResourceId:
        """The parsed id of a VM in our subscription and AZURE_RESOURCE_GROUP;
        ``ForeignInstance`` for any other (never read or deleted there)."""
        try:
            vm = parse_vm_id(instance_id)
        except ValueError as exc:
            raise ProviderError(f"cannot {doing} {instance_id!r}: {exc}") from None
        if (vm.subscription.lower(), vm.resource_group.lower()) != (
                self.config.subscription_id.lower(), self.config.resource_group.lower()):
            raise ForeignInstance(
                f"cannot {doing} VM {vm.name}: it is in resource group {vm.resource_group} of subscription "
                f"{vm.subscription}, not AZURE_RESOURCE_GROUP {self.config.resource_group} of AZURE_SUBSCRIPTION_ID")
        return vm

    async def delete_instance(self, instance_id: str) -> None:
        """Delete the VM, then any NIC or OS disk it left. A VM already gone is success.
        Only in AZURE_RESOURCE_GROUP: any other id is refused (``ForeignInstance``)."""
        vm = self._managed_vm(instance_id, "delete")
        problems = await self._remove(vm.resource_group, vm.name)
        if problems:
            raise ProviderError(f"deleting VM {vm.name}: {'; '.join(problems)}")

    def report_cloud_calls(self, recorder: CloudCallRecorder) -> None:
        """azure-core's pipeline hooks (installed with the client) report to ``recorder`` from now on."""
        self.cloud_calls.recorder = recorder

    async def console_output(self, instance_id: str) -> str:
        """The serial log of boot diagnostics (``retrieveBootDiagnosticsData`` gives a SAS URI
        of the blob, fetched with ``requests``, which honours ``REQUESTS_CA_BUNDLE``)."""
        try:
            vm = parse_vm_id(instance_id)
        except ValueError as exc:
            raise ConsoleUnavailable(f"cannot read the console of {instance_id!r}: {exc}") from None
        try:
            data = await az.call(self.clients.arm.virtual_machine_retrieve_boot_diagnostics_data,
                                 vm.resource_group, vm.name, 5)
        except AzureError as exc:
            raise ConsoleUnavailable(f"boot diagnostics of VM {vm.name} not available (are they enabled?): "
                                     f"{az.describe(exc)}") from None
        uri = data.get("serialConsoleLogBlobUri")
        if not uri:
            raise ConsoleUnavailable(f"VM {vm.name} has no serial console log (boot diagnostics off)")
        return await asyncio.to_thread(_fetch_blob, uri, vm.name)
    async def describe_instance(self, instance_id: str) -> Instance | None:
        """The VM with its tags and private IP; None when it does not exist.
        Only in AZURE_RESOURCE_GROUP: any other id is ``ForeignInstance``."""
        vm_id = self._managed_vm(instance_id, "read")
        for instance in await self.list_owned({}):
            if instance.id.lower() == vm_id.text.lower():
                return instance
        return None

    async def list_owned(self, tags: Mapping[str, str]) -> list[Instance]:
        """VMs in AZURE_RESOURCE_GROUP carrying every one of ``tags``, plus the
        remains (a tagged NIC without VM) of creates that died half-way, listed
        under the id of the VM they belong to so ``delete_instance`` clears them."""
        rg = self.config.resource_group
        try:
            found_vms = await az.call(lambda: list(self.clients.arm.virtual_machines_list(rg)))
            nics = await az.call(lambda: list(self.clients.arm.network_interfaces_list(rg)))
        except AzureError as exc:
            raise ProviderError(f"listing VMs in {rg}: {az.describe(exc)}") from exc
        ips = {nic["id"].lower(): ip for nic in nics if (ip := network.first_ip(nic))}
        instances, names = [], set()
        for vm in found_vms:
            names.add(vm["name"].lower())
            if matches(vm.get("tags"), tags):
                nic_ids = [ref["id"].lower() for ref in _nic_refs(vm)]
                vm_ips = tuple(ips[i] for i in nic_ids if i in ips)
                instances.append(Instance(vm["id"], vm["name"], vm_ips, from_azure_tags(vm.get("tags")),
                                          instance_type=_size(vm)))
        for nic in nics:
            name = nic["name"]
            owner = name[: -len(network.NIC_SUFFIX)] if name.endswith(network.NIC_SUFFIX) else None
            attached = arm.properties(nic).get("virtualMachine") is not None
            if owner and owner.lower() not in names and not attached and matches(nic.get("tags"), tags):
                vm_id = vms.vm_id(self.config.subscription_id, rg, owner)
                instances.append(Instance(vm_id, owner, tuple(filter(None, [network.first_ip(nic)])),
                                          from_azure_tags(nic.get("tags"))))
        return instances

    async def close(self) -> None:
        """Release the ARM client's connections; VMs keep running."""
        await az.call(self.clients.close)

    # ---------------------------------------------------------------- create

    async def _plan(self, spec: InstanceSpec) -> _Plan:
        try:
            userdata.check_size(spec.user_data, AZURE_USER_DATA_LIMIT, "Azure")
        except userdata.UserDataTooLarge as exc:
            raise ProviderError(f"VM {spec.name}: {exc}") from None
        if spec.image:
            try:
                check_image(spec.image, self.config.images)
                image = parse_image_id(spec.image)
            except ValueError as exc:  # SelectionError too
                raise ProviderError(f"image annotation {spec.image!r}: {exc}") from None
        elif self.config.image is not None:
            image = self.config.image
        else:
            raise ProviderError("no pod VM image: set AZURE_IMAGE_ID or the pod's image annotation")
        catalog = await self._size_catalog()
        try:
            size = select_instance_type(
                requested=spec.instance_type, vcpus=spec.vcpus, memory_mib=spec.memory_mib, gpus=spec.gpus,
                default=self.config.size, allowed=self.config.sizes, catalog=catalog,
                default_key="AZURE_INSTANCE_SIZE", allowed_key="AZURE_INSTANCE_SIZES",
            )
        except SelectionError as exc:
            raise ProviderError(str(exc)) from None
        if size not in catalog:
            raise ProviderError(f"VM size {size} is not offered in {self.config.region} to this subscription")
        try:
            key = read_ssh_public_key(self.config.ssh_pub_key_path)
        except ValueError as exc:
            raise ProviderError(f"SSH_PUB_KEY_PATH: {exc}") from None
        tags = {**self.config.extra_tags, **spec.tags}
        return _Plan(spec.name, spec.sandbox_id, size, image, key, spec.user_data, tags)

    async def _size_catalog(self) -> dict[str, InstanceTypeInfo]:
        if self._catalog is None:
            try:
                self._catalog = await vms.load_catalog(self.clients, self.config)
            except AzureError as exc:
                raise ProviderError(f"listing VM sizes of {self.config.region}: {az.describe(exc)}") from exc
        return self._catalog

    async def _adoptable(self, plan: _Plan) -> Instance | None:
        """The VM already provisioned under ``plan.name`` for this sandbox, if any.

        ProviderError when that name is taken by another sandbox's VM.
        """
        try:
            vm = await az.call(self.clients.arm.virtual_machine_get, self.config.resource_group, plan.name)
        except AzureError as exc:
            if az.is_not_found(exc):
                return None
            raise ProviderError(f"looking up VM {plan.name}: {az.describe(exc)}") from exc
        owner = from_azure_tags(vm.get("tags")).get(TAG_SANDBOX)
        if owner != plan.sandbox_id:
            raise ProviderError(f"a VM named {plan.name} already exists for sandbox {owner or '(untagged)'}")
        if arm.properties(vm).get("provisioningState") != "Succeeded":
            return None  # a failed or interrupted create: PUT again
        nic_ref = _nic_refs(vm)[0]["id"]
        try:
            nic = await az.call(self.clients.arm.network_interface_get, *_rg_and_name(nic_ref))
        except AzureError as exc:
            raise ProviderError(f"looking up the NIC of VM {plan.name}: {az.describe(exc)}") from exc
        return Instance(vm["id"], vm["name"], (network.nic_of(nic).private_ip,), from_azure_tags(vm.get("tags")),
                        instance_type=_size(vm))

    async def _create(self, plan: _Plan) -> Instance:
        config = self.config
        try:
            nic = await network.create_nic(self.clients, config, plan.name, plan.tags)
        except HttpResponseError as exc:
            raise ProviderError(f"creating NIC for VM {plan.name} in {config.subnet.text}: {az.describe(exc)}") from exc
        body = vms.vm_body(config, name=plan.name, size=plan.size, image=plan.image, nic_id=nic.id,
                           ssh_public_key=plan.ssh_public_key, user_data=plan.user_data, tags=plan.tags)
        began = time.monotonic()
        try:
            poller = await az.call(self.clients.arm.virtual_machine_begin_create_or_update,
                                   config.resource_group, plan.name, body)
            launched_in = time.monotonic() - began  # ARM accepted the VM; the poller waits until it is provisioned
            vm = await az.wait(poller)
        except HttpResponseError as exc:
            raise ProviderError(f"creating VM {plan.name} ({plan.size}): {az.describe(exc)}") from exc
        state = arm.properties(vm).get("provisioningState")
        if state != "Succeeded":
            raise ProviderError(f"VM {plan.name} ended in provisioning state {state}")
        log.info("created VM %s (%s) at %s", plan.name, plan.size, nic.private_ip)
        return Instance(vm["id"], vm["name"], (nic.private_ip,), from_azure_tags(vm.get("tags")), instance_type=plan.size,
                        launched_in=launched_in)

    # ---------------------------------------------------------------- delete

    async def _remove(self, rg: str, name: str) -> list[str]:
        """Delete the VM ``name``, then its NIC ``<name>-nic`` and OS disk
        ``<name>-osdisk`` if the VM left them (or never got to use them).

        Each of the three already gone is success. Returns the problems met;
        [] when all three are gone.
        """
        api = self.clients.arm
        try:
            await az.begin(api.virtual_machine_begin_delete, rg, name)
        except AzureError as exc:
            if not az.is_not_found(exc):
                return [f"VM {name}: {az.describe(exc)}"]
        problems = []
        try:
            await network.delete_nic(self.clients, self.config, rg, network.nic_name(name))
        except ProviderError as exc:
            problems.append(str(exc))
        disk = vms.os_disk_name(name)
        try:
            await network.delete_retrying_in_use(
                self.config, f"disk {disk}", lambda: az.begin(api.disk_begin_delete, rg, disk))
        except ProviderError as exc:
            problems.append(str(exc))
        log.info("deleted VM %s%s", name, f" (problems: {'; '.join(problems)})" if problems else " with its NIC and disk")
        return problems


def _nic_refs(vm: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The VM's ``networkProfile.networkInterfaces`` references (``{"id": ...}``)."""
    return list((arm.properties(vm).get("networkProfile") or {}).get("networkInterfaces") or [])


def _fetch_blob(uri: str, vm_name: str) -> str:
    """GET a boot diagnostics blob by its SAS URI (the URI is a credential: never in a message)."""
    import requests

    try:
        response = requests.get(uri, timeout=30)
        response.raise_for_status()
    except requests.RequestException as exc:
        status = getattr(exc.response, "status_code", None)
        raise ConsoleUnavailable(f"serial log blob of VM {vm_name} unreadable ({status or type(exc).__name__})") from None
    return response.content.decode("utf-8", errors="replace")


def _size(vm: Mapping[str, Any]) -> str:
    """The VM's size name (``hardwareProfile.vmSize``), "" when ARM did not say."""
    return str((arm.properties(vm).get("hardwareProfile") or {}).get("vmSize") or "")
