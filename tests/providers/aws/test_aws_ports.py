"""`cloud-api-adaptor aws open-ports` against moto: the rules peer pods need, idempotently."""

from __future__ import annotations

import pytest
from awsworld import Ec2World

from cloudadaptor import cli


def _rules(aws: Ec2World, group_id: str) -> set[tuple[str, int, int, str]]:
    group = aws.ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    return {
        (p["IpProtocol"], p["FromPort"], p["ToPort"], pair["GroupId"])
        for p in group["IpPermissions"] for pair in p.get("UserIdGroupPairs", [])
    }


def _run(aws: Ec2World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str,
         **env: str) -> tuple[int, str, str]:
    for key, value in aws.env(**env).items():
        monkeypatch.setenv(key, value)
    code = cli.main(["aws", "open-ports", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_open_ports_allows_agent_tcp_and_vxlan_udp_from_the_group_itself(aws, monkeypatch, capsys):
    code, out, err = _run(aws, monkeypatch, capsys)
    assert code == 0, err
    assert _rules(aws, aws.sg_id) == {("tcp", 15150, 15150, aws.sg_id), ("udp", 9000, 9000, aws.sg_id)}
    assert out.splitlines() == [
        f"{aws.sg_id}: 15150/tcp from {aws.sg_id} (agent protocol forwarder): opened",
        f"{aws.sg_id}: 9000/udp from {aws.sg_id} (VXLAN pod network): opened",
    ]


def test_open_ports_twice_reports_already_open(aws, monkeypatch, capsys):
    assert _run(aws, monkeypatch, capsys)[0] == 0
    code, out, err = _run(aws, monkeypatch, capsys)
    assert code == 0, err
    assert [line.rsplit(": ", 1)[1] for line in out.splitlines()] == ["already open", "already open"]
    assert len(_rules(aws, aws.sg_id)) == 2


def test_open_ports_uses_vxlan_port_and_an_explicit_group(aws, monkeypatch, capsys):
    other = aws.ec2.create_security_group(GroupName="pods", Description="pods", VpcId=aws.vpc_id)["GroupId"]
    code, out, err = _run(aws, monkeypatch, capsys, "--group-id", other, VXLAN_PORT="4789")
    assert code == 0, err
    assert _rules(aws, other) == {("tcp", 15150, 15150, other), ("udp", 4789, 4789, other)}
    assert _rules(aws, aws.sg_id) == set()


def test_a_rule_opened_by_hand_counts_as_open(aws, monkeypatch, capsys):
    aws.ec2.authorize_security_group_ingress(GroupId=aws.sg_id, IpPermissions=[{
        "IpProtocol": "udp", "FromPort": 8000, "ToPort": 10000, "UserIdGroupPairs": [{"GroupId": aws.sg_id}]}])
    code, out, _ = _run(aws, monkeypatch, capsys)
    assert code == 0
    assert out.splitlines()[1].endswith("9000/udp from %s (VXLAN pod network): already open" % aws.sg_id)


def test_open_ports_on_a_missing_group_fails_with_one_line(aws, monkeypatch, capsys):
    code, out, err = _run(aws, monkeypatch, capsys, "--group-id", "sg-0123456789abcdef0")
    assert code == 1 and out == ""
    assert err.startswith("sg-0123456789abcdef0: InvalidGroup.NotFound"), err


def test_open_ports_refuses_a_malformed_group_id(aws, monkeypatch, capsys):
    code, _, err = _run(aws, monkeypatch, capsys, "--group-id", "default")
    assert code == 2 and "expected a security group id" in err
