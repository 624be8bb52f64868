"""AwsProvider against moto over HTTP: create, tags, user data, idempotence, delete, list."""

from __future__ import annotations

import asyncio
import base64
import threading
import urllib.parse
from typing import Any

import pytest
from awsworld import SECRET_KEY, Ec2World, Hooks, ec2_error, ec2_reply, spec_for

from cloudadaptor.providers import base
from cloudadaptor.providers.aws.instances import TAG_CLIENT_TOKEN
from cloudadaptor.providers.base import ProviderError


async def test_create_runs_a_tagged_instance_in_the_subnet_and_returns_its_private_ip(aws: Ec2World):
    provider = aws.provider(TAGS="team=kata,cost-center=42")
    spec = spec_for()
    instance = await provider.create_instance(spec)

    [described] = aws.instances(**{base.TAG_SANDBOX: spec.sandbox_id})
    assert described["InstanceId"] == instance.id
    assert described["State"]["Name"] == "running"
    assert described["SubnetId"] == aws.subnet_id
    assert [g["GroupId"] for g in described["SecurityGroups"]] == [aws.sg_id]
    assert described["ImageId"] == aws.ami_id
    assert described["InstanceType"] == "t3.medium"
    assert instance.ips == (described["PrivateIpAddress"],)
    assert instance.ips[0].startswith("203.0.113."), instance.ips
    tags = {t["Key"]: t["Value"] for t in described["Tags"]}
    assert tags == {
        "Name": spec.name,
        base.TAG_OWNER: base.OWNER_VALUE,
        base.TAG_NODE: "worker-1",
        base.TAG_SANDBOX: spec.sandbox_id,
        base.TAG_POD: spec.tags[base.TAG_POD],
        TAG_CLIENT_TOKEN: spec.client_token,
        "team": "kata",
        "cost-center": "42",
    }
    assert instance.name == spec.name and instance.tags == tags


async def test_user_data_round_trips_through_describe_instance_attribute(aws: Ec2World):
    provider = aws.provider()
    user_data = "#cloud-config\nwrite_files:\n- path: /run/peerpod/apf.json\n  content: '{\"pod_name\": \"ü\"}'\n"
    instance = await provider.create_instance(spec_for(user_data=user_data))
    attribute = aws.ec2.describe_instance_attribute(InstanceId=instance.id, Attribute="userData")
    assert base64.b64decode(attribute["UserData"]["Value"]).decode("utf-8") == user_data


async def test_instances_require_imdsv2(aws: Ec2World):
    instance = await aws.provider().create_instance(spec_for())
    [described] = aws.instances(**{base.TAG_SANDBOX: "a" * 64})
    assert described["InstanceId"] == instance.id
    assert described["MetadataOptions"]["HttpTokens"] == "required"


async def test_user_data_over_16_kib_is_refused_naming_size_and_limit(aws: Ec2World):
    provider = aws.provider()
    user_data = "#cloud-config\n" + "x" * 16384
    with pytest.raises(ProviderError) as err:
        await provider.create_instance(spec_for(user_data=user_data))
    assert "16 KiB" in str(err.value) and str(len(user_data)) in str(err.value), str(err.value)
    assert aws.instances() == [], "nothing may be created for refused user data"


async def test_retried_create_with_the_same_client_token_adopts_the_first_instance(aws: Ec2World):
    provider = aws.provider()
    spec = spec_for()
    first = await provider.create_instance(spec)
    again = await provider.create_instance(spec)
    other_provider = await aws.provider().create_instance(spec)  # e.g. after a daemon restart
    assert again.id == first.id == other_provider.id
    assert aws.alive(**{TAG_CLIENT_TOKEN: spec.client_token}) == [first.id]


async def test_token_replayed_by_ec2_for_a_terminated_instance_gets_a_new_instance(aws: Ec2World, hooks: Hooks):
    """Real EC2 answers a repeated ClientToken with the original reply, even once
    that instance is terminated (moto does not): emulate that, then start the
    same sandbox again after its first VM was deleted."""
    provider = aws.provider()
    ec2 = await provider.client()
    replies: dict[str, bytes] = {}
    tokens: list[str] = []

    def replay(request: Any, **kwargs: Any) -> Any:
        body = request.body if isinstance(request.body, str) else request.body.decode()
        token = urllib.parse.parse_qs(body)["ClientToken"][0]
        tokens.append(token)
        return ec2_reply(request.url, replies[token]) if token in replies else None

    def remember(http_response: Any, **kwargs: Any) -> None:
        if tokens and tokens[-1] not in replies:
            replies[tokens[-1]] = http_response.content

    hooks.on(ec2, "before-send.ec2.RunInstances", replay)
    hooks.on(ec2, "after-call.ec2.RunInstances", remember)
    spec = spec_for()
    first = await provider.create_instance(spec)
    await provider.delete_instance(first.id)
    second = await provider.create_instance(spec)
    assert second.id != first.id
    assert len(tokens) == 2 and tokens[0] != tokens[1], "the second start needs a token EC2 has not seen"
    assert aws.alive(**{TAG_CLIENT_TOKEN: spec.client_token}) == [second.id]


