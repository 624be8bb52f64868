"""`cloud-api-adaptor azure open-ports`: the NSG rules peer pods need, idempotent."""

from __future__ import annotations

import pytest

from cloudadaptor import cli
from cloudadaptor.providers.azure import client as az
from cloudadaptor.providers.azure import network
from fakes.armserver import StaticTokenCredential, fast_provider


ARM_SUBNET_PREFIX = "10.224.0.0/16"


@pytest.fixture
def arm_env(arm_env):
    return {**arm_env, "VXLAN_PORT": "4789"}


@pytest.fixture
async def provider(arm_env):
    provider = fast_provider(arm_env)
    yield provider
    await provider.close()


def rules(arm, nsg_id: str) -> dict[str, dict]:
    prefix = (nsg_id + "/securityRules/").lower()
    with arm.state.lock:
        return {r["name"]: r["properties"] for k, r in arm.state.resources.items() if k.startswith(prefix)}


async def open_ports(provider) -> list[str]:
    config = provider.config
    prefix = await network.subnet_prefix(provider.clients, config.subnet)
    return await network.open_ports(provider.clients, config, config.nsg, prefix)


async def test_opens_agent_tcp_and_vxlan_udp_within_the_worker_subnet(provider, arm, arm_seeded):
    lines = await open_ports(provider)
    assert [line.split(":")[0] for line in lines] == ["rule peerpods-agent-15150-tcp created",
                                                      "rule peerpods-vxlan-4789-udp created"]
    made = rules(arm, arm_seeded.nsg_id)
    agent, vxlan = made["peerpods-agent-15150-tcp"], made["peerpods-vxlan-4789-udp"]
    assert (agent["protocol"], agent["destinationPortRange"]) == ("Tcp", "15150")
    assert (vxlan["protocol"], vxlan["destinationPortRange"]) == ("Udp", "4789"), "VXLAN is UDP"
    for rule in (agent, vxlan):
        assert (rule["direction"], rule["access"]) == ("Inbound", "Allow")
        assert rule["sourceAddressPrefix"] == rule["destinationAddressPrefix"] == "10.224.0.0/16"


async def test_running_twice_changes_nothing(provider, arm):
    await open_ports(provider)
    puts = arm.count("PUT", "securityRules")
    lines = await open_ports(provider)
    assert all("already present" in line for line in lines), lines
    assert arm.count("PUT", "securityRules") == puts


async def test_a_drifted_rule_is_corrected_in_place_keeping_its_priority(provider, arm, arm_seeded):
    await open_ports(provider)
    rule_id = arm_seeded.nsg_id + "/securityRules/peerpods-vxlan-4789-udp"
    with arm.state.lock:
        arm.state.resources[rule_id.lower()]["properties"]["protocol"] = "Tcp"  # as the OpenShift docs say
    priority = rules(arm, arm_seeded.nsg_id)["peerpods-vxlan-4789-udp"]["priority"]
    lines = await open_ports(provider)
    assert lines[1].startswith("rule peerpods-vxlan-4789-udp updated"), lines
    fixed = rules(arm, arm_seeded.nsg_id)["peerpods-vxlan-4789-udp"]
    assert (fixed["protocol"], fixed["priority"]) == ("Udp", priority)


async def test_priorities_already_taken_are_skipped(provider, arm, arm_seeded):
    arm.state.resources[(arm_seeded.nsg_id + "/securityRules/ssh").lower()] = {
        "id": arm_seeded.nsg_id + "/securityRules/ssh", "name": "ssh", "type": "Microsoft.Network/networkSecurityGroups/securityRules",
        "properties": {"priority": 3000, "direction": "Inbound", "protocol": "Tcp", "access": "Allow",
                       "destinationPortRange": "22", "provisioningState": "Succeeded"}}
    await open_ports(provider)
    made = rules(arm, arm_seeded.nsg_id)
    assert sorted(r["priority"] for r in made.values()) == [3000, 3001, 3002]


def test_cli_open_ports_uses_the_adaptor_environment(arm_env, arm, arm_seeded, monkeypatch, capsys):
    for key, value in arm_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(az, "make_credential", lambda config: StaticTokenCredential())
    assert cli.main(["azure", "open-ports"]) == 0
    out = capsys.readouterr().out
    assert "peerpods-vxlan-4789-udp created" in out and "peer-pod ports open for 10.224.0.0/16" in out
    assert cli.main(["azure", "open-ports", "--vxlan-port", "9000", "--prefix", "10.224.1.0/24"]) == 0
    assert rules(arm, arm_seeded.nsg_id)["peerpods-vxlan-9000-udp"]["sourceAddressPrefix"] == "10.224.1.0/24"


def test_cli_open_ports_without_nsg_is_refused(arm_env, monkeypatch, capsys):
    for key, value in arm_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AZURE_NSG_ID")
    assert cli.main(["azure", "open-ports"]) == 2
    assert "AZURE_NSG_ID is not set" in capsys.readouterr().err
