"""``cloud-api-adaptor azure ...``: operator helpers for Azure.

``open-ports`` adds the inbound NSG rules peer pods need to ``AZURE_NSG_ID``:
15150/tcp (the adaptor dials the pod VM's agent) and ``VXLAN_PORT``/udp (the
pod network tunnel), source and destination the worker subnet's prefix
(``AZURE_SUBNET_ID``'s, or ``--prefix``). Idempotent: run it as often as you
like. Settings come from the same environment as ``serve`` (peer-pods-cm and
peer-pods-secret); the Azure SDK is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys

from cloudadaptor.commandline import print_problems
from cloudadaptor.providers.azure.config import AzureConfig
from cloudadaptor.wire import AGENT_PORT, VXLAN_PORT

# Keys open-ports does not need (it touches only the NSG and reads the subnet).
_NOT_NEEDED = ("AZURE_REGION", "AZURE_RESOURCE_GROUP")


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``azure`` actions to ``parser``."""
    sub = parser.add_subparsers(dest="azure_command", metavar="ACTION", required=True)
    ports = sub.add_parser(
        "open-ports",
        help=f"allow {AGENT_PORT}/tcp and VXLAN_PORT/udp within the worker subnet in AZURE_NSG_ID (idempotent)",
    )
    ports.add_argument("--nsg-id", help="network security group to change (default: AZURE_NSG_ID)")
    ports.add_argument("--prefix", help="source and destination prefix (default: AZURE_SUBNET_ID's address prefix)")
    ports.add_argument("--vxlan-port", help=f"VXLAN UDP port (default: VXLAN_PORT or {VXLAN_PORT})")


def run(args: argparse.Namespace) -> int:
    """Run the chosen action; 0 on success, 2 for bad settings, 1 when Azure refused."""
    return open_ports_command(args)


def open_ports_command(args: argparse.Namespace) -> int:
    from cloudadaptor.config import ConfigError
    from cloudadaptor.providers.base import load_provider

    overrides = {"VXLAN_PORT": args.vxlan_port, "AZURE_NSG_ID": args.nsg_id}
    try:
        _, config = load_provider(os.environ, overrides=overrides, provider="azure", relaxed=_NOT_NEEDED)
    except ConfigError as exc:
        print_problems(exc.problems)
        return 2
    assert isinstance(config, AzureConfig)
    if config.nsg is None:
        print_problems(["AZURE_NSG_ID is not set: expected the network security group to open (or --nsg-id)"])
        return 2
    if args.prefix:
        try:
            prefix = str(ipaddress.ip_network(args.prefix, strict=False))
        except ValueError:
            print_problems([f"--prefix={args.prefix}: expected a CIDR prefix like 10.0.1.0/24"])
            return 2
    else:
        prefix = None
    return asyncio.run(_open_ports(config, prefix))


async def _open_ports(config: AzureConfig, prefix: str | None) -> int:
    from azure.core.exceptions import AzureError

    from cloudadaptor.providers.azure import client as az
    from cloudadaptor.providers.azure import network
    from cloudadaptor.providers.base import ProviderError

    assert config.nsg is not None
    clients = az.build_clients(config)
    try:
        if prefix is None:
            prefix = await network.subnet_prefix(clients, config.subnet)
        for line in await network.open_ports(clients, config, config.nsg, prefix):
            print(line)
    except (AzureError, ProviderError) as exc:
        reason = az.describe(exc) if isinstance(exc, AzureError) else str(exc)
        print(f"open-ports failed on {config.nsg.text}: {reason}", file=sys.stderr)
        return 1
    finally:
        await az.call(clients.close)
    print(f"NSG {config.nsg.name}: peer-pod ports open for {prefix}")
    return 0
