"""Pod VM bodies, the region's size catalog and image look-ups.

Pure functions build and read the ARM JSON (easy to test, read like the ARM
docs); the async ones make the calls (``arm``) in a worker thread.
"""

from __future__ import annotations

import base64
from typing import Any, Iterable, Mapping

from cloudadaptor.providers.azure import client as az
from cloudadaptor.providers.azure.config import AzureConfig, ImageRef
from cloudadaptor.providers.azure.tags import to_azure_tags
from cloudadaptor.providers.selection import InstanceTypeInfo

OS_DISK_SUFFIX = "-osdisk"


def os_disk_name(vm_name: str) -> str:
    return vm_name + OS_DISK_SUFFIX


def vm_id(subscription_id: str, resource_group: str, name: str) -> str:
    return (f"/subscriptions/{subscription_id}/resourceGroups/{resource_group}"
            f"/providers/Microsoft.Compute/virtualMachines/{name}")


def security_profile(config: AzureConfig) -> dict[str, Any] | None:
    """Confidential VM unless DISABLECVM; Trusted Launch for secure boot without CVM; else none."""
    uefi = {"secureBootEnabled": config.secure_boot, "vTpmEnabled": True}
    if not config.disable_cvm:
        return {"securityType": "ConfidentialVM", "uefiSettings": uefi}
    if config.secure_boot:
        return {"securityType": "TrustedLaunch", "uefiSettings": uefi}
    return None


def vm_body(
    config: AzureConfig,
    *,
    name: str,
    size: str,
    image: ImageRef,
    nic_id: str,
    ssh_public_key: str,
    user_data: str,
    tags: Mapping[str, str],
) -> dict[str, Any]:
    """The ARM body of a pod VM.

    SSH key only (password authentication disabled), user data base64 in
    ``userData`` (what the VM reads from IMDS), OS disk and NIC deleted with
    the VM, confidential-VM security profile unless DISABLECVM.
    """
    managed_disk: dict[str, Any] = {}
    if not config.disable_cvm:
        managed_disk["securityProfile"] = {"securityEncryptionType": "VMGuestStateOnly"}
    os_disk: dict[str, Any] = {
        "name": os_disk_name(name),
        "createOption": "FromImage",
        "caching": "ReadWrite",
        "deleteOption": "Delete",
        "managedDisk": managed_disk,
    }
    if config.root_volume_gib > 0:
        os_disk["diskSizeGB"] = config.root_volume_gib
    properties: dict[str, Any] = {
        "hardwareProfile": {"vmSize": size},
        "storageProfile": {"imageReference": image.reference(), "osDisk": os_disk},
        "osProfile": {
            "computerName": name,
            "adminUsername": config.ssh_username,
            "linuxConfiguration": {
                "disablePasswordAuthentication": True,
                "ssh": {"publicKeys": [{
                    "path": f"/home/{config.ssh_username}/.ssh/authorized_keys",
                    "keyData": ssh_public_key.strip(),
                }]},
            },
        },
        "networkProfile": {"networkInterfaces": [
            {"id": nic_id, "properties": {"primary": True, "deleteOption": "Delete"}},
        ]},
        "userData": base64.b64encode(user_data.encode("utf-8")).decode("ascii"),
        # Managed boot diagnostics: the serial log the adaptor shows when a VM's agent never answers.
        "diagnosticsProfile": {"bootDiagnostics": {"enabled": True}},
    }
    profile = security_profile(config)
    if profile is not None:
        properties["securityProfile"] = profile
    return {"location": config.region, "tags": to_azure_tags(tags), "properties": properties}


# -------------------------------------------------------------------- sizes


def _capability(sku: Mapping[str, Any], name: str) -> str | None:
    for capability in sku.get("capabilities") or []:
        if capability.get("name") == name:
            return capability.get("value")
    return None


def _restricted(sku: Mapping[str, Any], region: str) -> bool:
    """True when the subscription may not use ``sku`` in ``region`` (a Location restriction)."""
    for restriction in sku.get("restrictions") or []:
        values = restriction.get("values") or []
        if str(restriction.get("type") or "").lower() == "location" and region in [v.lower() for v in values]:
            return True
    return False


def catalog_from_skus(skus: Iterable[Mapping[str, Any]], region: str) -> dict[str, InstanceTypeInfo]:
    """VM sizes offered to this subscription in ``region``, from resource SKUs (ARM JSON)."""
    catalog = {}
    for sku in skus:
        if str(sku.get("resourceType") or "").lower() != "virtualmachines":
            continue
        if region not in [loc.lower() for loc in sku.get("locations") or []] or _restricted(sku, region):
            continue
        try:
            vcpus = int(_capability(sku, "vCPUs") or 0)
            memory_mib = int(float(_capability(sku, "MemoryGB") or 0) * 1024)
            gpus = int(_capability(sku, "GPUs") or 0)
        except ValueError:
            continue
        catalog[sku["name"]] = InstanceTypeInfo(sku["name"], vcpus, memory_mib, gpus)
    return catalog


async def load_catalog(clients: az.AzureClients, config: AzureConfig) -> dict[str, InstanceTypeInfo]:
    """The region's size catalog (one paged ``resourceSkus`` list)."""
    def fetch() -> list[Any]:
        return list(clients.arm.resource_skus_list(filter=f"location eq '{config.region}'"))

    return catalog_from_skus(await az.call(fetch), config.region)


# ------------------------------------------------------------------- images


async def get_image(clients: az.AzureClients, config: AzureConfig, image: ImageRef) -> dict[str, Any]:
    """Look the image up (raises azure-core's ``ResourceNotFoundError`` when it does not exist)."""
    arm = clients.arm
    if image.kind == "managed":
        _, rg, name = image.parts
        return await az.call(arm.image_get, rg, name)
    if image.kind == "gallery":
        _, rg, gallery, definition, version = image.parts
        return await az.call(arm.gallery_image_version_get, rg, gallery, definition, version)
    gallery, definition, version = image.parts
    kind = "sharedGalleries" if image.kind == "shared" else "communityGalleries"
    return await az.call(arm.location_gallery_image_version_get, kind, config.region, gallery, definition, version)
