"""Image build fixtures: the payload, the builder VM's SSH (in-process, loopback), moto, the fake ARM, kube API."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import boto3
import paramiko
import pytest
from buildworld import ACCESS_KEY, CONFIGMAPS, NAMESPACE, REGION, SECRET_KEY, AwsWorld, AzureWorld, KubeInThread, make_payload

from cloudadaptor.imagebuild.wheel import build_wheel
from fakes.armimages import RHEL9, ImageFakeArm
from fakes.armserver import DEFAULT_SIZES
from fakes.sshserver import FakeSshHost



@pytest.fixture(scope="session")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid payload archive: ./usr/bin/kata-agent (a shell script standing in for the binary)."""
    return make_payload(tmp_path_factory.mktemp("payload") / "podvm-payload.tar.gz")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our wheel, built once from the running package."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def vm_root(tmp_path: Path) -> Path:
    """The builder VM's install root: provisioning installs here instead of /."""
    root = tmp_path / "vmroot"
    root.mkdir()
    return root


@pytest.fixture
def builder_vm() -> Iterator[FakeSshHost]:
    """The builder VM's SSH endpoint: a paramiko server on loopback running commands for real."""
    with FakeSshHost() as host:
        yield host


# ------------------------------------------------------------------ AWS


@pytest.fixture
def aws(fresh_moto: str) -> Iterator[AwsWorld]:
    """A fresh EC2 in moto, reached through AWS_ENDPOINT_URL only."""
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=fresh_moto,
                       aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    vpc = ec2.create_vpc(CidrBlock="203.0.113.0/24")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="203.0.113.0/25")["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName="workers", Description="worker nodes", VpcId=vpc)["GroupId"]
    base = ec2.register_image(Name="rhel-9-base")["ImageId"]
    world = AwsWorld(ec2, vpc, subnet, sg, base)
    yield world
    for backend in world.backends:
        backend.close()
    ec2.close()


# ------------------------------------------------------------------ Azure


@pytest.fixture
def azure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[AzureWorld]:
    """The fake ARM endpoint with a resource group, subnet, NSG, sizes and RHEL 9; the ssh-key-secret's public key on disk."""
    with ImageFakeArm() as arm:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", arm.ca_file)
        rg = "peerpods-rg"
        arm.add_resource_group(rg)
        subnet = arm.add_subnet(rg, "peerpods-vnet", "workers", "203.0.113.0/24")
        nsg = arm.add_nsg(rg, "peerpods-nsg")
        for name, vcpus, memory, gpus in DEFAULT_SIZES:
            arm.add_size(name, vcpus, memory, gpus)
        arm.add_marketplace_image(*RHEL9)
        # The ssh-key-secret holds only the pod VMs' public key: the build makes its own pair.
        key = paramiko.RSAKey.generate(2048)
        public = tmp_path / "ssh-key-secret" / "id_rsa.pub"
        public.parent.mkdir()
        public.write_text(f"{key.get_name()} {key.get_base64()} operator@test\n")
        yield AzureWorld(arm, rg, subnet, nsg, public)


# ------------------------------------------------------------------ Kubernetes


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[KubeInThread, Path]]:
    """A Kubernetes API with peer-pods-cm in the operator's namespace; (server, kubeconfig path)."""
    kube = KubeInThread((CONFIGMAPS,)).start()
    kube.server.seed(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "peer-pods-cm", "namespace": NAMESPACE},
                                  "data": {"CLOUD_PROVIDER": "aws", "VXLAN_PORT": "9000"}})
    yield kube, kube.server.write_kubeconfig(tmp_path / "kubeconfig")
    kube.stop()
