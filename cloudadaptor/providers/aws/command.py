"""``cloud-api-adaptor aws ...``: operator helpers for AWS.

``aws open-ports [--group-id sg-...] [--vxlan-port N]`` opens, in the
worker's security group, what peer pods need between the worker and its pod
VMs: 15150/tcp and VXLAN_PORT/udp, with the group itself as the source.
Idempotent: a second run reports "already open". Credentials and region come
from the same keys as ``serve`` (peer-pods-secret), or boto3's default
chain; an empty region or group is taken from the worker's IMDSv2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Mapping

from cloudadaptor.config import ConfigError, parse_port
from cloudadaptor.providers.aws.config import AwsConfig, parse_sg_id
from cloudadaptor.providers.base import load_provider
from cloudadaptor.wire import AGENT_PORT, VXLAN_PORT

# boto3 is imported by the functions that call AWS, not here: every
# `cloud-api-adaptor` command line (the pod VM's forwarder too) builds this parser.


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``aws`` actions to ``parser``."""
    sub = parser.add_subparsers(dest="aws_command", metavar="ACTION", required=True)
    ports = sub.add_parser("open-ports", help=f"allow {AGENT_PORT}/tcp and VXLAN_PORT/udp within the worker security group (idempotent)")
    ports.add_argument("--group-id", help="security group to open (default: the first of AWS_SG_IDS, else the worker's first)")
    ports.add_argument("--vxlan-port", help=f"VXLAN UDP port (default: VXLAN_PORT or {VXLAN_PORT})")


def _fill_from_worker(config: AwsConfig, group_id: str | None) -> tuple[AwsConfig, str | None, list[str]]:
    """Region and group from the worker's metadata when not given."""
    import boto3

    from cloudadaptor.providers.aws.imds import ImdsClient, ImdsError

    group_id = group_id or (config.security_group_ids[0] if config.security_group_ids else None)
    if config.region is None:
        config = dataclasses.replace(config, region=boto3.session.Session().region_name)
    if config.region and group_id:
        return config, group_id, []
    client = ImdsClient(config.imds_endpoint)
    try:
        found = client.placement()
    except ImdsError as exc:
        missing = [k for k, v in (("AWS_REGION", config.region), ("--group-id / AWS_SG_IDS", group_id)) if not v]
        return config, group_id, [f"{k} is not set and the worker's instance metadata did not answer: {exc}" for k in missing]
    config = dataclasses.replace(config, region=config.region or found.region)
    if group_id is None and found.security_group_ids:
        group_id = found.security_group_ids[0]
    return config, group_id, [] if group_id else ["the worker has no security group; pass --group-id"]


def open_ports(env: Mapping[str, str], group_id: str | None, vxlan_port: int | None) -> tuple[int, list[str]]:
    """(exit code, output lines) of ``aws open-ports``; never raises for AWS errors.

    The settings are loaded as ``serve`` loads them (common keys included)."""
    try:
        settings, config = load_provider(env, provider="aws")
    except ConfigError as exc:
        return 2, [str(p) for p in exc.problems]
    assert isinstance(config, AwsConfig)
    from botocore.exceptions import BotoCoreError, ClientError

    from cloudadaptor.providers.aws import network
    from cloudadaptor.providers.aws.client import describe, make_ec2_client

    config, group_id, missing = _fill_from_worker(config, group_id)
    if missing or group_id is None:
        return 2, missing
    port = vxlan_port or settings.vxlan_port
    try:
        ec2 = make_ec2_client(config)
        return 0, network.open_ports(ec2, group_id, port)
    except (ClientError, BotoCoreError) as exc:
        return 1, [f"{group_id}: {describe(exc, config.credentials.values())}"]


def run(args: argparse.Namespace) -> int:
    """Run the ``aws`` action in ``args`` (parsed by ``build_parser``); the exit code."""
    try:
        group_id = parse_sg_id(args.group_id) if args.group_id else None
        vxlan_port = parse_port(args.vxlan_port) if args.vxlan_port else None
    except ValueError as exc:
        print(f"aws open-ports: {exc}", file=sys.stderr)
        return 2
    code, lines = open_ports(os.environ, group_id, vxlan_port)
    for line in lines:
        print(line, file=sys.stdout if code == 0 else sys.stderr)
    return code
