"""Sandbox lifecycle with a fake provider and a fake agent on loopback."""

from __future__ import annotations

import asyncio
import inspect
import os

import pytest

from cloudadaptor.adaptor import recovery
from cloudadaptor.adaptor.lifecycle import LifecycleError
from cloudadaptor.adaptor.validation import instance_spec, vm_name_for
from cloudadaptor.adaptor.store import SandboxState
from cloudadaptor.protocols import health_pb2
from cloudadaptor.providers import base as providers
from cloudadaptor.dev.shim import shim_annotations
from cloudadaptor.ttrpc.client import Client
from cloudadaptor.ttrpc.errors import Code

SANDBOX = "a" * 64


@pytest.mark.parametrize("bad_id", ["", "../etc", "a/b", "x\x00y", "a" * 129, ".."])
async def test_createvm_rejects_bad_ids(lifecycle_factory, netns_file, bad_id):
    lifecycle = lifecycle_factory(agent_port=1)
    with pytest.raises(LifecycleError) as err:
        await lifecycle.create(bad_id, shim_annotations("p", "ns"), netns_file)
    assert err.value.code == Code.INVALID_ARGUMENT, err.value.message
    assert "sandbox id" in err.value.message
    assert lifecycle.store.all() == []


async def test_createvm_rejects_missing_netns(lifecycle_factory, tmp_path):
    lifecycle = lifecycle_factory(agent_port=1)
    for path, words in [("", "empty"), ("relative/ns", "absolute"), (str(tmp_path / "gone"), "does not exist")]:
        with pytest.raises(LifecycleError) as err:
            await lifecycle.create(SANDBOX, shim_annotations("p", "ns"), path)
        assert err.value.code == Code.INVALID_ARGUMENT
        assert "networkNamespacePath" in err.value.message and words in err.value.message


async def test_createvm_rejects_non_numeric_memory_annotation(lifecycle_factory, netns_file):
    lifecycle = lifecycle_factory(agent_port=1)
    annotations = shim_annotations("p", "ns", {"io.katacontainers.config.hypervisor.default_memory": "lots"})
    with pytest.raises(LifecycleError) as err:
        await lifecycle.create(SANDBOX, annotations, netns_file)
    assert "default_memory" in err.value.message


async def test_repeated_createvm_keeps_one_sandbox(lifecycle_factory, netns_file, short_dir):
    lifecycle = lifecycle_factory(agent_port=1)
    first = await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    second = await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    assert first == second == str(short_dir / "pods" / SANDBOX / "agent.ttrpc")
    assert [s.id for s in lifecycle.store.all()] == [SANDBOX]
    assert os.path.isdir(short_dir / "pods" / SANDBOX)


async def test_createvm_renders_user_data_with_forwarder_config(lifecycle_factory, netns_file):
    import base64

    from cloudadaptor import initdata, podconfig, userdata

    document = b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"aa.toml" = "x"\n'
    plain = base64.b64encode(document).decode()
    lifecycle = lifecycle_factory(agent_port=1)
    await lifecycle.create(SANDBOX, shim_annotations("web", "prod", {"io.katacontainers.config.hypervisor.cc_init_data": plain}), netns_file)
    files = userdata.parse(lifecycle.store.get(SANDBOX).user_data)
    config = podconfig.ForwarderConfig.from_json(files[userdata.APF_CONFIG_PATH])
    assert (config.sandbox_id, config.pod_name, config.pod_namespace) == (SANDBOX, "web", "prod")
    assert initdata.decode(files[userdata.INITDATA_PATH]).document == document, "the VM gets the same document"


