"""Pod VM NICs and the NSG rules peer pods need.

A pod VM has one NIC, ``<vm name>-nic``, in ``AZURE_SUBNET_ID`` (with
``AZURE_NSG_ID`` when set), tagged like the VM. The VM is created with the
NIC's ``deleteOption: Delete``; ``delete_nic`` removes one a VM left behind.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

from azure.core.exceptions import AzureError, HttpResponseError

from cloudadaptor.wire import AGENT_PORT
from cloudadaptor.providers.azure import arm
from cloudadaptor.providers.azure import client as az
from cloudadaptor.providers.azure.config import AzureConfig, ResourceId
from cloudadaptor.providers.azure.tags import to_azure_tags
from cloudadaptor.providers.base import ProviderError
from cloudadaptor.retry import Backoff, RetryTimeout, retry_until

NIC_SUFFIX = "-nic"


def nic_name(vm_name: str) -> str:
    return vm_name + NIC_SUFFIX


def nic_body(config: AzureConfig, tags: Mapping[str, str]) -> dict[str, Any]:
    """The ARM body of a pod VM NIC: dynamic private IP in the subnet, the NSG when set."""
    properties: dict[str, Any] = {
        "ipConfigurations": [{
            "name": "ipconfig1",
            "properties": {
                "subnet": {"id": config.subnet.text},
                "privateIPAllocationMethod": "Dynamic",
                "primary": True,
            },
        }],
    }
    if config.nsg is not None:
        properties["networkSecurityGroup"] = {"id": config.nsg.text}
    return {"location": config.region, "tags": to_azure_tags(tags), "properties": properties}


@dataclass(frozen=True)
class Nic:
    id: str
    private_ip: str


def first_ip(nic: Mapping[str, Any]) -> str | None:
    """The first private IP address of a NIC (ARM JSON), None when it has none yet."""
    for config in arm.properties(nic).get("ipConfigurations") or []:
        ip = arm.properties(config).get("privateIPAddress")
        if ip:
            return str(ip)
    return None


def nic_of(resource: Mapping[str, Any]) -> Nic:
    """The id and private IP of a NIC (ARM JSON); ProviderError when it has no IP."""
    ip = first_ip(resource)
    if not ip:
        raise ProviderError(f"NIC {resource.get('id')} has no private IP address")
    return Nic(resource["id"], ip)


async def create_nic(clients: az.AzureClients, config: AzureConfig, vm_name: str, tags: Mapping[str, str]) -> Nic:
    """Create (or update: PUT is idempotent) the VM's NIC and return it. Blocks until provisioned."""
    poller_result = await az.begin(
        clients.arm.network_interface_begin_create_or_update,
        config.resource_group, nic_name(vm_name), nic_body(config, tags),
    )
    return nic_of(poller_result)


async def delete_nic(clients: az.AzureClients, config: AzureConfig, resource_group: str, name: str) -> None:
    """Delete a NIC. Gone is success; "in use" (a VM just deleted still holds
    it) is retried up to ``config.in_use_timeout``, then ProviderError."""
    await delete_retrying_in_use(
        config, f"NIC {name}",
        lambda: az.begin(clients.arm.network_interface_begin_delete, resource_group, name),
    )


async def delete_retrying_in_use(config: AzureConfig, what: str, attempt: Callable[[], Awaitable[Any]]) -> None:
    """Run ``attempt()`` (a delete) until it succeeds or finds nothing to delete.

    Retries only "in use" refusals, up to ``config.in_use_timeout``; other
    errors (and the timeout) raise ProviderError naming ``what``.
    """
    async def once() -> None:
        try:
            await attempt()
        except HttpResponseError as exc:
            if not az.is_not_found(exc):
                raise

    try:
        await retry_until(config.in_use_timeout, once, retryable=az.is_in_use,
                                 backoff=Backoff(initial=config.in_use_backoff, maximum=max(config.in_use_backoff, 15.0)))
    except RetryTimeout as exc:
        raise ProviderError(f"deleting {what}: still in use after {exc.elapsed:.0f}s: "
                            f"{az.describe(exc.last_error) if exc.last_error else ''}") from exc
    except AzureError as exc:
        raise ProviderError(f"deleting {what}: {az.describe(exc)}") from exc


