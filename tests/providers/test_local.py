"""The local provider: real pod VMs (netns + init + podvm components) on a bridge.

Runs in the private namespace (``make test``). Every VM boots the real
process-user-data, pod network and forwarder (in its init) and the
development agent (its own process), so a test that reaches
the agent through ``<vm ip>:15150`` exercises the whole VM.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import sys
import time
from pathlib import Path

import pytest
from google.protobuf import empty_pb2
from pyroute2 import IPRoute

from cloudadaptor.config import ConfigError, Settings
from cloudadaptor.protocols import agent_pb2, health_pb2
from cloudadaptor.providers.local import machine
from cloudadaptor.providers.base import InstanceSpec, Provider, ProviderError, create_provider
from cloudadaptor.providers.local import LocalConfig, LocalProvider
from cloudadaptor.retry import Backoff, RetryTimeout, retry_until
from cloudadaptor.tls import AdaptorTls
from cloudadaptor.ttrpc.client import Client
from cloudadaptor.podconfig import ForwarderConfig
from cloudadaptor.userdata import APF_CONFIG_PATH, render

BOOT_TIMEOUT = 15.0


def user_data(sandbox_id: str = "sandbox-1", tls=None) -> str:
    config = ForwarderConfig(sandbox_id=sandbox_id, pod_name="web", pod_namespace="default", tls=tls)
    return render({APF_CONFIG_PATH: config.to_json()})


def spec(token: str = "token-1", tags: dict[str, str] | None = None, data: str | None = None) -> InstanceSpec:
    return InstanceSpec(
        name=f"podvm-web-{token}", sandbox_id=token, user_data=user_data() if data is None else data,
        client_token=token, tags={"peerpods.io/node": "node-1", **(tags or {})},
    )


def console(provider: LocalProvider, instance_id: str) -> str:
    try:
        return (provider.config.cloud_dir / instance_id / "console.log").read_text()
    except FileNotFoundError:
        return ""


async def wait_console(provider: LocalProvider, instance_id: str, text: str, timeout: float = BOOT_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while text not in console(provider, instance_id):
        assert time.monotonic() < deadline, f"console never showed {text!r}:\n{console(provider, instance_id)}"
        await asyncio.sleep(0.02)
    return console(provider, instance_id)


def stamp(log: str, text: str) -> datetime.datetime:
    """The timestamp of the first console line containing ``text``."""
    line = next(line for line in log.splitlines() if text in line)
    return datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))


async def dial_agent(ip: str, provider: LocalProvider | None = None, instance_id: str = "", **tls) -> Client:
    """Connect to the VM's forwarder and wait for the agent's Health.Check SERVING
    (on failure, the VM's console is shown when ``provider``/``instance_id`` are given)."""

    async def attempt() -> Client:
        client = await asyncio.wait_for(Client.connect_tcp(ip, 15150, **tls), 2)
        try:
            reply = await client.call_message("grpc.Health", "Check", health_pb2.CheckRequest(),
                                              health_pb2.HealthCheckResponse, timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        except BaseException:
            await client.close()
            raise
        return client

    try:
        return await retry_until(BOOT_TIMEOUT, attempt, backoff=Backoff(initial=0.05, factor=1.5, maximum=0.25))
    except RetryTimeout as exc:
        shown = console(provider, instance_id) if provider else ""
        pytest.fail(f"agent at {ip}:15150 never answered: {exc.last_error!r}\n{shown}")


# pyroute2's synchronous API runs its own event loop: tests call these through to_thread.


def _links() -> dict[str, dict]:
    with IPRoute() as ipr:
        return {link.get("IFLA_IFNAME"): link for link in ipr.get_links()}


async def links() -> dict[str, dict]:
    return await asyncio.to_thread(_links)


def _add_link(name: str, kind: str) -> None:
    extra = {"peer": {"ifname": name[:14] + "p"}} if kind == "veth" else {}
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind=kind, **extra)


async def add_link(name: str, kind: str) -> None:
    await asyncio.to_thread(_add_link, name, kind)


def _bridge_state(name: str) -> tuple[bool, set[tuple[str, int]]]:
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        up = bool(ipr.get_links(index)[0]["flags"] & 1)
        return up, {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)}


