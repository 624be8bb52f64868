"""AWS test fixtures: one moto server (HTTP on loopback) per session, reset per test.

boto3 reaches it the standard way, through ``AWS_ENDPOINT_URL``. Each test
gets a fresh EC2 "world": a VPC in the spare documentation range
203.0.113.0/24 (never routed anywhere), a subnet, a security group and a
registered AMI.
"""

from __future__ import annotations

from typing import Iterator

import boto3
import pytest
from awsworld import ACCESS_KEY, REGION, SECRET_KEY, Ec2World, Hooks


@pytest.fixture(scope="session", autouse=True)
def shared_botocore_models() -> Iterator[None]:
    """Parse botocore's service models once for the session instead of once
    per client (each provider makes its own session): speed only."""
    import botocore.loaders
    import botocore.session

    loaders: dict[object, botocore.loaders.Loader] = {}

    def create_loader(search_path_string: object = None) -> botocore.loaders.Loader:
        if search_path_string not in loaders:
            loaders[search_path_string] = botocore.loaders.create_loader(search_path_string)
        return loaders[search_path_string]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(botocore.session, "create_loader", create_loader)
        yield


@pytest.fixture(scope="session")
def moto_ec2(moto_endpoint: str):
    """The tests' own EC2 client for arranging and inspecting (no hooks on it)."""
    client = boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint,
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    yield client
    client.close()


@pytest.fixture
def aws(fresh_moto: str, moto_ec2) -> Iterator[Ec2World]:
    """A fresh EC2 world in moto; boto3 is pointed at it through AWS_ENDPOINT_URL only."""
    moto_endpoint = fresh_moto
    ec2 = moto_ec2
    vpc_id = ec2.create_vpc(CidrBlock="203.0.113.0/24")["Vpc"]["VpcId"]
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock="203.0.113.0/25")["Subnet"]["SubnetId"]
    sg_id = ec2.create_security_group(GroupName="worker", Description="worker nodes", VpcId=vpc_id)["GroupId"]
    ami_id = ec2.register_image(Name="peer-pod-ami")["ImageId"]  # moto: /dev/sda1, 15 GiB, uefi
    world = Ec2World(moto_endpoint, ec2, vpc_id, subnet_id, sg_id, ami_id)
    yield world
    for provider in world.providers:
        if provider._ec2 is not None:
            provider._ec2.close()


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    made = Hooks()
    yield made
    made.close()
