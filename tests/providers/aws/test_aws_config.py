"""AWS keys, the typed config and the RunInstances request (no cloud needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cloudadaptor.config import ConfigError, check, load_settings
from cloudadaptor.providers import base
from cloudadaptor.providers.aws import config as aws_config
from cloudadaptor.providers.aws.instances import TAG_CLIENT_TOKEN, LaunchPlan, ec2_client_token, run_request

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
BASE_ENV = {"CLOUD_PROVIDER": "aws", "AWS_REGION": "us-east-1", "PODVM_AMI_ID": "ami-0123456789abcdef0"}


@pytest.mark.parametrize("key, value, expected", [
    ("PODVM_AMI_ID", "peer-pod-ami", 'PODVM_AMI_ID="peer-pod-ami": expected an AMI id like ami-0123456789abcdef0'),
    ("AWS_SG_IDS", "sg-0123456789abcdef0, default", "bad item 'default'"),
    ("AWS_REGION", "US East", 'AWS_REGION="US East": expected an AWS region like us-east-1'),
    ("AWS_SUBNET_ID", "sub-1", "expected a subnet id"),
    ("AWS_RETRY_MODE", "legacy", "expected standard or adaptive"),
    ("AWS_MAX_ATTEMPTS", "0", "expected an integer from 1 to 20"),
    ("USE_PODVM_LAUNCHTEMPLATE", "yes", "expected true or false"),
])
def test_bad_aws_keys_are_named_with_what_is_expected(key: str, value: str, expected: str):
    _, problems = aws_config.AwsConfig.parse({**BASE_ENV, key: value})
    assert len(problems) == 1 and expected in str(problems[0]), problems


def test_an_access_key_without_its_secret_is_refused_without_showing_it():
    settings = load_settings({**BASE_ENV, "AWS_ACCESS_KEY_ID": SECRET})
    with pytest.raises(ConfigError) as err:
        base.create_provider(settings)
    assert str(err.value).startswith("AWS_SECRET_ACCESS_KEY is not set"), str(err.value)
    assert SECRET not in str(err.value)


def test_config_check_lists_aws_keys_and_hides_secrets():
    rows, problems = check({**BASE_ENV, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET})
    table = {key: value for key, value, _ in rows}
    assert problems == []
    assert table["AWS_SECRET_ACCESS_KEY"] == table["AWS_ACCESS_KEY_ID"] == "<hidden>"
    assert table["PODVM_LAUNCHTEMPLATE_NAME"] == "kata" and table["AWS_RETRY_MODE"] == "standard"
    assert SECRET not in repr(rows)


def test_the_typed_config_never_shows_credentials():
    settings = load_settings({**BASE_ENV, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET})
    provider = base.create_provider(settings)
    assert provider.config.credentials.secret_access_key == SECRET
    assert SECRET not in repr(provider.config) and "AKIAEXAMPLE" not in repr(provider.config)


def test_common_settings_reach_the_config():
    settings = load_settings({**BASE_ENV, "DISABLECVM": "false", "PODVM_INSTANCE_TYPES": "m6a.large,c6a.large",
                              "TAGS": "a=b", "USE_PUBLIC_IP": "true", "ROOT_VOLUME_SIZE": "40"})
    config = base.create_provider(settings).config
    assert config.wants_sev_snp and config.instance_types == ("m6a.large", "c6a.large")
    assert (config.instance_type, config.tags, config.use_public_ip, config.root_volume_size) == (
        "t3.medium", {"a": "b"}, True, 40)
    assert not base.create_provider(load_settings(BASE_ENV)).config.wants_sev_snp, "unset DISABLECVM is not false"


def test_a_launch_template_keeps_its_own_type_unless_one_is_configured():
    settings = load_settings({**BASE_ENV, "USE_PODVM_LAUNCHTEMPLATE": "true"})
    assert base.create_provider(settings).config.instance_type is None


def _plan(**changes: object) -> LaunchPlan:
    fields = dict(name="podvm-web-aaaaaaaa", client_token="t" * 64, user_data="#cloud-config\n",
                  tags={base.TAG_OWNER: base.OWNER_VALUE}, image_id="ami-0123456789abcdef0",
                  instance_type="t3.medium", subnet_id="subnet-0123456789abcdef0",
                  security_group_ids=("sg-0123456789abcdef0",))
    fields.update(changes)
    return LaunchPlan(**fields)  # type: ignore[arg-type]


def test_run_request_requires_imdsv2_tags_instance_and_volume_and_passes_user_data_raw():
    request = run_request(_plan())
    assert request["MetadataOptions"] == {"HttpTokens": "required", "HttpEndpoint": "enabled"}
    assert request["UserData"] == "#cloud-config\n", "boto3 base64-encodes UserData itself"
    assert [spec["ResourceType"] for spec in request["TagSpecifications"]] == ["instance", "volume"]
    tags = {t["Key"]: t["Value"] for t in request["TagSpecifications"][0]["Tags"]}
    assert tags == {"Name": "podvm-web-aaaaaaaa", base.TAG_OWNER: base.OWNER_VALUE, TAG_CLIENT_TOKEN: "t" * 64}
    assert (request["MinCount"], request["MaxCount"]) == (1, 1)
    assert "CpuOptions" not in request and "KeyName" not in request and "LaunchTemplate" not in request


def test_run_request_from_a_launch_template_names_it():
    request = run_request(_plan(launch_template="kata", image_id=None, instance_type=None, subnet_id=None,
                                security_group_ids=()))
    assert request["LaunchTemplate"] == {"LaunchTemplateName": "kata"}
    assert not {"ImageId", "InstanceType", "SubnetId", "SecurityGroupIds"} & set(request)


def test_client_tokens_fit_ec2s_64_characters():
    assert ec2_client_token("a" * 64) == "a" * 64
    long = ec2_client_token("sandbox-" + "x" * 200)
    assert len(long) == 64 and long == ec2_client_token("sandbox-" + "x" * 200)


def test_choosing_aws_imports_botocore_but_the_cli_and_package_do_not():
    code = ("import sys, cloudadaptor.cli as c, cloudadaptor.providers.aws, cloudadaptor.providers.base as b\n"
            "c.build_parser()\n"
            "assert 'botocore' not in sys.modules, 'botocore imported too early'\n"
            "assert b.load_provider_class('aws').__name__ == 'AwsProvider'\n"
            "assert 'botocore' in sys.modules\n"
            "assert 'boto3' not in sys.modules, 'the provider needs botocore only (boto3 adds its resource layer)'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
