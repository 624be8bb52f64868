"""Start-up checks against moto: a good configuration passes, each bad key is named."""

from __future__ import annotations

import pytest
from awsworld import ACCESS_KEY, SECRET_KEY, Ec2World, Hooks, ec2_error, spec_for

from cloudadaptor.adaptor.daemon import Daemon, StartupError
from cloudadaptor.providers.base import ProviderError


async def test_the_openshift_example_configuration_passes(aws: Ec2World):
    # CLOUD_PROVIDER: aws, VXLAN_PORT: "9000", PODVM_INSTANCE_TYPE: t3.medium,
    # PROXY_TIMEOUT: 5m, no DISABLECVM: ordinary VMs, no SEV-SNP demanded.
    provider = aws.provider()
    assert provider.config.disable_cvm is None
    assert await provider.verify() == []


async def test_without_podvm_instance_type_the_aws_default_is_t3_medium(aws: Ec2World):
    provider = aws.provider(PODVM_INSTANCE_TYPE=None)
    assert provider.config.instance_type == "t3.medium"
    assert await provider.verify() == []


@pytest.mark.parametrize("overrides, expected", [
    ({"PODVM_AMI_ID": "ami-0123456789abcdef0"}, 'PODVM_AMI_ID="ami-0123456789abcdef0": no such image in region us-east-1'),
    ({"PODVM_AMI_ID": None}, "PODVM_AMI_ID is not set"),
    ({"PODVM_INSTANCE_TYPE": "t3.nonesuch"}, 'PODVM_INSTANCE_TYPE: instance type "t3.nonesuch" does not exist'),
    ({"PODVM_INSTANCE_TYPE": None, "PODVM_INSTANCE_TYPES": "t3.small,zz.huge"},
     'PODVM_INSTANCE_TYPES: instance type "zz.huge" does not exist'),
    ({"AWS_SUBNET_ID": "subnet-0123456789abcdef0"}, 'AWS_SUBNET_ID="subnet-0123456789abcdef0": no such subnet'),
    ({"AWS_SG_IDS": "SG,sg-0123456789abcdef0"}, 'AWS_SG_IDS: security group "sg-0123456789abcdef0" does not exist'),
    ({"AWS_VPC_ID": "vpc-0123456789abcdef0"}, 'AWS_VPC_ID="vpc-0123456789abcdef0": subnet'),
    ({"SSH_KP_NAME": "nobody"}, 'SSH_KP_NAME="nobody": no such key pair'),
    ({"USE_PODVM_LAUNCHTEMPLATE": "true", "PODVM_LAUNCHTEMPLATE_NAME": "nope"},
     'PODVM_LAUNCHTEMPLATE_NAME="nope": no such launch template'),
    ({"DISABLECVM": "false"}, 'DISABLECVM="false": instance type "t3.medium" (PODVM_INSTANCE_TYPE) does not support AMD SEV-SNP'),
    ({"TAGS": "aws:owner=me"}, 'TAGS: key "aws:owner" is reserved'),
])
async def test_each_bad_key_is_one_problem_naming_it(aws: Ec2World, overrides: dict, expected: str):
    # "SG" stands for the world's (existing) security group.
    overrides = {k: (v.replace("SG", aws.sg_id) if isinstance(v, str) else v) for k, v in overrides.items()}
    problems = await aws.provider(**overrides).verify()
    assert len(problems) == 1 and problems[0].startswith(expected), problems
    assert "\n" not in problems[0]


async def test_sev_snp_with_a_type_that_supports_it_passes(aws: Ec2World):
    assert await aws.provider(DISABLECVM="false", PODVM_INSTANCE_TYPE="m6a.large").verify() == []


async def test_security_group_of_another_vpc_is_refused(aws: Ec2World):
    other_vpc = aws.ec2.create_vpc(CidrBlock="203.0.113.0/24")["Vpc"]["VpcId"]
    elsewhere = aws.ec2.create_security_group(GroupName="x", Description="x", VpcId=other_vpc)["GroupId"]
    problems = await aws.provider(AWS_SG_IDS=elsewhere).verify()
    assert problems == [f'AWS_SG_IDS: security group "{elsewhere}" is in {other_vpc}, '
                        f"expected the pod VMs' VPC {aws.vpc_id}"]


async def test_rejected_credentials_are_one_problem_without_the_secret(aws: Ec2World, hooks: Hooks):
    provider = aws.provider()
    ec2 = await provider.client()
    hooks.on(ec2, "before-send.ec2.DescribeAvailabilityZones", lambda **kwargs: ec2_error(
        "AuthFailure", f"AWS was not able to validate the provided access credentials {ACCESS_KEY}", 401))
    problems = await provider.verify()
    assert len(problems) == 1, problems
    assert problems[0].startswith("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN: EC2 refused"), problems
    assert "AuthFailure" in problems[0]
    assert ACCESS_KEY not in problems[0] and SECRET_KEY not in problems[0]


async def test_missing_credentials_are_reported(aws: Ec2World):
    problems = await aws.provider(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None).verify()
    assert len(problems) == 1 and "no AWS credentials found" in problems[0], problems


async def test_a_bad_configuration_refuses_to_start_the_daemon(aws: Ec2World, tmp_path):
    settings = aws.settings(PODVM_AMI_ID="ami-0123456789abcdef0", STATE_DIR=str(tmp_path),
                            SOCKET=str(tmp_path / "hv.sock"), PODS_DIR=str(tmp_path / "pods"))
    daemon = Daemon(settings)
    with pytest.raises(StartupError, match=r'aws: PODVM_AMI_ID="ami-0123456789abcdef0": no such image'):
        await daemon.start()
    await daemon.close()


async def test_create_on_an_unusable_configuration_raises_provider_error(aws: Ec2World):
    provider = aws.provider(AWS_SUBNET_ID="subnet-0123456789abcdef0")
    with pytest.raises(ProviderError, match="AWS_SUBNET_ID"):
        await provider.create_instance(spec_for())
    assert aws.instances() == []
