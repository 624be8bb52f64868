"""Helpers for the image build tests: payload archives, tree snapshots, systemd units, the two fake clouds."""

from __future__ import annotations


import argparse
import asyncio
import base64
import configparser
import dataclasses
import hashlib
import io
import os
import stat
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from cloudadaptor.imagebuild import command
from cloudadaptor.imagebuild.common import NAME_PREFIX, TAG_BUILD

AGENT = b"#!/bin/sh\necho 'fake kata-agent'\n"
REGION = "us-east-1"
ACCESS_KEY = "AKIAIMAGEBUILDTEST01"
SECRET_KEY = "image-build-secret/never-shown-0123456789"
NAMESPACE = "openshift-sandboxed-containers-operator"


def _configmaps() -> Any:
    from fakes.kubeapi import Resource

    return Resource("", "v1", "configmaps", "ConfigMap", True, status_subresource=False)


CONFIGMAPS = _configmaps()


def make_payload(path: Path, members: Mapping[str, bytes] | None = None, mode: str = "w:gz") -> Path:
    """A payload archive holding ``members`` (default: ``./usr/bin/kata-agent``, a shell script)."""
    members = {"./usr/bin/kata-agent": AGENT} if members is None else members
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            archive.addfile(info, io.BytesIO(data))
    return path


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under ``root``: (kind, mode, sha256 of the content | link target)."""
    tree: dict[str, tuple[Any, ...]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            info = path.lstat()
            relative = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                tree[relative] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                tree[relative] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                tree[relative] = ("file", stat.S_IMODE(info.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
    return tree


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit: section -> key -> values (space-separated lists split, repeated keys appended)."""
    parser = configparser.RawConfigParser(strict=False, dict_type=_MultiDict, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return {s: {k: v.split("\n") if "\n" in v else [v] for k, v in parser[s].items()} for s in parser.sections()}


class _MultiDict(dict):
    """Repeated keys (ExecStart=...) kept, joined with newlines."""

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self and isinstance(value, list) and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def words(unit: Mapping[str, Mapping[str, list[str]]], section: str, key: str) -> list[str]:
    return [w for value in unit.get(section, {}).get(key, []) for w in value.split()]


def run_cli(argv: list[str], env: Mapping[str, str], factory: command.BackendFactory) -> tuple[int, str, str]:
    """``cloud-api-adaptor image ...`` through the real parser: (exit status, stdout, stderr)."""
    from cloudadaptor.cli import build_parser

    args = build_parser().parse_args(["image", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = command.run(args, env=env, backend_factory=factory, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


Factory = Callable[[str, Mapping[str, str], argparse.Namespace], Any]


# ------------------------------------------------------------------ AWS


@dataclass
class AwsWorld:
    """One test's EC2 in moto: a VPC in 203.0.113.0/24, a subnet, the workers' security group, a base AMI."""

    ec2: Any
    vpc_id: str
    subnet_id: str
    sg_id: str
    base_ami: str
    backends: list[Any] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "CLOUD_PROVIDER": "aws", "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_SUBNET_ID": self.subnet_id, "AWS_VPC_ID": self.vpc_id,
            "AWS_SG_IDS": self.sg_id, "TAGS": "cluster=test-cluster", **extra,
        }

    def builder_host_key(self) -> Any:
        """The host key the newest builder instance's user data gives it (None before launch)."""
        found = self.ec2.describe_instances(Filters=[{"Name": "tag:Name", "Values": ["peerpod-image-builder-*"]}])
        described = [i for r in found["Reservations"] for i in r["Instances"]]
        if not described:
            return None
        newest = max(described, key=lambda i: i["LaunchTime"])
        data = self.ec2.describe_instance_attribute(InstanceId=newest["InstanceId"], Attribute="userData")
        return host_key_in(base64.b64decode(data["UserData"]["Value"]).decode())

    def factory(self, on_client: Callable[[Any], None] | None = None) -> command.BackendFactory:
        """Backends as the CLI makes them, without waits between polls; ``on_client`` sees each EC2 client."""
        from cloudadaptor.imagebuild import aws

        def make(cloud: str, env: Mapping[str, str], args: argparse.Namespace) -> Any:
            config, _ = aws.load_config(env)
            backend = aws.AwsImageBackend(config, poll_interval=0, ssh_cidrs=tuple(getattr(args, "ssh_cidr", None) or ()), timeout=30)
            if on_client is not None:
                on_client(backend.ec2)
            self.backends.append(backend)
            return backend

        return make

    def images(self, name: str | None = None) -> list[dict[str, Any]]:
        filters = [{"Name": "name", "Values": [name]}] if name else []
        return self.ec2.describe_images(Owners=["self"], Filters=filters)["Images"]

    def leftovers(self) -> dict[str, list[str]]:
        """Temporary resources of any build that still exist (should be none after a build)."""
        live = [i["InstanceId"] for r in self.ec2.describe_instances(
            Filters=[{"Name": "tag-key", "Values": [TAG_BUILD]}])["Reservations"] for i in r["Instances"]
            if i["State"]["Name"] not in ("terminated", "shutting-down")]
        keys = [k["KeyName"] for k in self.ec2.describe_key_pairs()["KeyPairs"] if k["KeyName"].startswith(NAME_PREFIX)]
        groups = [g["GroupName"] for g in self.ec2.describe_security_groups()["SecurityGroups"]
                  if g["GroupName"].startswith(NAME_PREFIX)]
        volumes = [v["VolumeId"] for v in self.ec2.describe_volumes(
            Filters=[{"Name": "tag-key", "Values": [TAG_BUILD]}])["Volumes"] if v["State"] != "deleted"]
        return {k: v for k, v in (("instances", live), ("key pairs", keys), ("security groups", groups),
                                  ("volumes", volumes)) if v}


def host_key_in(cloud_config: str) -> Any:
    """The host key a ``#cloud-config`` installs (``ssh_keys.ecdsa_private``), as cloud-init would."""
    import io

    import paramiko
    import yaml

    keys = (yaml.safe_load(cloud_config) or {}).get("ssh_keys") or {}
    private = keys.get("ecdsa_private")
    return paramiko.ECDSAKey.from_private_key(io.StringIO(private)) if private else None


# ------------------------------------------------------------------ Azure


@dataclass
class AzureWorld:
    """One test's Azure behind the fake ARM endpoint: resource group, subnet, NSG, sizes, RHEL 9 in the marketplace."""

    arm: Any
    resource_group: str
    subnet_id: str
    nsg_id: str
    public_key: Path

    def builder_host_key(self) -> Any:
        """The host key the builder VM's customData gives it (None before launch)."""
        vm = self.builder_vm()
        custom = vm["properties"]["osProfile"].get("customData") if vm else None
        return host_key_in(base64.b64decode(custom).decode()) if custom else None

    def builder_vm(self) -> dict[str, Any] | None:
        ids = [i for i in self.arm.ids("virtualMachines") if "/peerpod-image-builder-" in i]
        return self.arm.resource(ids[-1]) if ids else None

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "CLOUD_PROVIDER": "azure", "AZURE_SUBSCRIPTION_ID": self.arm.subscription_id,
            "AZURE_REGION": self.arm.location, "AZURE_RESOURCE_GROUP": self.resource_group,
            "AZURE_SUBNET_ID": self.subnet_id, "AZURE_NSG_ID": self.nsg_id, "DISABLECVM": "true",
            "SSH_PUB_KEY_PATH": str(self.public_key), "AZURE_RESOURCE_MANAGER_ENDPOINT": self.arm.base_url,
            "TAGS": "cluster=test-cluster", **extra,
        }

    def factory(self) -> command.BackendFactory:
        """Backends as the CLI makes them, with a static token and no waits between polls."""
        from cloudadaptor.imagebuild import azure
        from cloudadaptor.providers.azure.client import build_clients
        from fakes.armserver import FAST_TUNING, StaticTokenCredential

        def make(cloud: str, env: Mapping[str, str], args: argparse.Namespace) -> Any:
            config = dataclasses.replace(azure.load_config(env), **FAST_TUNING)
            return azure.AzureImageBackend(config, build_clients(config, StaticTokenCredential()))

        return make

    def image(self, name: str) -> dict[str, Any] | None:
        return self.arm.resource(f"/subscriptions/{self.arm.subscription_id}/resourceGroups/{self.resource_group}"
                                 f"/providers/Microsoft.Compute/images/{name}")

    def leftovers(self) -> dict[str, list[str]]:
        found = {kind: self.arm.ids(kind) for kind in ("virtualMachines", "networkInterfaces", "disks")}
        return {k: v for k, v in found.items() if v}


# ------------------------------------------------------------------ Kubernetes


class KubeInThread:
    """``KubeApiServer`` on its own event loop thread, for the synchronous builder to talk to."""

    def __init__(self, resources: tuple[Any, ...]) -> None:
        from fakes.kubeapi import KubeApiServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kubeapi", daemon=True)
        self.server = KubeApiServer(resources=resources)

    def start(self) -> KubeInThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# ------------------------------------------------------------------ the installed pod VM

BOOT_ORDER = ("process-user-data.service", "netns@podns.service", "peerpod-claim.service",
              "peerpod-network.service", "kata-agent.service", "agent-protocol-forwarder.service")


def _unit_file(unit: str) -> str:
    """netns@podns.service -> netns@.service (the template an instance comes from)."""
    name, _, suffix = unit.partition("@")
    return f"{name}@.service" if suffix else unit


def load_units(root: Path) -> dict[str, dict[str, dict[str, list[str]]]]:
    """The boot units as installed under ``root`` (instances resolved to their template, %I = podns)."""
    units = {}
    for unit in BOOT_ORDER:
        parsed = parse_unit(root / "etc/systemd/system" / _unit_file(unit))
        units[unit] = {s: {k: [v.replace("%I", "podns") for v in vals] for k, vals in keys.items()}
                       for s, keys in parsed.items()}
    return units


def starts_before(units: Mapping[str, Mapping[str, Mapping[str, list[str]]]], first: str, second: str) -> bool:
    """Whether systemd orders ``first`` before ``second`` (After=/Before=, transitively)."""
    edges: dict[str, set[str]] = {}
    for name, unit in units.items():
        for other in words(unit, "Unit", "After"):
            edges.setdefault(other, set()).add(name)
        for other in words(unit, "Unit", "Before"):
            edges.setdefault(name, set()).add(other)
    seen, todo = set(), [first]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return second in seen


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def assert_pod_vm_installed(root: Path, agent: bytes = AGENT) -> None:
    """The pod VM under ``root``: agent, components, units in boot order and enabled, forwarder wired to the agent."""
    from cloudadaptor.userdata import APF_CONFIG_PATH

    assert (root / "usr/local/bin/kata-agent").read_bytes() == agent
    assert os.access(root / "usr/local/bin/kata-agent", os.X_OK)
    assert (root / "opt/peerpod/lib/cloudadaptor/podvm/forwarder.py").is_file()
    launcher = (root / "usr/local/bin/cloud-api-adaptor").read_text()
    assert "/opt/peerpod/lib" in launcher and "from cloudadaptor.cli import main" in launcher
    units = load_units(root)
    for earlier, later in zip(BOOT_ORDER, BOOT_ORDER[1:]):
        assert starts_before(units, earlier, later), f"{earlier} must start before {later}"
        assert not starts_before(units, later, earlier), f"{later} is also ordered before {earlier}"
    for unit in BOOT_ORDER:
        link = root / "etc/systemd/system/multi-user.target.wants" / unit
        assert os.readlink(link) == f"/etc/systemd/system/{_unit_file(unit)}", f"{unit} is not enabled"
    agent_unit, forwarder = units["kata-agent.service"], units["agent-protocol-forwarder.service"]
    assert "netns@podns.service" in words(agent_unit, "Unit", "BindsTo")
    assert words(agent_unit, "Service", "ExecStart")[0] == "/usr/local/bin/kata-agent"
    assert "peerpod-network.service" in words(forwarder, "Unit", "Requires"), "no forwarder without the pod network"
    command = words(forwarder, "Service", "ExecStart")
    assert command[:2] == ["/usr/local/bin/cloud-api-adaptor", "forwarder"]
    settings = env_file(root / "etc/default/agent-protocol-forwarder")
    assert settings["APF_CONFIG"] == APF_CONFIG_PATH
    server_addr = (root / "etc/agent-config.toml").read_text().split('server_addr = "unix://', 1)[1].split('"')[0]
    assert settings["KATA_AGENT_SOCKET"] == server_addr, "the forwarder must dial the socket the agent serves"
    assert "${KATA_AGENT_SOCKET}" in command and "${APF_CONFIG}" in command
    network = words(units["peerpod-network.service"], "Service", "ExecStart")
    assert network[1:] == ["pod-network", "--config", APF_CONFIG_PATH, "--podns", "podns"]
