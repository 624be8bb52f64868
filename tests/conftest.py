"""Shared fixtures: the private namespace check, local clouds and pod netns.

Network tests need the private user + network + mount namespace the README's
test command (``make test``) runs pytest in. Outside it they are skipped — or
fail under CI, where skipping would hide them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest

from cloudadaptor.dev import privatens
from qemu_support import podvm_wheel, qemu_image, thirdparty_qemu_image  # noqa: F401 - fixtures
from links import delete_link

_serial = itertools.count(1)


@pytest.fixture(scope="session")
def private_ns() -> None:
    """Require the private namespace (``make test``); skip outside it, fail under CI."""
    if privatens.inside():
        return
    if os.environ.get("CI") == "true":
        pytest.fail("network tests must run inside the private namespace: use `make test`")
    pytest.skip("needs the private namespace: run via `make test` (CI=true fails instead)")


# --------------------------------------------------------------------- pod netns


@pytest.fixture
def make_pod_netns(private_ns: None) -> Iterator[Callable[..., object]]:
    """Factory: ``make_pod_netns("198.51.100.10/24", "198.51.100.1")`` -> PodNetns; all deleted at teardown."""
    from cloudadaptor.dev import podnet

    made: list[podnet.PodNetns] = []

    def make(pod_ip_cidr: str = "198.51.100.10/24", gateway: str = "198.51.100.1") -> podnet.PodNetns:
        pod = podnet.create_pod_netns(f"pod-{os.getpid()}-{next(_serial)}", pod_ip_cidr, gateway)
        made.append(pod)
        return pod

    yield make
    for pod in made:
        pod.delete()
        assert not os.path.exists(pod.path), f"pod netns {pod.path} left behind"


# ------------------------------------------------------------------ local cloud


@dataclass
class LocalCloud:
    """A test's own local cloud: unique bridge and /26 subnet, a tmp cloud dir.

    ``provider(**changes)`` makes a LocalProvider over it (changes replace
    LocalConfig fields, e.g. ``boot_delay=0.5``); several may share the cloud.
    """

    config: object  # LocalConfig
    providers: list[object] = field(default_factory=list)

    def provider(self, **changes: object):  # -> LocalProvider
        from cloudadaptor.providers.local import LocalProvider

        provider = LocalProvider(dataclasses.replace(self.config, **changes))
        self.providers.append(provider)
        return provider

    @property
    def cloud_dir(self) -> Path:
        return self.config.cloud_dir  # type: ignore[attr-defined]

    def instance_ids(self) -> list[str]:
        from cloudadaptor.providers.local import ID_PATTERN

        if not self.cloud_dir.is_dir():
            return []
        return sorted(p.name for p in self.cloud_dir.iterdir() if ID_PATTERN.fullmatch(p.name))

    def vm_processes(self) -> list[int]:
        """PIDs of this cloud's running VM inits."""
        return _vm_processes(self.cloud_dir)


def _network_names() -> tuple[set[str], set[str]]:
    """(netns names in /run/netns, link names in this netns)."""
    from pyroute2 import IPRoute

    try:
        namespaces = set(os.listdir("/run/netns"))
    except FileNotFoundError:
        namespaces = set()
    with IPRoute() as ipr:
        links = {link.get("IFLA_IFNAME") for link in ipr.get_links()}
    return namespaces, links


def _vm_processes(cloud_dir: Path) -> list[int]:
    """PIDs of running processes of ``cloud_dir``'s VMs: their command line names an instance dir in it
    (a launcher), or their ``/run`` is the bind mount of an instance's ``run`` (every process inside a
    VM, whose init is a fork of the fork server and has its command line)."""
    tail = re.escape(f"/{cloud_dir.parent.name}/{cloud_dir.name}/")
    vm_run = re.compile(tail + r"i-local-[0-9a-f]{12}/run")
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{entry}/mountinfo") as f:
                mounts = [line.split() for line in f]
        except OSError:
            continue
        if any(arg.startswith(str(cloud_dir).encode() + b"/") for arg in args) or any(
            len(m) > 4 and m[4] == "/run" and vm_run.search(m[3]) and m[3].endswith("/run") for m in mounts
        ):
            pids.append(int(entry))
    return pids


