"""Startup checks of the Azure configuration: one line per problem, naming the key.

Order: the SSH key file (local), a token, the resource group (which also
proves the subscription and that ARM accepts the token); when those fail the
rest would only repeat the same error, so it stops there. Then subnet, NSG,
image (a managed image is refused for confidential VMs: only a gallery image
version can boot one) and the region's sizes. Secrets never appear in a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from azure.core.exceptions import AzureError, ClientAuthenticationError

from cloudadaptor.providers.azure import arm
from cloudadaptor.providers.azure import client as az
from cloudadaptor.providers.azure import vms
from cloudadaptor.providers.azure.config import AzureConfig, read_ssh_public_key
from cloudadaptor.providers.selection import InstanceTypeInfo


def credential_keys(config: AzureConfig) -> str:
    """How the credential was configured, for messages."""
    if config.client_secret:
        return "AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET (client secret)"
    return "credentials (DefaultAzureCredential: workload identity, managed identity, ...)"


def cvm_managed_image_problem(image_id: str) -> str:
    """The one line refusing a managed image for confidential VMs, and what to build instead."""
    return (f"AZURE_IMAGE_ID={image_id}: a managed image cannot boot a confidential VM (DISABLECVM is unset or "
            "false); publish it to a gallery with `cloud-api-adaptor image build azure --gallery NAME` and set "
            "AZURE_IMAGE_ID to the version id it prints, or set DISABLECVM=true for ordinary VMs")


async def _lookup(what: str, fn: Callable[[], Awaitable[Any]]) -> str | None:
    """None when ``fn()`` finds the resource, else the reason (``what`` not found, or the error)."""
    try:
        await fn()
    except AzureError as exc:
        if az.is_not_found(exc):
            return f"{what} not found ({az.error_code(exc) or 'NotFound'})"
        return f"cannot read {what}: {az.describe(exc)}"
    return None


async def _access(clients: az.AzureClients, config: AzureConfig) -> list[str]:
    """Token, subscription, resource group (and ARM accepting the token)."""
    try:
        await az.call(clients.credential.get_token, clients.scope)
    except AzureError as exc:
        return [f"{credential_keys(config)}: cannot get a token for {clients.scope}: {az.describe(exc)}"]
    rg = config.resource_group
    try:
        pages = clients.arm.virtual_machines_list(rg)
        await az.call(lambda: next(iter(pages), None))
    except ClientAuthenticationError as exc:
        return [f"{credential_keys(config)}: {config.arm_endpoint} refused the token: {az.describe(exc)}"]
    except AzureError as exc:
        code = az.error_code(exc)
        if code in ("SubscriptionNotFound", "InvalidSubscriptionId"):
            return [f"AZURE_SUBSCRIPTION_ID={config.subscription_id}: subscription not found ({code})"]
        if az.is_not_found(exc):
            return [f"AZURE_RESOURCE_GROUP={rg}: resource group not found in subscription "
                    f"{config.subscription_id} ({code or 'NotFound'})"]
        if az.status_code(exc) == 403:
            return [f"AZURE_RESOURCE_GROUP={rg}: the identity may not list VMs there: {az.describe(exc)}"]
        return [f"AZURE_RESOURCE_GROUP={rg}: {az.describe(exc)}"]
    return []


@dataclass
class CheckResult:
    """What the checks found: problems (one line each), and what they learnt on the way."""

    problems: list[str] = field(default_factory=list)
    catalog: dict[str, InstanceTypeInfo] | None = None  # the region's sizes, None if not listed
    subnet_prefix: str | None = None  # AZURE_SUBNET_ID's first address prefix


async def _resources(clients: az.AzureClients, config: AzureConfig, result: CheckResult) -> None:
    api = clients.arm
    problems = result.problems
    vnet, subnet = config.subnet.names
    subnets: list[Any] = []

    async def get_subnet() -> None:
        subnets.append(await az.call(api.subnet_get, config.subnet.resource_group, vnet, subnet))

    reason = await _lookup("subnet", get_subnet)
    if reason:
        problems.append(f"AZURE_SUBNET_ID={config.subnet.text}: {reason}")
    else:
        found = arm.properties(subnets[0])
        result.subnet_prefix = found.get("addressPrefix") or next(iter(found.get("addressPrefixes") or []), None)
    if config.nsg is not None:
        nsg = config.nsg
        reason = await _lookup("network security group",
                               lambda: az.call(api.network_security_group_get, nsg.resource_group, nsg.name))
        if reason:
            problems.append(f"AZURE_NSG_ID={nsg.text}: {reason}")
    if config.image is not None:
        image = config.image
        found: list[Any] = []

        async def get_image() -> None:
            found.append(await vms.get_image(clients, config, image))

        reason = await _lookup("image", get_image)
        location = str(found[0].get("location") or "").replace(" ", "").lower() if found else ""
        if reason:
            problems.append(f"AZURE_IMAGE_ID={image.text}: {reason}")
        elif image.kind == "managed" and location and location != config.region:
            problems.append(f"AZURE_IMAGE_ID={image.text}: the image is in {location}, "
                            f"expected AZURE_REGION {config.region} (copy it to a gallery replicated there)")
        if not reason and image.kind == "managed" and not config.disable_cvm:
            problems.append(cvm_managed_image_problem(image.text))


def _size_problems(config: AzureConfig, catalog: dict[str, InstanceTypeInfo]) -> list[str]:
    if not catalog:
        return [f"AZURE_REGION={config.region}: no VM sizes are offered there to this subscription "
                "(is the region name right?)"]
    problems = []
    if config.size not in catalog:
        problems.append(f"AZURE_INSTANCE_SIZE={config.size}: not offered in {config.region} to this subscription")
    missing = [s for s in config.sizes if s not in catalog and s != config.size]
    if missing:
        problems.append(f"AZURE_INSTANCE_SIZES={','.join(config.sizes)}: not offered in {config.region}: "
                        + ", ".join(missing))
    return problems


async def run(clients: az.AzureClients, config: AzureConfig) -> CheckResult:
    """Check everything (see the module docstring); never raises for a cloud error."""
    result = CheckResult()
    try:
        read_ssh_public_key(config.ssh_pub_key_path)
    except ValueError as exc:
        result.problems.append(f"SSH_PUB_KEY_PATH={config.ssh_pub_key_path}: {exc}")
    if config.use_public_ip:
        result.problems.append("USE_PUBLIC_IP=true: not supported by the azure provider (pod VMs get private "
                               "addresses; the adaptor must reach AZURE_SUBNET_ID)")
    access = await _access(clients, config)
    if access:
        result.problems += access
        return result
    await _resources(clients, config, result)
    try:
        result.catalog = await vms.load_catalog(clients, config)
    except AzureError as exc:
        result.problems.append(f"AZURE_REGION={config.region}: cannot list VM sizes: {az.describe(exc)}")
    else:
        result.problems += _size_problems(config, result.catalog)
    return result