def pids_in_netns(path: str) -> list[int]:
    inode = os.stat(path).st_ino
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def alive(pid: int) -> bool:
    return machine.alive(pid)


# ------------------------------------------------------------------ config keys


def test_keys_default_and_build_from_settings(tmp_path: Path):
    _, problems = LocalConfig.parse({})
    assert problems == []
    provider = create_provider(Settings(cloud_provider="local", state_dir=tmp_path))
    assert provider.config == LocalConfig(cloud_dir=tmp_path / "local-cloud")
    assert str(provider.config.cidr) == "192.0.2.0/24" and str(provider.config.gateway) == "192.0.2.1"
    assert provider.config.bridge == "ppcloud0" and provider.config.boot_delay == 0.0
    assert isinstance(provider, Provider)


def test_keys_parse_and_refuse_bad_values(tmp_path: Path):
    env = {"LOCAL_CLOUD_CIDR": "203.0.113.0/28", "LOCAL_CLOUD_BRIDGE": "br-test", "LOCAL_BOOT_DELAY": "1.5s",
           "LOCAL_AGENT_COMMAND": "kata-agent --addr unix://{socket}", "LOCAL_CLOUD_DIR": str(tmp_path)}
    _, problems = LocalConfig.parse(env)
    assert problems == []
    config = LocalConfig.load(Settings(provider_env=env))
    assert (str(config.cidr), config.bridge, config.boot_delay) == ("203.0.113.0/28", "br-test", 1.5)
    assert config.agent_command == "kata-agent --addr unix://{socket}" and config.cloud_dir == tmp_path

    bad = {"LOCAL_CLOUD_CIDR": "203.0.113.0/31", "LOCAL_CLOUD_BRIDGE": "a-bridge-name-too-long",
           "LOCAL_BOOT_DELAY": "soon", "LOCAL_AGENT_COMMAND": "kata-agent", "LOCAL_CLOUD_DIR": "relative/dir"}
    _, problems = LocalConfig.parse(bad)
    assert sorted(p.key for p in problems) == sorted(bad), [str(p) for p in problems]
    for cidr in ("2001:db8::/64", "192.0.2.1/24", "nonsense"):
        _, problems = LocalConfig.parse({"LOCAL_CLOUD_CIDR": cidr})
        assert [p.key for p in problems] == ["LOCAL_CLOUD_CIDR"], cidr


def test_create_provider_refuses_bad_keys_with_every_problem():
    settings = Settings(provider_env={"LOCAL_CLOUD_CIDR": "x", "LOCAL_BOOT_DELAY": "y"})
    with pytest.raises(ConfigError) as err:
        create_provider(settings)
    assert {p.key for p in err.value.problems} == {"LOCAL_CLOUD_CIDR", "LOCAL_BOOT_DELAY"}


# ------------------------------------------------------------------------ cloud


async def test_verify_creates_the_bridge_with_the_gateway_address(local_cloud):
    provider = local_cloud.provider()
    assert await provider.verify() == []
    assert await provider.verify() == []  # idempotent: adopts its own bridge
    up, addrs = await asyncio.to_thread(_bridge_state, provider.config.bridge)
    assert up, "the bridge should be up"
    assert (str(provider.config.gateway), provider.config.cidr.prefixlen) in addrs


async def test_verify_reports_a_non_bridge_and_an_unusable_cloud_dir(local_cloud, tmp_path: Path):
    name = local_cloud.config.bridge
    await add_link(name, "veth")  # the kernel here may lack the dummy module
    problems = await local_cloud.provider().verify()
    assert len(problems) == 1 and name in problems[0] and "not a bridge" in problems[0], problems
    with pytest.raises(ProviderError, match="not a bridge"):
        await local_cloud.provider().create_instance(spec())
    assert local_cloud.instance_ids() == []

    (tmp_path / "a-file").write_text("")
    problems = await local_cloud.provider(cloud_dir=tmp_path / "a-file" / "cloud").verify()
    assert len(problems) == 1 and "LOCAL_CLOUD_DIR" in problems[0], problems


