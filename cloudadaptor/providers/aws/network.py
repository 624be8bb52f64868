"""Security-group rules peer pods need, and checks of subnet and groups.

Peer pods need, between the worker and its pod VMs (both in the worker's
security group): 15150/tcp (the adaptor dials the VM's forwarder) and
VXLAN_PORT/udp (the pod network tunnel). VXLAN is UDP — the OpenShift docs'
"9000/tcp" opens the wrong protocol. ``open_ports`` adds both as rules whose
source is the group itself; it is idempotent. Blocking calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from botocore.exceptions import ClientError

from cloudadaptor.wire import AGENT_PORT
from cloudadaptor.providers.aws.client import error_code

GROUP_NOT_FOUND_CODES = frozenset({"InvalidGroup.NotFound", "InvalidGroupId.Malformed"})
SUBNET_NOT_FOUND_CODES = frozenset({"InvalidSubnetID.NotFound", "InvalidSubnetID.Malformed"})


@dataclass(frozen=True)
class PortRule:
    protocol: str  # "tcp" | "udp"
    port: int
    purpose: str

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol}"


def peer_pod_rules(vxlan_port: int) -> tuple[PortRule, ...]:
    return (
        PortRule("tcp", AGENT_PORT, "agent protocol forwarder"),
        PortRule("udp", vxlan_port, "VXLAN pod network"),
    )


def _allows(permission: Mapping[str, Any], rule: PortRule, source_group: str) -> bool:
    """Whether one IpPermissions entry already lets ``source_group`` reach ``rule``."""
    protocol = str(permission.get("IpProtocol", ""))
    if protocol != "-1":
        if protocol != rule.protocol:
            return False
        if not permission.get("FromPort", 0) <= rule.port <= permission.get("ToPort", -1):
            return False
    return any(pair.get("GroupId") == source_group for pair in permission.get("UserIdGroupPairs", []))


def open_ports(ec2: Any, group_id: str, vxlan_port: int) -> list[str]:
    """Allow ``peer_pod_rules`` from ``group_id`` into ``group_id``; one line per rule.

    Idempotent: a rule already present is reported "already open". Raises
    ``ClientError`` (e.g. InvalidGroup.NotFound, UnauthorizedOperation).
    """
    group = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    lines = []
    for rule in peer_pod_rules(vxlan_port):
        where = f"{group_id}: {rule} from {group_id} ({rule.purpose})"
        if any(_allows(p, rule, group_id) for p in group.get("IpPermissions", [])):
            lines.append(f"{where}: already open")
            continue
        permission = {
            "IpProtocol": rule.protocol,
            "FromPort": rule.port,
            "ToPort": rule.port,
            "UserIdGroupPairs": [{"GroupId": group_id, "Description": f"peer pods: {rule.purpose}"}],
        }
        try:
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[permission])
        except ClientError as exc:
            if error_code(exc) != "InvalidPermission.Duplicate":
                raise
            lines.append(f"{where}: already open")
            continue
        lines.append(f"{where}: opened")
    return lines


def describe_subnet(ec2: Any, subnet_id: str) -> Mapping[str, Any] | None:
    try:
        subnets = ec2.describe_subnets(SubnetIds=[subnet_id]).get("Subnets", [])
    except ClientError as exc:
        if error_code(exc) in SUBNET_NOT_FOUND_CODES:
            return None
        raise
    return subnets[0] if subnets else None


def describe_groups(ec2: Any, group_ids: Iterable[str]) -> tuple[dict[str, Mapping[str, Any]], list[str]]:
    """(group id -> description for the groups that exist, the ids that do not)."""
    wanted = list(dict.fromkeys(group_ids))
    if not wanted:
        return {}, []
    try:
        groups = ec2.describe_security_groups(GroupIds=wanted)["SecurityGroups"]
    except ClientError as exc:
        if error_code(exc) not in GROUP_NOT_FOUND_CODES:
            raise
        groups = []
        for group_id in wanted:  # one at a time, to name every missing one
            try:
                groups += ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
            except ClientError as inner:
                if error_code(inner) not in GROUP_NOT_FOUND_CODES:
                    raise
    found = {g["GroupId"]: g for g in groups}
    return found, [g for g in wanted if g not in found]
