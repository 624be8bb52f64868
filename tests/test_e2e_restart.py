"""A daemon *process* killed with SIGKILL and started again: VNIs and tunnels.

`cloud-api-adaptor serve` runs as a real child process on the local provider
(private namespace); the shim emulator drives it; the test kills it at the
worst moments and checks what the next daemon does.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.adaptor.store import SandboxStore
from cloudadaptor.config import load_settings
from cloudadaptor.podnetwork import tunnel
from cloudadaptor.podnetwork.api import DEVICE_PREFIX, device_name
from cloudadaptor.podnetwork.netns import open_netns
from cloudadaptor.dev.datapath import ECHO_SERVER, tcp_round_trip
from cloudadaptor.dev.shim import ShimEmulator, shim_annotations, start_pod, stop_pod
from links import delete_link

_serial = itertools.count(1)


class ServeProcess:
    """`python -m cloudadaptor.cli serve` with its own state dir, cloud bridge and CIDR."""

    def __init__(self, **extra: str) -> None:
        n = next(_serial) + (os.getpid() % 25) * 2
        self.root = Path(tempfile.mkdtemp(prefix="restart-", dir="/run"))
        self.env = {
            "CLOUD_PROVIDER": "local", "STATE_DIR": str(self.root), "SOCKET": str(self.root / "hv.sock"),
            "PODS_DIR": str(self.root / "pods"), "NODE_NAME": f"restart-node-{n}",
            "LOCAL_CLOUD_BRIDGE": f"pprst{n}", "LOCAL_CLOUD_CIDR": f"203.0.113.{(n % 2) * 128}/26",
            "PROXY_TIMEOUT": "30s", **extra,
        }
        self.process: subprocess.Popen | None = None

    @property
    def socket(self) -> str:
        return self.env["SOCKET"]

    async def start(self) -> None:
        if os.path.exists(self.socket):
            os.unlink(self.socket)  # a killed daemon leaves its socket file
        env = {**os.environ, **self.env}
        self.process = subprocess.Popen([sys.executable, "-m", "cloudadaptor.cli", "serve"], env=env,
                                        stdout=open(self.root / "serve.log", "ab"), stderr=subprocess.STDOUT)
        for _ in range(600):
            if os.path.exists(self.socket):
                return
            assert self.process.poll() is None, (self.root / "serve.log").read_text()
            await asyncio.sleep(0.05)
        pytest.fail(f"daemon did not listen: {(self.root / 'serve.log').read_text()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def vnis(self) -> dict[str, int]:
        store = SandboxStore(self.root / "state.db")
        try:
            return {s.id: s.vni for s in store.all()}
        finally:
            store.close()


@pytest.fixture
async def serve_process(private_ns):
    made: list[ServeProcess] = []

    def make(**extra: str) -> ServeProcess:
        made.append(ServeProcess(**extra))
        return made[-1]

    yield make
    for proc in made:
        if proc.process is not None and proc.process.poll() is None:
            proc.kill()
        settings = load_settings(proc.env)
        cleaner = Daemon(settings)
        await cleaner.start()
        for sandbox in cleaner.lifecycle.store.all():
            await cleaner.lifecycle.stop(sandbox.id)
        await cleaner.close()
        await asyncio.to_thread(delete_link, proc.env["LOCAL_CLOUD_BRIDGE"])
        print((proc.root / "serve.log").read_text()[-3000:])  # shown when the test failed
        shutil.rmtree(proc.root, ignore_errors=True)


def _tunnel_state(pod_path: str) -> tuple[set[str], int]:
    """(links in the pod netns, tc filter messages on its eth0's ingress + our redirects from it)."""
    with open_netns(pod_path) as ipr:
        links = {link.get("IFLA_IFNAME") for link in ipr.get_links()}
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        return links, len(tunnel.ingress_filters(ipr, eth0)) + len(tunnel.redirect_targets(ipr, eth0))


def _worker_tunnel_devices() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {n for link in ipr.get_links() if (n := link.get("IFLA_IFNAME")).startswith(DEVICE_PREFIX)}


async def test_restarted_daemon_process_never_hands_out_a_live_vni(serve_process, make_pod_netns):
    proc = serve_process()
    await proc.start()
    pods = [await asyncio.to_thread(make_pod_netns, f"198.51.100.{60 + i}/24", "198.51.100.1") for i in range(5)]
    shim = ShimEmulator(proc.socket)
    ids = [f"{i}" * 64 for i in range(1, 6)]
    for sid, pod in zip(ids[:2], pods):
        await shim.create_vm(sid, pod.path, shim_annotations(f"p{sid[0]}", "vni"))
    proc.kill()
    await proc.start()
    for sid, pod in zip(ids[2:4], pods[2:4]):
        await shim.create_vm(sid, pod.path, shim_annotations(f"p{sid[0]}", "vni"))
    vnis = proc.vnis()
    assert sorted(vnis.values()) == [555000, 555001, 555002, 555003], vnis
    await shim.stop_vm(ids[0])
    await shim.create_vm(ids[4], pods[4].path, shim_annotations("p5", "vni"))
    vnis = proc.vnis()
    assert vnis[ids[4]] == 555000, "the VNI of the stopped sandbox is the lowest free one"
    assert len(set(vnis.values())) == len(vnis) == 4, f"a live VNI was handed out twice: {vnis}"


async def test_killed_daemon_restart_rolls_back_an_interrupted_start_and_keeps_a_running_pod(
        serve_process, make_pod_netns):
    proc = serve_process(LOCAL_BOOT_DELAY="3s")
    await proc.start()
    shim = ShimEmulator(proc.socket)
    running, starting = [await asyncio.to_thread(make_pod_netns, f"198.51.100.{70 + i}/24", "198.51.100.1")
                         for i in range(2)]
    run, _, _ = await start_pod(shim, "kept", "crash", running.path)
    await shim.create_vm("e" * 64, starting.path, shim_annotations("interrupted", "crash"))
    start = asyncio.create_task(shim.start_vm("e" * 64))
    for _ in range(200):  # until the interrupted pod's tunnel is up (its VM is still booting)
        if device_name(555001) in (await asyncio.to_thread(_tunnel_state, starting.path))[0]:
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the tunnel of the starting pod never came up")
    await run.session.close()
    proc.kill()
    with pytest.raises(Exception):
        await start
    await proc.start()  # recovers: rolls the interrupted start back
    assert await asyncio.to_thread(_tunnel_state, starting.path) == ({"lo", "eth0"}, 0)
    assert await asyncio.to_thread(_tunnel_state, running.path) == ({"lo", "eth0", device_name(555000)}, 3 + 1)
    run = await _reattach(run)
    server = asyncio.create_task(run.exec([sys.executable, "-c", ECHO_SERVER, running.pod_ip, "8081"]))
    reply, _ = await asyncio.to_thread(tcp_round_trip, running.pod_ip, 8081)
    assert reply == b"PING THROUGH THE TUNNEL" and (await server).exit_code == 0
    await stop_pod(shim, run)
    await shim.stop_vm("e" * 64)
    assert proc.vnis() == {}
    for pod in (running, starting):
        assert await asyncio.to_thread(_tunnel_state, pod.path) == ({"lo", "eth0"}, 0)
    assert await asyncio.to_thread(_worker_tunnel_devices) == set()
    vm_netns = [n for n in os.listdir("/run/netns") if n.startswith("i-local-")]
    assert vm_netns == [], f"VM namespaces left: {vm_netns}"


async def _reattach(run):
    from cloudadaptor.dev.shim import AgentSession

    run.session = await AgentSession.dial(run.agent_socket, timeout=10)
    return run