async def subnet_prefix(clients: az.AzureClients, subnet: ResourceId) -> str:
    """The subnet's (first) IPv4 address prefix, e.g. ``10.0.1.0/24``."""
    vnet, name = subnet.names
    found = arm.properties(await az.call(clients.arm.subnet_get, subnet.resource_group, vnet, name))
    prefixes = [found["addressPrefix"]] if found.get("addressPrefix") else list(found.get("addressPrefixes") or [])
    for prefix in prefixes:
        if isinstance(ipaddress.ip_network(prefix, strict=False), ipaddress.IPv4Network):
            return prefix
    raise ProviderError(f"subnet {subnet.text} has no IPv4 address prefix")


# ----------------------------------------------------------------- NSG rules


def port_rules(prefix: str, vxlan_port: int) -> dict[str, dict[str, Any]]:
    """The inbound rules peer pods need, by rule name: the agent (15150/tcp) and
    VXLAN (``vxlan_port``/udp), source and destination ``prefix``. No priority."""
    def rule(protocol: str, port: int, what: str) -> dict[str, Any]:
        return {
            "description": f"peer pods: {what}",
            "protocol": protocol,
            "sourceAddressPrefix": prefix,
            "sourcePortRange": "*",
            "destinationAddressPrefix": prefix,
            "destinationPortRange": str(port),
            "access": "Allow",
            "direction": "Inbound",
        }

    return {
        f"peerpods-agent-{AGENT_PORT}-tcp": rule("Tcp", AGENT_PORT, "kata agent protocol (adaptor to pod VM)"),
        f"peerpods-vxlan-{vxlan_port}-udp": rule("Udp", vxlan_port, "VXLAN tunnel between worker and pod VM"),
    }


def _same_rule(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    have = arm.properties(existing)
    return all(str(have.get(k) or "").lower() == str(v).lower() for k, v in wanted.items() if k != "description")


def _free_priority(taken: set[int], first: int) -> int:
    for priority in range(first, 4097):
        if priority not in taken:
            return priority
    raise ProviderError(f"no free inbound rule priority from {first} to 4096 in the NSG")


async def open_ports(clients: az.AzureClients, config: AzureConfig, nsg: ResourceId, prefix: str,
                     first_priority: int = 3000) -> list[str]:
    """Make ``port_rules`` exist in ``nsg``; one line per rule saying what was done.

    Idempotent: a rule already right is left alone, a rule of ours that differs
    is updated in place (keeping its priority), a missing one gets the lowest
    free inbound priority from ``first_priority``.
    """
    rules = await az.call(lambda: list(clients.arm.security_rules_list(nsg.resource_group, nsg.name)))
    existing = {r["name"]: r for r in rules}
    taken = {arm.properties(r).get("priority") for r in existing.values()
             if str(arm.properties(r).get("direction") or "").lower() == "inbound"}
    lines = []
    for name, wanted in port_rules(prefix, config.vxlan_port).items():
        current = existing.get(name)
        if current is not None and _same_rule(current, wanted):
            lines.append(f"rule {name} already present (priority {arm.properties(current).get('priority')})")
            continue
        if current is not None:
            priority = arm.properties(current)["priority"]
        else:
            priority = _free_priority(taken, first_priority)
            taken.add(priority)
        body = {"properties": {**wanted, "priority": priority}}
        await az.begin(clients.arm.security_rule_begin_create_or_update, nsg.resource_group, nsg.name, name, body)
        verb = "updated" if current is not None else "created"
        lines.append(f"rule {name} {verb}: inbound {wanted['protocol'].lower()}/{wanted['destinationPortRange']} "
                     f"from {prefix} to {prefix} (priority {priority})")
    return lines
