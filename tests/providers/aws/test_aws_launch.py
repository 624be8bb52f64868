"""What RunInstances is asked for: instance type choice, SEV-SNP, root volume (moto)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from awsworld import Ec2World, Hooks, spec_for

from cloudadaptor.providers import base
from cloudadaptor.providers.base import ProviderError

ALLOWED = "t3.small,t3.medium,c5.xlarge,m5.xlarge,g4dn.xlarge"


async def _launched(aws: Ec2World, hooks: Hooks, env: dict[str, Any], **spec: Any) -> tuple[dict, dict]:
    """(RunInstances parameters, the instance moto made) for one create."""
    provider = aws.provider(**env)
    sent: list[dict] = []
    hooks.on(await provider.client(), "provide-client-params.ec2.RunInstances",
             lambda params, **kwargs: sent.append(dict(params)))
    instance = await provider.create_instance(spec_for(**spec))
    [described] = aws.instances(**{base.TAG_SANDBOX: "a" * 64})
    assert described["InstanceId"] == instance.id and len(sent) == 1
    return sent[0], described


@pytest.mark.parametrize("env, spec, expected", [
    ({"PODVM_INSTANCE_TYPES": ALLOWED}, {"instance_type": "m5.xlarge"}, "m5.xlarge"),      # annotation wins
    ({"PODVM_INSTANCE_TYPES": ALLOWED}, {"vcpus": 1, "memory_mib": 2048}, "t3.small"),   # smallest that fits
    ({"PODVM_INSTANCE_TYPES": ALLOWED}, {"vcpus": 2, "memory_mib": 3000}, "t3.medium"),  # memory decides first
    ({"PODVM_INSTANCE_TYPES": ALLOWED}, {"vcpus": 3, "memory_mib": 1024}, "c5.xlarge"),  # then vCPUs
    ({"PODVM_INSTANCE_TYPES": ALLOWED}, {"vcpus": 4, "memory_mib": 9000}, "m5.xlarge"),  # GPU type only if asked
    ({"PODVM_INSTANCE_TYPES": ALLOWED}, {"gpus": 1}, "g4dn.xlarge"),                     # GPUs
    ({}, {"vcpus": 4, "memory_mib": 16384}, "t3.medium"),                                 # no allow-list: default
    ({}, {"instance_type": "c6a.large"}, "c6a.large"),                                    # no allow-list: annotation
    ({"PODVM_INSTANCE_TYPE": None}, {}, "t3.medium"),                                     # AWS default
])
async def test_instance_type_choice(aws: Ec2World, hooks: Hooks, env: dict, spec: dict, expected: str):
    params, described = await _launched(aws, hooks, env, **spec)
    assert params["InstanceType"] == described["InstanceType"] == expected


@pytest.mark.parametrize("spec, message", [
    ({"instance_type": "x1.32xlarge"}, "'x1.32xlarge' (machine_type annotation) is not in PODVM_INSTANCE_TYPES"),
    ({"vcpus": 64, "memory_mib": 1024}, "no allowed instance type fits 64 vCPU, 1024 MiB"),
])
async def test_allow_list_is_enforced_before_anything_is_created(aws: Ec2World, spec: dict, message: str):
    provider = aws.provider(PODVM_INSTANCE_TYPE=None, PODVM_INSTANCE_TYPES=ALLOWED)
    with pytest.raises(ProviderError, match=re.escape(message)):
        await provider.create_instance(spec_for(**spec))
    assert aws.instances() == []


@pytest.mark.parametrize("disablecvm, instance_type, sev_snp", [
    (None, "t3.medium", False),       # the documented example: not asked, not used
    (None, "m6a.large", False),       # unset is not "false"
    ("true", "m6a.large", False),
    ("false", "m6a.large", True),     # asked and supported
])
async def test_sev_snp_only_when_disablecvm_is_explicitly_false(
    aws: Ec2World, hooks: Hooks, disablecvm: str | None, instance_type: str, sev_snp: bool
):
    params, _ = await _launched(aws, hooks, {"DISABLECVM": disablecvm, "PODVM_INSTANCE_TYPE": instance_type})
    assert ("CpuOptions" in params) == sev_snp, params.get("CpuOptions")
    if sev_snp:
        assert params["CpuOptions"] == {"AmdSevSnp": "enabled"}


async def test_a_pod_asking_for_a_type_without_sev_snp_is_refused_when_cvm_is_required(aws: Ec2World):
    provider = aws.provider(DISABLECVM="false", PODVM_INSTANCE_TYPE="m6a.large")
    assert await provider.verify() == []
    with pytest.raises(ProviderError, match="'t3.medium' does not support AMD SEV-SNP"):
        await provider.create_instance(spec_for(instance_type="t3.medium"))
    assert aws.instances() == []


@pytest.mark.parametrize("root_volume_size, expected_gib", [("0", None), ("10", 15), ("30", 30)])
async def test_root_volume_is_never_below_the_ami_root_size(
    aws: Ec2World, hooks: Hooks, root_volume_size: str, expected_gib: int | None
):
    params, _ = await _launched(aws, hooks, {"ROOT_VOLUME_SIZE": root_volume_size})
    if expected_gib is None:
        assert "BlockDeviceMappings" not in params
        return
    image = aws.ec2.describe_images(ImageIds=[aws.ami_id])["Images"][0]
    assert params["BlockDeviceMappings"] == [{
        "DeviceName": image["RootDeviceName"],
        "Ebs": {"VolumeSize": expected_gib, "DeleteOnTermination": True},
    }]


async def test_root_volume_of_an_annotated_image_uses_that_image(aws: Ec2World, hooks: Hooks):
    other = aws.ec2.register_image(Name="other-podvm")["ImageId"]
    params, described = await _launched(aws, hooks, {"ROOT_VOLUME_SIZE": "20"}, image=other)
    assert described["ImageId"] == other
    assert params["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 20


async def test_public_ip_is_asked_on_the_primary_interface(aws: Ec2World, hooks: Hooks):
    params, _ = await _launched(aws, hooks, {"USE_PUBLIC_IP": "true"})
    assert params["NetworkInterfaces"] == [{
        "DeviceIndex": 0, "AssociatePublicIpAddress": True, "DeleteOnTermination": True,
        "SubnetId": aws.subnet_id, "Groups": [aws.sg_id],
    }]
    assert "SubnetId" not in params and "SecurityGroupIds" not in params