async def test_delete_terminates_and_deleting_again_or_an_unknown_id_succeeds(aws: Ec2World):
    provider = aws.provider()
    instance = await provider.create_instance(spec_for())
    await provider.delete_instance(instance.id)
    [described] = aws.instances(**{base.TAG_SANDBOX: "a" * 64})
    assert described["State"]["Name"] in ("shutting-down", "terminated")
    await provider.delete_instance(instance.id)
    await provider.delete_instance("i-0123456789abcdef0")
    await provider.delete_instance("i-local-0123456789ab")


async def test_list_owned_finds_only_live_instances_with_our_tags(aws: Ec2World):
    provider = aws.provider()
    mine = await provider.create_instance(spec_for("a" * 64))
    other_node = await provider.create_instance(spec_for("b" * 64, node="worker-2"))
    gone = await provider.create_instance(spec_for("c" * 64))
    await provider.delete_instance(gone.id)
    aws.ec2.run_instances(  # not ours: no owner tag, even though it names our node
        ImageId=aws.ami_id, MinCount=1, MaxCount=1, SubnetId=aws.subnet_id,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": base.TAG_NODE, "Value": "worker-1"}]}],
    )
    node_1 = await provider.list_owned({base.TAG_NODE: "worker-1"})
    assert [i.id for i in node_1] == [mine.id]
    assert node_1[0].ips == mine.ips and node_1[0].tags[base.TAG_SANDBOX] == "a" * 64
    assert sorted(i.id for i in await provider.list_owned({})) == sorted([mine.id, other_node.id])
    assert await provider.list_owned({base.TAG_SANDBOX: "c" * 64}) == []


async def test_a_create_that_fails_after_run_instances_terminates_the_instance(aws: Ec2World, hooks: Hooks):
    provider = aws.provider()
    ec2 = await provider.client()
    launched = threading.Event()
    hooks.on(ec2, "after-call.ec2.RunInstances", lambda **kwargs: launched.set())
    hooks.on(ec2, "before-send.ec2.DescribeInstances",
             lambda **kwargs: ec2_error("UnauthorizedOperation", "not allowed", 403) if launched.is_set() else None)
    with pytest.raises(ProviderError) as err:
        await provider.create_instance(spec_for())
    assert "terminated" in str(err.value), str(err.value)
    assert aws.alive(**{base.TAG_SANDBOX: "a" * 64}) == []
    assert len(aws.instances(**{base.TAG_SANDBOX: "a" * 64})) == 1


