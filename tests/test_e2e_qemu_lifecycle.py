"""QEMU-mode lifecycle end to end: the warm pool, a third-party kata-agent, a daemon killed and
restarted, and a truncated image.

One real VM boot covers three things (it is the expensive part, ~60 s under TCG): a real
``cloud-api-adaptor serve`` process with ``LOCAL_VM=qemu``, ``PODVM_POOL_SIZE=1`` and the image
whose kata-agent is ``fakes/thirdpartyagent.py`` (selected with ``LOCAL_QEMU_IMAGE``) boots a pool
VM; a pod claims it (warm start, the pool's VM and no other); CreateSandbox reaches the
third-party agent through the forwarder (it prints what it received on the guest console); the
daemon is SIGKILLed mid-refill and restarted with the pool off, re-adopts the pod's running QEMU
VM (the agent answers through the proxy again) and deletes the pool's; StopVM leaves no QEMU
process, tap, overlay or instance directory.

The truncated image needs no boot to agent-ready: its guest dies at once (the initramfs cannot
mount the root, panic=-1); StartVM through the hypervisor socket fails at PROXY_TIMEOUT with the
console tail (the failed mount) in the daemon's log and deletes the VM. Under CI=true a missing QEMU or image fails these tests, never skips them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path

import pytest

from cloudadaptor.adaptor.poolstore import PoolState, PoolStore
from cloudadaptor.adaptor.store import SandboxStore
from cloudadaptor.dev.shim import AgentSession, ShimEmulator, shim_annotations, start_pod, stop_pod
from cloudadaptor.protocols import health_pb2
from qemu_support import leftovers, qemu_processes, truncated_copy
from test_e2e import daemon_factory  # noqa: F401 - the fixture
from test_e2e_restart import ServeProcess, serve_process  # noqa: F401 - the fixture

BOOT_TIMEOUT = 480.0  # a pool VM's boot to claim-ready under TCG on a busy 2-core machine (~60 s idle)


def _stores(proc: ServeProcess) -> tuple[dict[str, str], list]:
    """(sandbox id -> instance id, pool VMs) as the daemon recorded them in its state database."""
    store = SandboxStore(proc.root / "state.db")
    try:
        return {s.id: s.instance_id for s in store.all()}, PoolStore(store).all()
    finally:
        store.close()


def _log(proc: ServeProcess) -> str:
    return (proc.root / "serve.log").read_text(errors="replace")


async def _until(what: str, proc: ServeProcess, check, timeout: float, poll: float = 1.0):
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` with the daemon log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await asyncio.to_thread(check)
        if found:
            return found
        assert proc.process is not None and proc.process.poll() is None, f"daemon exited while {what}:\n{_log(proc)[-3000:]}"
        await asyncio.sleep(poll)
    pytest.fail(f"timed out after {timeout:g}s {what}; daemon log tail:\n{_log(proc)[-3000:]}")


def _console(cloud_dir: Path, instance_id: str) -> str:
    try:
        return (cloud_dir / instance_id / "console.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


@pytest.fixture
async def qemu_serve(serve_process):  # noqa: F811
    """``serve_process`` whose teardown first deletes whatever a failed test left in its cloud
    (pool VMs too) and turns the pool off, so the cleaner daemon never boots a new pool VM."""
    from cloudadaptor.config import load_settings
    from cloudadaptor.providers.base import create_provider

    made: list[ServeProcess] = []

    def make(**extra: str) -> ServeProcess:
        made.append(serve_process(**extra))
        return made[-1]

    yield make
    for proc in made:
        if proc.process is not None and proc.process.poll() is None:
            proc.kill()
        proc.env["PODVM_POOL_SIZE"] = "0"
        provider = create_provider(load_settings(proc.env))
        for entry in sorted((proc.root / "local-cloud").glob("i-local-*")):
            await provider.delete_instance(entry.name)
        await provider.close()


async def test_a_warm_pool_vm_serves_a_third_party_agent_and_survives_a_daemon_kill(
        thirdparty_qemu_image, qemu_serve, make_pod_netns):
    proc = qemu_serve(LOCAL_VM="qemu", LOCAL_QEMU_IMAGE=str(thirdparty_qemu_image.directory),
                      PODVM_POOL_SIZE="1", PROXY_TIMEOUT=f"{BOOT_TIMEOUT:g}s")
    cloud_dir = proc.root / "local-cloud"
    await proc.start()

    # 1. The pool boots one QEMU VM to its claim step (user data without a pod, from the metadata service).
    began = time.monotonic()
    [pool_vm] = await _until("waiting for the pool's QEMU VM to be ready", proc,
                             lambda: [vm for vm in _stores(proc)[1] if vm.state is PoolState.READY], BOOT_TIMEOUT)
    print(f"pool VM {pool_vm.instance_id} ready {time.monotonic() - began:.1f}s after the daemon started")
    assert qemu_processes(cloud_dir), "the ready pool VM is a running QEMU process"

    # 2. A pod claims it: warm start, on exactly that VM.
    shim = ShimEmulator(proc.socket)
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.80/24", "198.51.100.1")
    began = time.monotonic()
    run, _, _ = await start_pod(shim, "warm-thirdparty", "e2e", pod.path)
    print(f"warm pod start (CreateVM to agent-ready through the proxy) {time.monotonic() - began:.1f}s")
    print("\n".join(line for line in _log(proc).splitlines()
                    if run.sandbox_id in line and ("claimed pool VM" in line or "agent ready" in line)))
    owners, pool = _stores(proc)
    assert owners == {run.sandbox_id: pool_vm.instance_id}, (
        f"the pod must run on the claimed pool VM {pool_vm.instance_id}: sandboxes {owners}")
    assert all(vm.instance_id != pool_vm.instance_id for vm in pool), "a claimed VM is no longer the pool's"
    assert f"claimed pool VM {pool_vm.name} ({pool_vm.instance_id})" in _log(proc), "the log names the claimed VM"

    # 3. CreateSandbox reached the third-party agent (not our development agent) through the forwarder.
    assert run.guest is not None and not run.guest.agent_details.version.startswith("devagent"), run.guest
    created = await _until("waiting for the third-party agent's CreateSandbox line on the guest console", proc,
                           lambda: [line for line in _console(cloud_dir, pool_vm.instance_id).splitlines()
                                    if "thirdparty-agent: grpc.AgentService/CreateSandbox" in line], 60.0)
    assert run.sandbox_id.encode().hex() in created[0], f"CreateSandbox carried the sandbox id: {created[0]}"
    assert "thirdparty-agent: serving on /run/kata-containers/agent.sock" in _console(cloud_dir, pool_vm.instance_id)

    # 4. SIGKILL the daemon (its refill of the pool has begun); the pod's QEMU keeps running.
    pid = int((cloud_dir / pool_vm.instance_id / "qemu.pid").read_text())
    await run.session.close()
    proc.kill()
    assert str(pid) in qemu_processes(cloud_dir), "QEMU is not the daemon's child: it survives the kill"

    # 5. Restart with the pool off: the pod's VM is re-adopted, every pool VM (the refill) is deleted.
    proc.env["PODVM_POOL_SIZE"] = "0"
    await proc.start()
    await _until("waiting for the restarted daemon to delete the pool's VMs (pool off)", proc,
                 lambda: not _stores(proc)[1] and [p.name for p in cloud_dir.glob("i-local-*")] == [pool_vm.instance_id],
                 120.0, poll=0.5)
    assert qemu_processes(cloud_dir) == [str(pid)], "only the pod's QEMU runs, the same process as before the kill"
    assert _stores(proc)[0] == {run.sandbox_id: pool_vm.instance_id}, "the pod kept its VM across the restart"

    # 6. The agent still answers through the restarted daemon's proxy, the forwarder and the guest.
    before = _console(cloud_dir, pool_vm.instance_id).count("grpc.AgentService/GetGuestDetails")
    run.session = await AgentSession.dial(run.agent_socket, timeout=60)
    assert await run.session.health_check() == health_pb2.HealthCheckResponse.SERVING
    await run.session.guest_details()
    await _until("waiting for the re-adopted VM's agent to log GetGuestDetails again", proc,
                 lambda: _console(cloud_dir, pool_vm.instance_id).count("grpc.AgentService/GetGuestDetails") > before,
                 60.0, poll=0.5)

    # 7. StopVM: nothing of the VM is left (process, tap, overlay and directory), no pool VM either.
    await stop_pod(shim, run)
    assert _stores(proc) == ({}, []), "no sandbox and no pool VM recorded after StopVM"
    assert await asyncio.to_thread(leftovers, cloud_dir) == ([], [], []), "StopVM leaves no tap, directory or QEMU"


async def test_a_truncated_image_fails_startvm_with_the_console_tail_and_leaves_nothing(
        qemu_image, daemon_factory, make_pod_netns, tmp_path, caplog):  # noqa: F811
    broken = truncated_copy(qemu_image, tmp_path / "truncated-image")
    daemon, socket_path = await daemon_factory(LOCAL_VM="qemu", LOCAL_QEMU_IMAGE=str(broken), PROXY_TIMEOUT="30s")
    cloud_dir = Path(daemon.settings.state_dir) / "local-cloud"
    shim = ShimEmulator(socket_path)
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.81/24", "198.51.100.1")
    sandbox_id = os.urandom(32).hex()
    with caplog.at_level(logging.INFO):
        await shim.create_vm(sandbox_id, pod.path, shim_annotations("truncated", "e2e"))
        with pytest.raises(Exception) as failed:
            await shim.start_vm(sandbox_id)
    message = str(failed.value)
    assert "never answered" in message or "DEADLINE" in message.upper(), f"StartVM's error: {message}"
    assert re.search(r"VM i-local-[0-9a-f]+ deleted", message), f"the error says the VM was deleted: {message}"
    tails = [r.getMessage() for r in caplog.records if "never answered" in r.getMessage()]
    assert tails and "console lines of VM" in tails[0], f"the daemon log holds the console tail: {tails}"
    # The initramfs cannot mount the root and panic=-1 ends the guest (about 5 s of guest time).
    assert "Failed to mount /dev/vda as root file system" in tails[0], f"the tail shows why the guest died: {tails[0]}"
    await shim.stop_vm(sandbox_id)
    assert await daemon.provider.list_owned({}) == []
    assert await asyncio.to_thread(leftovers, cloud_dir) == ([], [], []), "a failed start leaves no tap, directory or QEMU"
