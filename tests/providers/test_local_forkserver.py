"""Namespace VMs are forks of one pre-imported interpreter, and that interpreter has an owner (issue 16).

In the private namespace (``make test``), on real namespace VMs of the local provider.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cloudadaptor.providers.local_forkserver import MODULE, ForkServer
from tests.providers.test_local import dial_agent, spec, wait_console


def _cmdline(pid: int) -> list[str]:
    """``pid``'s command line; waits while it is empty (the kernel sets it up just after exec)."""
    deadline = time.monotonic() + 5
    while not (text := Path(f"/proc/{pid}/cmdline").read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return text.decode().split("\0")


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` has exited (or is a zombie); False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


async def test_vms_are_forks_of_the_fork_server_and_stop_as_before(local_cloud):
    provider = local_cloud.provider()
    instances = await asyncio.gather(*(provider.create_instance(spec(f"token-{n}")) for n in range(2)))
    for instance in instances:
        client = await dial_agent(instance.ips[0], provider, instance.id)
        await client.close()
        log = await wait_console(provider, instance.id, "boot complete")
        assert "started agent (pid " in log and "forked from the init" in log, log
        init_pid = int((provider.config.cloud_dir / instance.id / "init.pid").read_text())
        assert MODULE in _cmdline(init_pid), "the init is a fork of the server, not a new interpreter"
    found = local_cloud.vm_processes()
    assert len(found) >= 4, found  # the leak check (tests/conftest.py) sees forked VMs: init and agent of each
    for instance in instances:
        await provider.delete_instance(instance.id)
    assert local_cloud.vm_processes() == []


async def test_the_fork_server_stops_with_its_provider(local_cloud):
    provider = local_cloud.provider()
    assert await provider.verify() == []
    server = provider._forks._proc  # started by verify, before the first VM
    assert server is not None and server.poll() is None
    await provider.close()
    assert server.poll() is not None, "close() ends the fork server"


def test_the_fork_server_ends_when_its_owner_is_killed(tmp_path):
    owner_code = (
        "import os, sys, time\n"
        "from cloudadaptor.providers.local_forkserver import ForkServer\n"
        "fs = ForkServer(dict(os.environ)); fs.start()\n"
        "print(fs._proc.pid, flush=True); time.sleep(60)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdout=subprocess.PIPE, cwd=os.getcwd())
    try:
        assert owner.stdout is not None
        server_pid = int(owner.stdout.readline())
        assert MODULE in _cmdline(server_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert _gone(server_pid), "the fork server outlived its owner (a daemon killed with SIGKILL)"
    finally:
        owner.kill()
        owner.wait()


def test_a_launch_that_fails_reports_its_status_on_the_console(tmp_path):
    forks = ForkServer(dict(os.environ))
    try:
        console = tmp_path / "console.log"
        with open(console, "ab") as out:
            code = forks.launch(["--instance-dir", str(tmp_path / "missing"), "--netns", "/nonexistent"],
                                out.fileno(), timeout=30)
        assert code == 1
        assert "No such file or directory" in console.read_text()
        with open(console, "ab") as out:  # the server keeps serving after a failed launch
            assert forks.launch(["--no-such-option"], out.fileno(), timeout=30) == 2
    finally:
        forks.close()


def test_the_pod_network_rehearsal_runs_and_leaves_nothing_behind(private_ns):
    """The fork server runs the pod network step once in a throwaway netns: this netns, its nftables
    and this process's fds and threads are as they were."""
    import threading

    from pyroute2 import IPRoute
    from pyroute2.nftables.main import NFTables

    from cloudadaptor.providers import local_vmpreload

    def state() -> tuple:
        with IPRoute() as ipr, NFTables() as nft:
            links = sorted(link.get("IFLA_IFNAME") for link in ipr.get_links())
            tables = sorted(table.get("NFTA_TABLE_NAME") for table in nft.get_tables())
        return links, tables, sorted(os.listdir("/proc/self/fd")), threading.active_count()

    before = state()
    assert local_vmpreload.rehearse_pod_network(), "the rehearsal ran the whole step"
    assert state() == before