async def test_startvm_creates_tagged_vm_and_serves_agent_socket(lifecycle_factory, provider, agent, netns_file):
    lifecycle = lifecycle_factory(agent_port=agent.port)
    socket_path = await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    await lifecycle.start(SANDBOX)
    [spec] = provider.created
    assert spec.name == vm_name_for("web", SANDBOX) == "podvm-web-aaaaaaaa"
    assert spec.tags[providers.TAG_SANDBOX] == SANDBOX
    assert spec.tags[providers.TAG_NODE] == "node-a"
    assert spec.tags[providers.TAG_CLUSTER] == "cluster-a"
    assert spec.tags[providers.TAG_POD] == "prod/web"
    assert (spec.vcpus, spec.memory_mib) == (1, 2048)
    sandbox = lifecycle.store.get(SANDBOX)
    assert sandbox.state is SandboxState.RUNNING and sandbox.instance_id == "i-fake-1"
    assert oct(os.stat(socket_path).st_mode & 0o777) == "0o600"
    async with await Client.connect_unix(socket_path) as client:
        reply = await client.call_message("grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await lifecycle.start(SANDBOX)  # running: harmless
    assert len(provider.created) == 1


async def test_startvm_unknown_id_is_not_found(lifecycle_factory):
    lifecycle = lifecycle_factory(agent_port=1)
    with pytest.raises(LifecycleError) as err:
        await lifecycle.start("nope")
    assert err.value.code == Code.NOT_FOUND


async def test_startvm_agent_never_answers_deletes_vm_within_proxy_timeout(lifecycle_factory, provider, netns_file, unused_tcp_port, proxy_probe):
    lifecycle = lifecycle_factory(agent_port=unused_tcp_port, proxy_timeout=1.0, proxy_factory=proxy_probe)
    await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    with pytest.raises(LifecycleError) as err:
        await lifecycle.start(SANDBOX)
    assert err.value.code == Code.DEADLINE_EXCEEDED
    message = err.value.message
    assert "did not answer within 1s" in message and "127.0.0.1" in message and "deleted" in message, message
    # The proxy's own tests hold it to its deadline; here: StartVM waits once, with PROXY_TIMEOUT.
    assert proxy_probe.timeouts == [1.0], f"StartVM waited for the agent with timeouts {proxy_probe.timeouts}, expected [1.0]"
    assert provider.deleted == ["i-fake-1"] and provider.instances == {}
    assert lifecycle.store.get(SANDBOX).state is SandboxState.FAILED


async def test_startvm_provider_failure_names_the_cause(lifecycle_factory, provider, netns_file):
    provider.fail_create = "InsufficientInstanceCapacity: no t3.medium in us-east-1a"
    lifecycle = lifecycle_factory(agent_port=1)
    await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    with pytest.raises(LifecycleError) as err:
        await lifecycle.start(SANDBOX)
    assert err.value.code == Code.UNAVAILABLE
    assert "InsufficientInstanceCapacity" in err.value.message


async def test_cancelled_startvm_still_deletes_the_vm(lifecycle_factory, provider, netns_file, unused_tcp_port, proxy_probe):
    lifecycle = lifecycle_factory(agent_port=unused_tcp_port, proxy_timeout=30, proxy_factory=proxy_probe)
    await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    task = asyncio.create_task(lifecycle.start(SANDBOX))
    await asyncio.wait_for(proxy_probe.waiting.wait(), 10)  # VM created, tunnel up, waiting for the agent
    assert list(provider.instances) == ["i-fake-1"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The shielded rollback finished before the cancellation reached the caller.
    assert provider.deleted == ["i-fake-1"] and provider.instances == {}
    assert lifecycle.store.get(SANDBOX).state is SandboxState.FAILED


async def test_stopvm_removes_everything_and_twice_is_harmless(lifecycle_factory, provider, agent, netns_file, short_dir):
    lifecycle = lifecycle_factory(agent_port=agent.port)
    socket_path = await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    await lifecycle.start(SANDBOX)
    await lifecycle.stop(SANDBOX)
    assert provider.deleted == ["i-fake-1"]
    assert not os.path.exists(socket_path) and not (short_dir / "pods" / SANDBOX).exists()
    assert lifecycle.store.all() == []
    await lifecycle.stop(SANDBOX)
    with pytest.raises(LifecycleError) as err:
        await lifecycle.stop("b" * 64)
    assert err.value.code == Code.NOT_FOUND


async def test_stopvm_cancels_a_start_in_progress(lifecycle_factory, provider, netns_file, unused_tcp_port, proxy_probe):
    lifecycle = lifecycle_factory(agent_port=unused_tcp_port, proxy_timeout=30, proxy_factory=proxy_probe)
    await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    start = asyncio.create_task(lifecycle.start(SANDBOX))
    await asyncio.wait_for(proxy_probe.waiting.wait(), 10)
    await asyncio.wait_for(lifecycle.stop(SANDBOX), 5)
    with pytest.raises(LifecycleError) as err:
        await start  # the shim's StartVM gets an answer, not silence
    assert err.value.code == Code.ABORTED and "StopVM" in err.value.message
    assert provider.instances == {} and lifecycle.store.all() == []


async def test_restarted_lifecycle_reserves_running_sandbox_and_sweeps_orphans(lifecycle_factory, provider, agent, netns_file):
    first = lifecycle_factory(agent_port=agent.port)
    socket_path = await first.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    await first.start(SANDBOX)
    await first.close()  # the daemon exits; the VM keeps running
    assert not os.path.exists(socket_path)
    ghost_tags = {providers.TAG_OWNER: providers.OWNER_VALUE, providers.TAG_NODE: "node-a", providers.TAG_SANDBOX: "ghost"}
    orphan = await provider.create_instance(providers.InstanceSpec(
        name="podvm-ghost", sandbox_id="ghost", user_data="", client_token="t",
        tags={**ghost_tags, providers.TAG_CLUSTER: "cluster-a"},
    ))
    other_cluster = await provider.create_instance(providers.InstanceSpec(
        name="podvm-ghost", sandbox_id="ghost", user_data="", client_token="t2",
        tags={**ghost_tags, providers.TAG_CLUSTER: "cluster-b"},
    ))
    untagged = await provider.create_instance(providers.InstanceSpec(
        name="podvm-ghost", sandbox_id="ghost", user_data="", client_token="t3", tags=ghost_tags))
    second = lifecycle_factory(agent_port=agent.port)
    actions = await second.recover()
    assert any("re-serving" in a for a in actions), actions
    assert provider.deleted == [orphan.id], "a VM of another cluster (same node name), or of none, is not ours to sweep"
    assert other_cluster.id in provider.instances and untagged.id in provider.instances
    assert "i-fake-1" in provider.instances
    async with await Client.connect_unix(socket_path) as client:
        reply = await client.call_message("grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_recover_deletes_vm_of_start_interrupted_by_crash(lifecycle_factory, provider, netns_file):
    first = lifecycle_factory(agent_port=1)
    await first.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    # Crash between "VM requested" and "instance id recorded": only the tag knows.
    first.store.update(SANDBOX, state=SandboxState.STARTING)
    await provider.create_instance(instance_spec(first.store.get(SANDBOX), first.options.node_name, recovery.vm_tags(first.options)))
    second = lifecycle_factory(agent_port=1)
    await second.recover()
    assert provider.instances == {}
    assert second.store.get(SANDBOX).state is SandboxState.FAILED


async def test_getinfo_waits_for_the_vm(lifecycle_factory, agent, netns_file):
    lifecycle = lifecycle_factory(agent_port=agent.port)
    with pytest.raises(LifecycleError) as err:
        await lifecycle.vm_id_of_pod("prod", "web", wait=False)
    assert err.value.code == Code.NOT_FOUND
    changed = lifecycle._changed = CountingCondition()
    waiter = asyncio.create_task(lifecycle.vm_id_of_pod("prod", "web", wait=True))
    assert await asyncio.wait_for(changed.blocked.get(), 5) == 1, "GetInfo waits while the pod has no sandbox"
    await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    # Woken by CreateVM, it saw a sandbox without a VM and blocked again.
    assert await asyncio.wait_for(changed.blocked.get(), 5) == 2
    assert not waiter.done()
    await lifecycle.start(SANDBOX)
    assert await asyncio.wait_for(waiter, 2) == "i-fake-1"


class CountingCondition(asyncio.Condition):
    """An ``asyncio.Condition`` that reports each time a waiter blocks (1, 2, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0
        self.blocked: asyncio.Queue[int] = asyncio.Queue()

    async def wait(self) -> bool:
        self.waits += 1
        self.blocked.put_nowait(self.waits)
        return await super().wait()


def test_vm_name_is_sanitized_and_bounded():
    name = vm_name_for("My_Pod.With-A-Very-Long-Name-" + "x" * 80, "0123456789abcdef")
    assert name.startswith("podvm-my-pod-with-a-very-long-name-") and name.endswith("-01234567")
    assert len(name) <= 63
    assert vm_name_for("", "deadbeefcafe") == "podvm-deadbeef"


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    async def vm_created(self, sandbox_id, pod_namespace, pod_name, instance_id, provider_name, instance_type=""):
        self.events.append(("created", sandbox_id, f"{pod_namespace}/{pod_name}", instance_id, provider_name))

    async def vm_deleted(self, sandbox_id, pod_namespace, pod_name, instance_id):
        self.events.append(("deleted", sandbox_id, f"{pod_namespace}/{pod_name}", instance_id))


async def test_startvm_beyond_the_node_limit_is_resource_exhausted(lifecycle_factory, provider, agent, netns_file):
    lifecycle = lifecycle_factory(agent_port=agent.port, vm_limit=1)
    other = "b" * 64
    await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    await lifecycle.create(other, shim_annotations("api", "prod"), netns_file)
    await lifecycle.start(SANDBOX)
    with pytest.raises(LifecycleError) as err:
        await lifecycle.start(other)
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    assert "PEERPODS_LIMIT_PER_NODE=1" in err.value.message
    assert len(provider.created) == 1, "no VM is requested beyond the limit"
    await lifecycle.stop(SANDBOX)
    await lifecycle.start(other)  # the slot is free again
    assert lifecycle.store.get(other).state is SandboxState.RUNNING


async def test_observer_hears_of_every_vm_created_and_deleted(lifecycle_factory, provider, agent, netns_file, unused_tcp_port):
    observer = RecordingObserver()
    lifecycle = lifecycle_factory(agent_port=agent.port, observer=observer)
    await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    await lifecycle.start(SANDBOX)
    await lifecycle.stop(SANDBOX)
    assert observer.events == [
        ("created", SANDBOX, "prod/web", "i-fake-1", "fake"),
        ("deleted", SANDBOX, "prod/web", "i-fake-1"),
    ]
    failing = lifecycle_factory(agent_port=unused_tcp_port, proxy_timeout=0.3, observer=observer)
    await failing.create("c" * 64, shim_annotations("db", "prod"), netns_file)
    with pytest.raises(LifecycleError):
        await failing.start("c" * 64)
    assert observer.events[-2:] == [
        ("created", "c" * 64, "prod/db", "i-fake-2", "fake"),
        ("deleted", "c" * 64, "prod/db", "i-fake-2"),
    ]


def test_fake_provider_keeps_the_provider_protocol(provider):
    """The static check is in tests/test_lint.py; this one also compares signatures at run time."""
    assert isinstance(provider, providers.Provider)
    for name in ("verify", "create_instance", "delete_instance", "list_owned", "close"):
        want, got = getattr(providers.Provider, name), getattr(type(provider), name)
        assert inspect.iscoroutinefunction(got), f"FakeProvider.{name} must be async like Provider.{name}"
        assert inspect.signature(got) == inspect.signature(want), f"FakeProvider.{name}{inspect.signature(got)} != Provider.{name}{inspect.signature(want)}"
