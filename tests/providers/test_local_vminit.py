"""The namespace VM's init runs our own boot steps in its one interpreter (issue 16 item 4).

In the private namespace (``make test``), on real namespace VMs of the local provider.
"""

from __future__ import annotations

import asyncio
import os
import time

from tests.providers.test_local import dial_agent, spec, wait_console

FORWARDER_PORT = 15150


def _listening_inodes(pid: int, port: int) -> set[str]:
    """Inodes of the TCP sockets listening on ``port`` in ``pid``'s network namespace."""
    inodes = set()
    with open(f"/proc/{pid}/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


async def test_the_forwarder_listens_in_the_init_itself(local_provider):
    instance = await local_provider.create_instance(spec())
    client = await dial_agent(instance.ips[0], local_provider, instance.id)
    await client.close()
    log = await wait_console(local_provider, instance.id, "boot complete")
    init_pid = int((local_provider.config.cloud_dir / instance.id / "init.pid").read_text())
    listening = _listening_inodes(init_pid, FORWARDER_PORT)
    assert listening and listening <= _socket_inodes(init_pid), "port 15150 is the init's own socket"
    for step in ("process-user-data", "pod-network"):
        assert f"started {step} (in the init)" in log and f"{step} exited with status 0" in log, log
    assert "started forwarder (in the init)" in log, log


async def test_sigterm_interrupts_process_user_data_retrying(local_cloud):
    provider = local_cloud.provider(boot_delay=1.0)
    instance = await provider.create_instance(spec())
    user_data = provider.config.cloud_dir / instance.id / "run" / "cloud-data" / "user-data"
    user_data.unlink()  # during the boot delay: process-user-data then retries until its deadline
    user_data.mkdir()
    await wait_console(provider, instance.id, "user data not available yet")
    started = time.monotonic()
    await provider.delete_instance(instance.id)
    assert time.monotonic() - started < 3, "SIGTERM ends the retries (not SIGKILL after 5 s)"
    assert local_cloud.vm_processes() == []


async def test_a_vm_whose_user_data_fails_runs_no_forwarder(local_cloud):
    provider = local_cloud.provider(boot_delay=0.5)
    instance = await provider.create_instance(spec(data="#cloud-config\nwrite_files: 12\n"))
    log = await wait_console(provider, instance.id, "boot complete")
    assert "process-user-data exited with status 1" in log, log
    assert "pod-network not started" in log and "forwarder not started" in log, log
    assert "started agent" in log, "the agent still starts, as its unit does"


def _children(pid: int) -> dict[int, tuple[str, str]]:
    """``pid``'s children: pid → (state, command name)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    name, rest = f.read().rsplit(")", 1)
            except OSError:
                continue
            fields = rest.split()
            if int(fields[1]) == pid:
                out[int(entry)] = (fields[0], name.split("(", 1)[1])
    return out


async def test_the_init_reaps_its_agent_and_the_orphans_it_leaves(local_cloud):
    """SIGCHLD on the init's loop (uvloop's, which refuses ``add_signal_handler`` for it): an agent that
    exits is seen (its status logged), and its orphan, reparented to the init, is reaped too."""
    provider = local_cloud.provider(agent_command="sh -c 'sleep 0.3 & exit 3' {socket}")
    instance = await provider.create_instance(spec())
    try:
        log = await wait_console(provider, instance.id, "exited with status 3")
        assert "agent (pid" in log, log
        init_pid = int((provider.config.cloud_dir / instance.id / "init.pid").read_text())
        deadline = time.monotonic() + 10
        while (children := _children(init_pid)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not children, f"the init's children left (state, name): {children}"
    finally:
        await provider.delete_instance(instance.id)
    assert local_cloud.vm_processes() == []


def _nsfs_mounts(pid: int) -> list[str]:
    """Mount points of the nsfs mounts (pinned namespaces) in ``pid``'s mount namespace."""
    with open(f"/proc/{pid}/mountinfo") as f:
        fields = [line.split() for line in f]
    return [m[4] for m in fields if m[m.index("-") + 1] == "nsfs"]


async def test_a_vm_pins_no_namespace_of_the_worker(local_provider, tmp_path):
    """The launcher detaches every nsfs mount the VM's mount namespace inherits: the other VMs' and
    pods' netns under /run/netns (one unmount for all) and one bound anywhere else (on its own)."""
    from cloudadaptor import linuxns

    held = tmp_path / "held-netns"
    held.touch()
    linuxns.mount("/proc/self/ns/net", str(held), None, linuxns.MS_BIND)
    try:
        first = await local_provider.create_instance(spec("a"))
        await wait_console(local_provider, first.id, "boot complete")
        second = await local_provider.create_instance(spec("b"))  # the first VM's netns is under /run/netns now
        await wait_console(local_provider, second.id, "boot complete")
        assert any(point.startswith("/run/netns/") for point in _nsfs_mounts(os.getpid())), "the worker has netns"
        for instance in (first, second):
            init_pid = int((local_provider.config.cloud_dir / instance.id / "init.pid").read_text())
            assert _nsfs_mounts(init_pid) == ["/run/netns/podns"], "only the VM's own podns is mounted in it"
    finally:
        linuxns.umount(str(held))