async def test_a_create_cancelled_while_waiting_for_boot_terminates_the_instance(aws: Ec2World, hooks: Hooks):
    provider = aws.provider()
    ec2 = await provider.client()
    launched, waiting = threading.Event(), threading.Event()
    hooks.on(ec2, "after-call.ec2.RunInstances", lambda **kwargs: launched.set())

    def slow_describe(**kwargs: Any) -> None:
        if launched.is_set():
            waiting.set()
            threading.Event().wait(0.5)  # the boot takes a while

    hooks.on(ec2, "before-send.ec2.DescribeInstances", slow_describe)
    task = asyncio.create_task(provider.create_instance(spec_for()))
    await asyncio.to_thread(waiting.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert aws.alive(**{base.TAG_SANDBOX: "a" * 64}) == []


async def test_image_annotation_wins_over_podvm_ami_id_and_must_be_an_ami(aws: Ec2World):
    other = aws.ec2.register_image(Name="other-podvm")["ImageId"]
    provider = aws.provider()
    instance = await provider.create_instance(spec_for(image=other))
    [described] = aws.instances(**{base.TAG_SANDBOX: "a" * 64})
    assert described["ImageId"] == other and described["InstanceId"] == instance.id
    with pytest.raises(ProviderError, match="image annotation '/opt/kata/podvm.img'"):
        await provider.create_instance(spec_for("b" * 64, image="/opt/kata/podvm.img"))


async def test_public_ip_comes_first_when_use_public_ip(aws: Ec2World):
    provider = aws.provider(USE_PUBLIC_IP="true")
    instance = await provider.create_instance(spec_for())
    [described] = aws.instances(**{base.TAG_SANDBOX: "a" * 64})
    assert instance.ips == (described["PublicIpAddress"], described["PrivateIpAddress"])
    assert described["SubnetId"] == aws.subnet_id


async def test_key_pair_is_set_when_ssh_kp_name_is(aws: Ec2World):
    aws.ec2.create_key_pair(KeyName="debug")
    provider = aws.provider(SSH_KP_NAME="debug")
    await provider.create_instance(spec_for())
    [described] = aws.instances(**{base.TAG_SANDBOX: "a" * 64})
    assert described["KeyName"] == "debug"


async def test_launch_template_supplies_image_and_type(aws: Ec2World):
    aws.ec2.create_launch_template(LaunchTemplateName="coco-guest", LaunchTemplateData={
        "ImageId": aws.ami_id, "InstanceType": "c6a.large", "SecurityGroupIds": [aws.sg_id]})
    provider = aws.provider(USE_PODVM_LAUNCHTEMPLATE="true", PODVM_LAUNCHTEMPLATE_NAME="coco-guest",
                            PODVM_AMI_ID=None, PODVM_INSTANCE_TYPE=None)
    assert await provider.verify() == []
    await provider.create_instance(spec_for())
    [described] = aws.instances(**{base.TAG_SANDBOX: "a" * 64})
    assert (described["ImageId"], described["InstanceType"]) == (aws.ami_id, "c6a.large")


async def test_secrets_never_appear_in_reprs_or_errors(aws: Ec2World, hooks: Hooks):
    provider = aws.provider()
    ec2 = await provider.client()
    hooks.on(ec2, "before-send.ec2.TerminateInstances",
             lambda **kwargs: ec2_error("InternalError", f"echo {SECRET_KEY}", 400))
    with pytest.raises(ProviderError) as err:
        await provider.delete_instance("i-0123456789abcdef0")
    assert "InternalError" in str(err.value)
    assert SECRET_KEY not in str(err.value) + repr(provider) + repr(provider.config)


async def test_network_hint_is_an_address_in_the_vm_subnet_once_verified(aws: Ec2World):
    provider = aws.provider()
    assert provider.network_hint() is None
    assert await provider.verify() == []
    assert provider.network_hint() == "203.0.113.1"


async def test_describe_instance_reads_tags_and_a_terminated_or_unknown_one_is_none(aws: Ec2World):
    provider = aws.provider()
    instance = await provider.create_instance(spec_for())
    described = await provider.describe_instance(instance.id)
    assert described is not None and described.id == instance.id and described.tags[base.TAG_SANDBOX] == "a" * 64
    await provider.delete_instance(instance.id)
    assert await provider.describe_instance(instance.id) is None
    assert await provider.describe_instance("i-0123456789abcdef0") is None


async def test_the_image_annotation_must_be_in_podvm_images_when_it_is_set(aws: Ec2World):
    other = aws.ec2.register_image(Name="someone-elses-ami")["ImageId"]
    provider = aws.provider(PODVM_IMAGES=aws.ami_id)
    with pytest.raises(ProviderError, match="not in PODVM_IMAGES"):
        await provider.create_instance(spec_for(image=other))
    assert aws.alive() == [], "refused before RunInstances"
    instance = await provider.create_instance(spec_for(image=aws.ami_id))
    assert aws.instances()[0]["ImageId"] == aws.ami_id and instance.id
async def test_a_warm_pool_of_ec2_instances_fills_is_claimed_and_leaves_nothing_when_turned_off(aws, tmp_path):
    from fakes.poolvm import cloud_round_trip

    await cloud_round_trip(aws.provider(TAGS="team=kata"), tmp_path / "state.db", "worker-1", {"team": "kata"})


async def test_a_created_instance_reports_its_type_and_when_ec2_accepted_it(aws: Ec2World):
    provider = aws.provider()
    instance = await provider.create_instance(spec_for())
    assert instance.instance_type == "t3.medium"
    assert instance.launched_in is not None and instance.launched_in >= 0.0
    await provider.delete_instance(instance.id)