@pytest.fixture
async def local_cloud(private_ns: None, tmp_path: Path) -> AsyncIterator[LocalCloud]:
    """A LocalCloud; at teardown every instance is deleted, the bridge removed, and
    the test fails if any netns, veth or VM process of it is left."""
    from cloudadaptor.providers.local import LocalConfig, LocalProvider

    n = next(_serial)
    config = LocalConfig(
        cloud_dir=tmp_path / "local-cloud",
        cidr=ipaddress.IPv4Network(f"192.0.2.{64 * (n % 4)}/26"),
        bridge=f"ppt{os.getpid() % 10000}-{n}"[:15],
    )
    before_ns, before_links = await asyncio.to_thread(_network_names)
    cloud = LocalCloud(config)
    yield cloud
    cleaner = LocalProvider(config)
    for instance_id in cloud.instance_ids():
        await cleaner.delete_instance(instance_id)
    for provider in [*cloud.providers, cleaner]:
        await provider.close()  # type: ignore[attr-defined]  # stops its fork server
    await asyncio.to_thread(delete_link, config.bridge)
    after_ns, after_links = await asyncio.to_thread(_network_names)
    leaked_ns = sorted(n for n in after_ns - before_ns if n.startswith("i-local-"))
    leaked_links = sorted(n for n in after_links - before_links if n.startswith("lc-") or n == config.bridge)
    assert not leaked_ns, f"VM network namespaces left behind: {leaked_ns}"
    assert not leaked_links, f"links left behind: {leaked_links}"
    assert not cloud.vm_processes(), "VM processes left running"
    assert not cloud.instance_ids(), "instance directories left behind"


@pytest.fixture
def local_provider(local_cloud: LocalCloud):  # -> LocalProvider
    return local_cloud.provider()


# ------------------------------------------------------------------------ moto


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server (HTTP on 127.0.0.1, any free port) for the whole session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def fresh_moto(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """moto reset to empty; boto3 reaches it through AWS_ENDPOINT_URL only, with no
    profile, credentials file, retry override or instance metadata of the machine."""
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(moto_endpoint + "/moto-api/reset", method="POST"), timeout=30):
        pass
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    for name in ("AWS_ENDPOINT_URL_EC2", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "AWS_EC2_METADATA_SERVICE_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # boto3's own credential lookups
    return moto_endpoint


# ----------------------------------------------------------------------- Azure


@pytest.fixture
def arm(monkeypatch: pytest.MonkeyPatch):
    """The local ARM endpoint (HTTPS, its own CA trusted through REQUESTS_CA_BUNDLE)."""
    from fakes.armserver import FakeArm

    with FakeArm() as arm:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", arm.ca_file)
        yield arm


@pytest.fixture
def arm_seeded(arm, request: pytest.FixtureRequest):
    """The ARM endpoint seeded with a worker's world (resource group, VNet and subnet,
    NSG, image, VM sizes). A test module may set ``ARM_SUBNET_PREFIX``."""
    prefix = getattr(request.module, "ARM_SUBNET_PREFIX", None)
    return arm.populate(prefix=prefix) if prefix else arm.populate()


@pytest.fixture
def arm_env(arm, arm_seeded, ssh_key: Path) -> dict[str, str]:
    """The environment (peer-pods-cm / peer-pods-secret) of an azure worker in ``arm_seeded``."""
    from fakes.armserver import azure_env

    return azure_env(arm, arm_seeded, ssh_key)


@pytest.fixture
def ssh_key(tmp_path: Path) -> Path:
    """The operator's SSH public key (ssh-key-secret's id_rsa.pub)."""
    path = tmp_path / "id_rsa.pub"
    path.write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 operator@example\n")
    return path


@pytest.fixture
def ec2_provider(fresh_moto: str):
    """(AwsProvider built from settings as serve and the controller build it, its boto3 EC2 client)
    over a fresh moto VPC with a subnet, a security group and an AMI; one account clusters may share."""
    import boto3

    from cloudadaptor.config import load_settings
    from cloudadaptor.providers import base

    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=fresh_moto,
                       aws_access_key_id="AKIATESTTESTTEST1234", aws_secret_access_key="test-secret")
    vpc = ec2.create_vpc(CidrBlock="203.0.113.0/24")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="203.0.113.0/25")["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName="worker", Description="workers", VpcId=vpc)["GroupId"]
    ami = ec2.register_image(Name="peer-pod-ami")["ImageId"]
    settings = load_settings({
        "CLOUD_PROVIDER": "aws", "NODE_NAME": "worker-1", "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "AKIATESTTESTTEST1234", "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_SUBNET_ID": subnet, "AWS_VPC_ID": vpc, "AWS_SG_IDS": sg, "PODVM_AMI_ID": ami,
        "PODVM_INSTANCE_TYPE": "t3.medium",
    })
    provider = base.create_provider(settings)
    provider.config = dataclasses.replace(provider.config, boot_poll_interval=0.2, boot_timeout=10.0)
    yield provider, ec2
    ec2.close()


@pytest.fixture
def many_files():
    """Room for 10,000 client sockets plus the server's (RLIMIT_NOFILE raised to the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 12000:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below the 12000 this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