async def test_an_existing_bridge_is_adopted(local_cloud):
    await add_link(local_cloud.config.bridge, "bridge")
    provider = local_cloud.provider()
    instance = await provider.create_instance(spec())
    assert instance.ips == (str(provider.config.gateway + 1),)
    client = await dial_agent(instance.ips[0], provider, instance.id)
    await client.close()


# ---------------------------------------------------------------------- create


async def test_create_boots_a_vm_whose_agent_answers_through_the_forwarder(local_provider):
    instance = await local_provider.create_instance(spec(tags={"peerpods.io/pod": "default/web"}))
    assert instance.id.startswith("i-local-") and len(instance.id) == len("i-local-") + 12
    assert instance.name == "podvm-web-token-1"
    assert instance.ips == (str(local_provider.config.gateway + 1),)
    assert instance.tags == {"peerpods.io/node": "node-1", "peerpods.io/pod": "default/web"}
    assert os.path.exists(f"/run/netns/{instance.id}")
    all_links = await links()
    veth = all_links[machine.host_veth_name(instance.id)]
    assert veth.get("IFLA_MASTER") == all_links[local_provider.config.bridge]["index"]

    client = await dial_agent(instance.ips[0], local_provider, instance.id)
    await client.close()
    log = await wait_console(local_provider, instance.id, "boot complete")
    order = ["booting", "started process-user-data", "exited with status 0", "created network namespace podns",
             "started agent", "agent is serving", "started forwarder", "boot complete"]
    positions = [log.index(step) for step in order]
    assert positions == sorted(positions), log


async def test_the_vm_has_its_own_run_and_podns(local_provider):
    a = await local_provider.create_instance(spec("a"))
    b = await local_provider.create_instance(spec("b"))
    for instance in (a, b):
        await wait_console(local_provider, instance.id, "boot complete")
        run = local_provider.config.cloud_dir / instance.id / "run"
        assert (run / "netns" / "podns").exists()
        assert (run / "peerpod" / "apf.json").exists(), "process-user-data wrote apf.json in the VM's /run"
        assert (run / "kata-containers" / "agent.sock").exists()
    assert not os.path.exists("/run/netns/podns")
    assert not os.path.exists("/run/peerpod/apf.json")
    assert a.ips != b.ips


async def test_exec_through_the_forwarder_runs_in_the_vms_podns(local_provider):
    instance = await local_provider.create_instance(spec())
    client = await dial_agent(instance.ips[0], local_provider, instance.id)
    try:
        call = client.call_message
        await call("grpc.AgentService", "CreateSandbox", agent_pb2.CreateSandboxRequest(sandbox_id="s"), empty_pb2.Empty)
        oci = agent_pb2.Spec()
        oci.Process.Args.extend(["sleep", "30"])
        await call("grpc.AgentService", "CreateContainer",
                   agent_pb2.CreateContainerRequest(container_id="c", exec_id="c", OCI=oci), empty_pb2.Empty)
        await call("grpc.AgentService", "StartContainer", agent_pb2.StartContainerRequest(container_id="c"),
                   empty_pb2.Empty)
        process = agent_pb2.Process(Args=["cat", "/proc/net/dev"])
        await call("grpc.AgentService", "ExecProcess",
                   agent_pb2.ExecProcessRequest(container_id="c", exec_id="e", process=process), empty_pb2.Empty)
        status = await call("grpc.AgentService", "WaitProcess",
                            agent_pb2.WaitProcessRequest(container_id="c", exec_id="e"), agent_pb2.WaitProcessResponse)
        out = await call("grpc.AgentService", "ReadStdout",
                         agent_pb2.ReadStreamRequest(container_id="c", exec_id="e", len=65536),
                         agent_pb2.ReadStreamResponse)
    finally:
        await client.close()
    assert status.status == 0
    interfaces = {line.split(":")[0].strip() for line in out.data.decode().splitlines()[2:]}
    assert interfaces == {"lo"}, f"expected the VM's podns (only lo), got {interfaces}"


async def test_the_forwarder_serves_mutual_tls_from_the_user_data(local_provider, tmp_path: Path):
    tls = AdaptorTls.from_settings(Settings(state_dir=tmp_path / "adaptor", node_name="node-1"))
    assert tls is not None
    address = str(local_provider.config.gateway + 1)  # the first VM's address
    material = tls.mint_vm_material(address)
    instance = await local_provider.create_instance(spec("tls", data=user_data(tls=material)))
    assert instance.ips == (address,)
    client = await dial_agent(address, local_provider, instance.id, ssl=tls.client_context(), server_hostname=address)
    await client.close()


