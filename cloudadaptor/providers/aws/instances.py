"""EC2 instances: the RunInstances request, adoption, waits, terminate, list.

Blocking boto3 calls (run them in a worker thread). Idempotence:

- every instance carries ``peerpods.io/client-token``; a create first adopts
  a pending/running instance with its token, so a retried create (a StartVM
  repeated after a daemon restart, say) never makes a second VM;
- RunInstances also gets a ``ClientToken``, so a request that botocore
  re-sends after a lost reply is deduplicated by EC2 itself. EC2 answers a
  repeated token with the *original* instance even once it is terminated, so
  when instances of this token are already gone (the same sandbox started
  again after a failed start) the ClientToken is derived from their ids; and
  should EC2 still answer with a terminated instance, the next token is
  derived from that one's id and the request made again;
- terminating an instance that is gone is success.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from botocore.exceptions import ClientError, WaiterError

from cloudadaptor.providers.aws.client import INSTANCE_GONE_CODES, error_code
from cloudadaptor.providers.base import OWNER_VALUE, TAG_OWNER, Instance, ProviderError

log = logging.getLogger(__name__)

TAG_CLIENT_TOKEN = "peerpods.io/client-token"
ADOPTABLE_STATES = ("pending", "running")
OWNED_STATES = ("pending", "running", "stopping", "stopped")  # not shutting-down/terminated
GONE_STATES = ("shutting-down", "terminated")
MAX_CLIENT_TOKEN = 64
MAX_TOKEN_SUCCESSORS = 3


@dataclass(frozen=True)
class LaunchPlan:
    """One pod VM as RunInstances will be asked for it; decided before anything exists."""

    name: str
    client_token: str
    user_data: str = field(repr=False)
    tags: Mapping[str, str] = field(default_factory=dict)
    image_id: str | None = None
    instance_type: str | None = None
    subnet_id: str | None = None
    security_group_ids: tuple[str, ...] = ()
    key_name: str | None = None
    launch_template: str | None = None
    public_ip: bool = False
    sev_snp: bool = False
    root_device: str | None = None
    root_size_gib: int = 0  # 0: the AMI's own size


def ec2_client_token(token: str) -> str:
    """``token`` as EC2 accepts it (at most 64 ASCII characters)."""
    if 0 < len(token) <= MAX_CLIENT_TOKEN and token.isascii() and token.isprintable():
        return token
    return hashlib.sha256(token.encode()).hexdigest()


def successor_token(token: str, terminated_id: str) -> str:
    """The token to use after EC2 replayed ``token`` as the terminated ``terminated_id``."""
    return hashlib.sha256(f"{token}/{terminated_id}".encode()).hexdigest()


def _tag_list(plan: LaunchPlan) -> list[dict[str, str]]:
    tags = {"Name": plan.name, **{k: v for k, v in plan.tags.items() if k != "Name"}}
    tags[TAG_CLIENT_TOKEN] = plan.client_token
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def run_request(plan: LaunchPlan) -> dict[str, Any]:
    """The RunInstances parameters for ``plan`` (without ``ClientToken``). Pure.

    boto3 base64-encodes ``UserData`` itself; IMDSv2 is always required.
    """
    tags = _tag_list(plan)
    request: dict[str, Any] = {
        "MinCount": 1,
        "MaxCount": 1,
        "UserData": plan.user_data,
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tags},
            {"ResourceType": "volume", "Tags": tags},
        ],
    }
    if plan.launch_template:
        request["LaunchTemplate"] = {"LaunchTemplateName": plan.launch_template}
    if plan.image_id:
        request["ImageId"] = plan.image_id
    if plan.instance_type:
        request["InstanceType"] = plan.instance_type
    if plan.public_ip:
        nic: dict[str, Any] = {"DeviceIndex": 0, "AssociatePublicIpAddress": True, "DeleteOnTermination": True}
        if plan.subnet_id:
            nic["SubnetId"] = plan.subnet_id
        if plan.security_group_ids:
            nic["Groups"] = list(plan.security_group_ids)
        request["NetworkInterfaces"] = [nic]
    else:
        if plan.subnet_id:
            request["SubnetId"] = plan.subnet_id
        if plan.security_group_ids:
            request["SecurityGroupIds"] = list(plan.security_group_ids)
    if plan.key_name:
        request["KeyName"] = plan.key_name
    if plan.sev_snp:
        request["CpuOptions"] = {"AmdSevSnp": "enabled"}
    if plan.root_size_gib > 0 and plan.root_device:
        request["BlockDeviceMappings"] = [{
            "DeviceName": plan.root_device,
            "Ebs": {"VolumeSize": plan.root_size_gib, "DeleteOnTermination": True},
        }]
    return request


def _filters(tags: Mapping[str, str], states: tuple[str, ...]) -> list[dict[str, Any]]:
    filters = [{"Name": f"tag:{key}", "Values": [value]} for key, value in tags.items()]
    filters.append({"Name": "instance-state-name", "Values": list(states)})
    return filters


def _describe_all(ec2: Any, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            found.extend(reservation.get("Instances", []))
    return found


def _made_for(ec2: Any, client_token: str) -> list[dict[str, Any]]:
    """Every instance (any state) tagged with ``client_token``."""
    states = (*OWNED_STATES, *GONE_STATES)
    return sorted(_describe_all(ec2, _filters({TAG_CLIENT_TOKEN: client_token}, states)), key=lambda i: i["InstanceId"])


def _state(instance: Mapping[str, Any]) -> str:
    return str(instance.get("State", {}).get("Name", ""))


def first_token(client_token: str, gone_ids: list[str]) -> str:
    """The ClientToken for a new instance: ``client_token`` itself, or — when
    instances of that token are already gone (EC2 would replay the old one) —
    one derived from their ids. The same for a retry of the same attempt."""
    if not gone_ids:
        return client_token
    return hashlib.sha256(f"{client_token}/{','.join(sorted(gone_ids))}".encode()).hexdigest()


def launch(ec2: Any, plan: LaunchPlan) -> tuple[str, bool]:
    """(instance id, True if created now / False if adopted). Never makes a
    second instance for a token that has a pending or running one."""
    earlier = _made_for(ec2, plan.client_token)
    live = [i for i in earlier if _state(i) in ADOPTABLE_STATES]
    if live:
        log.info("adopting %s, already made for %s", live[0]["InstanceId"], plan.name)
        return live[0]["InstanceId"], False
    request = run_request(plan)
    token = first_token(plan.client_token, [i["InstanceId"] for i in earlier if _state(i) in GONE_STATES])
    for _ in range(MAX_TOKEN_SUCCESSORS + 1):
        made = ec2.run_instances(**request, ClientToken=token)["Instances"][0]
        if _state(made) not in GONE_STATES:
            return made["InstanceId"], True
        log.info("EC2 replayed the client token of %s as %s (%s); using the next token",
                 plan.name, made["InstanceId"], _state(made))
        token = successor_token(token, made["InstanceId"])
    raise ProviderError(f"EC2 keeps answering RunInstances for {plan.name} with terminated instances")


def describe_instance(ec2: Any, instance_id: str) -> dict[str, Any] | None:
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id]).get("Reservations", [])
    except ClientError as exc:
        if error_code(exc) in INSTANCE_GONE_CODES:
            return None
        raise
    for reservation in reservations:
        for instance in reservation.get("Instances", []):
            return instance
    return None


def _state_text(instance: Mapping[str, Any] | None) -> str:
    if not instance:
        return "not found"
    state = instance.get("State", {}).get("Name", "?")
    reason = instance.get("StateReason", {}).get("Message", "")
    return f"{state} ({reason})" if reason else state


def wait_running(ec2: Any, instance_id: str, poll: float, timeout: float) -> dict[str, Any]:
    """Block until the instance runs (boto3 waiter, at most ~``timeout`` s); its description.

    Raises ProviderError naming the state it stopped in (e.g. terminated and why).
    """
    attempts = max(1, math.ceil(timeout / max(poll, 0.001)))
    try:
        ec2.get_waiter("instance_running").wait(
            InstanceIds=[instance_id], WaiterConfig={"Delay": poll, "MaxAttempts": attempts}
        )
    except WaiterError:
        state = _state_text(describe_instance(ec2, instance_id))
        raise ProviderError(f"instance {instance_id} did not reach running within {timeout:.0f}s: {state}") from None
    described = describe_instance(ec2, instance_id)
    if described is None or described.get("State", {}).get("Name") != "running":
        raise ProviderError(f"instance {instance_id} is not running: {_state_text(described)}")
    return described


def to_instance(described: Mapping[str, Any], public_first: bool) -> Instance:
    """``Instance`` from a description: ips (private, public) — or (public,
    private) when the adaptor dials public addresses (USE_PUBLIC_IP)."""
    tags = {t["Key"]: t["Value"] for t in described.get("Tags", [])}
    private = described.get("PrivateIpAddress")
    public = described.get("PublicIpAddress")
    ordered = (public, private) if public_first else (private, public)
    return Instance(
        id=described["InstanceId"],
        name=tags.get("Name", ""),
        ips=tuple(ip for ip in ordered if ip),
        tags=tags,
        instance_type=str(described.get("InstanceType", "")),
    )


def terminate(ec2: Any, instance_id: str) -> bool:
    """Terminate; False when the instance was already gone (not an error)."""
    try:
        ec2.terminate_instances(InstanceIds=[instance_id])
    except ClientError as exc:
        if error_code(exc) in INSTANCE_GONE_CODES:
            return False
        raise
    return True


def list_owned(ec2: Any, tags: Mapping[str, str], public_first: bool) -> list[Instance]:
    """Instances tagged as ours and with every one of ``tags``, not (being) terminated."""
    wanted = {TAG_OWNER: OWNER_VALUE, **tags}
    found = _describe_all(ec2, _filters(wanted, OWNED_STATES))
    return [to_instance(i, public_first) for i in sorted(found, key=lambda i: i["InstanceId"])]