async def test_create_is_idempotent_by_client_token(local_provider):
    first = await local_provider.create_instance(spec("same"))
    again = await local_provider.create_instance(spec("same"))
    assert again == first
    assert len(await local_provider.list_owned({})) == 1
    other = await local_provider.create_instance(spec("other"))
    assert other.id != first.id


async def test_describe_instance_reads_one_instance_with_its_tags(local_provider):
    instance = await local_provider.create_instance(spec("described"))
    assert await local_provider.describe_instance(instance.id) == instance
    assert await local_provider.describe_instance("../etc") is None, "an id that is no instance name is not a path"
    await local_provider.delete_instance(instance.id)
    assert await local_provider.describe_instance(instance.id) is None


async def test_concurrent_creates_get_distinct_addresses(local_provider):
    instances = await asyncio.gather(*(local_provider.create_instance(spec(f"t{n}")) for n in range(4)))
    gateway = local_provider.config.gateway
    assert sorted(i.ips[0] for i in instances) == [str(gateway + n) for n in range(1, 5)]
    assert len({i.id for i in instances}) == 4
    clients = await asyncio.gather(*(dial_agent(i.ips[0], local_provider, i.id) for i in instances))
    await asyncio.gather(*(c.close() for c in clients))


async def test_the_vm_does_not_inherit_the_workers_environment(local_provider, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-only-secret")
    instance = await local_provider.create_instance(spec())
    await wait_console(local_provider, instance.id, "boot complete")
    init_pid = int((local_provider.config.cloud_dir / instance.id / "init.pid").read_text())
    environ = Path(f"/proc/{init_pid}/environ").read_bytes()
    assert b"worker-only-secret" not in environ and b"PATH=" in environ


async def test_boot_delay_is_honoured(local_cloud):
    # A lower bound from the VM's own console clock only: a loaded machine makes the boot later, never earlier.
    provider = local_cloud.provider(boot_delay=0.6)
    assert await provider.verify() == []  # as the daemon does at start: the fork server is up before the first VM
    instance = await provider.create_instance(spec())
    log = await wait_console(provider, instance.id, "boot complete")
    waited = stamp(log, "started process-user-data") - stamp(log, "booting")
    assert waited >= datetime.timedelta(seconds=0.59), f"the first step ran {waited} after boot, not 0.6 s:\n{log}"
    assert "boot delay 0.6s" in log


async def test_create_returns_while_the_vm_is_still_in_its_boot_delay(local_cloud):
    # Event-based, not a wall-clock bound: with a boot delay no test outlives, create must come back
    # while the VM's init is still waiting (its console shows the delay and no boot step yet).
    provider = local_cloud.provider(boot_delay=3600)
    instance = await provider.create_instance(spec())
    try:
        log = await wait_console(provider, instance.id, "booting (boot delay 3600s)")
        assert "started process-user-data" not in log, f"create waited for the boot:\n{log}"
    finally:
        await provider.delete_instance(instance.id)  # SIGTERM ends the delay at once
    assert await provider.list_owned({}) == []


async def test_agent_command_is_configurable(local_cloud):
    command = (f"sh -c 'echo custom agent on $0; exec \"$1\" -m cloudadaptor.dev.devagent --socket \"$0\"' "
               f"{{socket}} {sys.executable}")
    provider = local_cloud.provider(agent_command=command)
    instance = await provider.create_instance(spec())
    client = await dial_agent(instance.ips[0], provider, instance.id)
    await client.close()
    assert "custom agent on /run/kata-containers/agent.sock" in console(provider, instance.id)


async def test_a_failed_create_leaves_nothing_behind(local_provider, monkeypatch):
    def boom(self, record):
        raise RuntimeError("the hypervisor is on fire")

    monkeypatch.setattr(LocalProvider, "_launch", boom)
    with pytest.raises(ProviderError, match="the hypervisor is on fire"):
        await local_provider.create_instance(spec())
    assert await local_provider.list_owned({}) == []
    assert not [n for n in os.listdir("/run/netns") if n.startswith("i-local-")]
    assert not [n for n in await links() if n.startswith("lc-")]


async def test_the_cloud_runs_out_of_addresses(local_cloud):
    provider = local_cloud.provider(cidr=ipaddress.IPv4Network("203.0.113.0/30"))
    instance = await provider.create_instance(spec("only"))
    assert instance.ips == ("203.0.113.2",)
    with pytest.raises(ProviderError, match="no free address"):
        await provider.create_instance(spec("one-too-many"))


# ---------------------------------------------------------------------- delete


async def test_delete_removes_netns_veth_processes_and_directory(local_cloud, local_provider):
    instance = await local_provider.create_instance(spec())
    await wait_console(local_provider, instance.id, "boot complete")
    netns_path = f"/run/netns/{instance.id}"
    vm_pids = pids_in_netns(netns_path)
    assert len(vm_pids) == 2, "the init (process-user-data, pod network and forwarder run in it) and the agent"
    await local_provider.delete_instance(instance.id)
    assert not os.path.exists(netns_path)
    assert machine.host_veth_name(instance.id) not in await links()
    assert not (local_provider.config.cloud_dir / instance.id).exists()
    assert [pid for pid in vm_pids if alive(pid)] == []
    assert local_cloud.vm_processes() == []
    assert await local_provider.list_owned({}) == []


async def test_delete_of_a_missing_instance_succeeds_and_concurrent_deletes_are_safe(local_provider):
    await local_provider.delete_instance("i-local-000000000000")
    await local_provider.delete_instance("not-even-an-id")
    instance = await local_provider.create_instance(spec())
    await asyncio.gather(*(local_provider.delete_instance(instance.id) for _ in range(3)))
    await local_provider.delete_instance(instance.id)
    assert await local_provider.list_owned({}) == []


async def test_delete_stops_a_vm_still_booting(local_cloud):
    provider = local_cloud.provider(boot_delay=30)
    instance = await provider.create_instance(spec())
    await wait_console(provider, instance.id, "booting")
    started = time.monotonic()
    await provider.delete_instance(instance.id)
    assert time.monotonic() - started < 3, "SIGTERM interrupts the boot delay"
    assert local_cloud.vm_processes() == []


# --------------------------------------------------------- list, persistence


async def test_list_owned_filters_by_every_tag(local_provider):
    a = await local_provider.create_instance(spec("a", {"peerpods.io/sandbox-id": "a", "team": "x"}))
    b = await local_provider.create_instance(spec("b", {"peerpods.io/sandbox-id": "b", "team": "x"}))
    await local_provider.create_instance(spec("c", {"peerpods.io/node": "node-2"}))
    ids = lambda instances: sorted(i.id for i in instances)  # noqa: E731
    assert ids(await local_provider.list_owned({"team": "x"})) == sorted([a.id, b.id])
    assert ids(await local_provider.list_owned({"team": "x", "peerpods.io/sandbox-id": "b"})) == [b.id]
    assert ids(await local_provider.list_owned({"peerpods.io/node": "node-1"})) == sorted([a.id, b.id])
    assert await local_provider.list_owned({"team": "y"}) == []
    assert len(await local_provider.list_owned({})) == 3


async def test_addresses_are_reused_and_persist_across_provider_instances(local_cloud):
    first = local_cloud.provider()
    gateway = first.config.gateway
    a = await first.create_instance(spec("a"))
    b = await first.create_instance(spec("b"))
    assert (a.ips, b.ips) == ((str(gateway + 1),), (str(gateway + 2),))
    await first.delete_instance(a.id)
    await first.close()

    second = local_cloud.provider()  # a restarted adaptor over the same cloud dir
    assert [i.id for i in await second.list_owned({})] == [b.id]
    c = await second.create_instance(spec("c"))
    assert c.ips == a.ips, "the lowest free address is reused"
    d = await second.create_instance(spec("d"))
    assert d.ips == (str(gateway + 3),)
    assert await second.create_instance(spec("b")) == b, "client tokens survive the restart"
    client = await dial_agent(b.ips[0], second, b.id)  # VMs kept running across the restart
    await client.close()
