"""End to end on one machine: shim emulator → daemon → local pod VM → agent.

Runs `Daemon` in-process with CLOUD_PROVIDER=local inside the private
namespace; every pod VM is real (its own netns and mount namespace, running
process-user-data, the VM side of the VXLAN tunnel, the forwarder with mTLS
and the development agent), and the pod IP is reached through the tunnel.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.config import load_settings
from cloudadaptor.podnetwork import tunnel
from cloudadaptor.podnetwork.api import DEVICE_PREFIX
from cloudadaptor.podnetwork.netns import open_netns
from cloudadaptor.dev.datapath import ECHO_SERVER, POD_ADDR_COMMAND, tcp_round_trip
from cloudadaptor.dev.shim import AgentSession, ShimEmulator, shim_annotations, start_pod, stop_pod
from cloudadaptor.ttrpc.errors import Code, TtrpcError
from links import delete_link

_serial = itertools.count(1)


@pytest.fixture
async def daemon_factory(private_ns):
    made: list[tuple[Daemon, Path]] = []

    async def make(**env: str) -> tuple[Daemon, str]:
        n = next(_serial) + (os.getpid() % 50) * 4
        root = Path(tempfile.mkdtemp(prefix="e2e-", dir="/run"))
        settings = load_settings({
            "CLOUD_PROVIDER": "local",
            "STATE_DIR": str(root),
            "SOCKET": str(root / "hv.sock"),
            "PODS_DIR": str(root / "pods"),
            "NODE_NAME": f"e2e-node-{n}",
            "LOCAL_CLOUD_BRIDGE": f"ppe2e{n}",
            # The spare documentation range: provider tests use 192.0.2.0/24.
            "LOCAL_CLOUD_CIDR": f"203.0.113.{(n % 4) * 64}/26",
            "PROXY_TIMEOUT": "20s",
            **env,
        })
        daemon = Daemon(settings)
        await daemon.start()
        made.append((daemon, root))
        return daemon, str(settings.socket)

    yield make
    for daemon, root in made:
        if not daemon.closed:
            for sandbox in daemon.lifecycle.store.all():
                await daemon.lifecycle.stop(sandbox.id)
            await daemon.close()
        await asyncio.to_thread(delete_link, daemon.settings.provider_env["LOCAL_CLOUD_BRIDGE"])
        cloud_dir = root / "local-cloud"
        leftover = [p.name for p in cloud_dir.iterdir() if p.is_dir()] if cloud_dir.exists() else []
        shutil.rmtree(root, ignore_errors=True)
        assert leftover == [], f"VMs left in the local cloud: {leftover}"


def _worker_side(pod_path: str) -> tuple[set[str], list, set[str]]:
    """(links in the pod netns, tc filters on its eth0, tunnel devices in the worker netns)."""
    from pyroute2 import IPRoute

    with open_netns(pod_path) as ipr:
        links = {link.get("IFLA_IFNAME") for link in ipr.get_links()}
        filters = tunnel.ingress_filters(ipr, ipr.link_lookup(ifname="eth0")[0])
    with IPRoute() as ipr:
        worker = {link.get("IFLA_IFNAME") for link in ipr.get_links() if link.get("IFLA_IFNAME").startswith(DEVICE_PREFIX)}
    return links, filters, worker


async def _check_data_path(run, pod_ip: str) -> None:
    """The pod IP is in the VM's podns, and a TCP server there answers the worker."""
    addr = await run.exec(POD_ADDR_COMMAND)
    assert addr.exit_code == 0 and f"{pod_ip}/24" in addr.stdout.decode(), addr
    server = asyncio.create_task(run.exec([sys.executable, "-c", ECHO_SERVER, pod_ip, "8080"]))
    reply, _ = await asyncio.to_thread(tcp_round_trip, pod_ip, 8080)
    served = await server
    assert reply == b"PING THROUGH THE TUNNEL", reply
    assert served.exit_code == 0 and served.stdout == b"echoed for 198.51.100.1\n", served


async def test_two_pods_run_commands_in_their_own_vm_podns(daemon_factory, make_pod_netns):
    daemon, socket_path = await daemon_factory()
    shim = ShimEmulator(socket_path)
    pods = [await asyncio.to_thread(make_pod_netns, f"198.51.100.{20 + i}/24", "198.51.100.1") for i in range(2)]
    started = await asyncio.gather(*(start_pod(shim, f"web-{i}", "e2e", pod.path) for i, pod in enumerate(pods)))
    outputs = []
    for run, create_s, start_s in started:
        assert run.guest is not None and run.guest.agent_details.version.startswith("devagent "), (
            "GetGuestDetails went through the adaptor and the forwarder to the VM's agent")
        result = await run.exec(["sh", "-c", "readlink /proc/self/ns/net; echo from-vm >&2; exit 3"])
        assert result.exit_code == 3 and result.stderr == b"from-vm\n", result
        outputs.append(result.stdout.strip())
    assert outputs[0] != outputs[1], "each pod's commands run in its own VM podns"
    instance_ids = [daemon.lifecycle.store.get(run.sandbox_id).instance_id for run, _, _ in started]
    assert all(i.startswith("i-local-") for i in instance_ids)
    assert {daemon.lifecycle.store.get(run.sandbox_id).vni for run, _, _ in started} == {555000, 555001}
    for (run, _, _), pod in zip(started, pods):
        await _check_data_path(run, pod.pod_ip)
    for run, _, _ in started:
        await stop_pod(shim, run)
    for pod in pods:
        links, filters, worker = await asyncio.to_thread(_worker_side, pod.path)
        assert (links, filters, worker) == ({"lo", "eth0"}, [], set()), "StopVM leaves no tunnel device or tc filter"
    assert daemon.lifecycle.store.all() == []
    assert not any(os.path.exists(run.agent_socket) for run, _, _ in started)
    assert await daemon.provider.list_owned({}) == []


async def test_vm_whose_agent_never_answers_is_deleted_within_proxy_timeout(daemon_factory, make_pod_netns):
    # The VM boots but its agent never serves, so the forwarder never listens.
    daemon, socket_path = await daemon_factory(PROXY_TIMEOUT="2s", LOCAL_AGENT_COMMAND="sh -c 'exec sleep 600' {socket}")
    shim = ShimEmulator(socket_path)
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.30/24", "198.51.100.1")
    sandbox = "f" * 64
    await shim.create_vm(sandbox, pod.path, shim_annotations("silent", "e2e"))
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(TtrpcError) as err:
        await shim.start_vm(sandbox)
    elapsed = loop.time() - began
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert "did not answer within 2s" in err.value.message and "deleted" in err.value.message, err.value.message
    assert elapsed < 10, f"StartVM took {elapsed:.1f}s with PROXY_TIMEOUT=2s"
    assert await daemon.provider.list_owned({}) == []
    await shim.stop_vm(sandbox)
    assert daemon.lifecycle.store.all() == []


async def test_restarted_daemon_keeps_serving_a_running_pod(daemon_factory, make_pod_netns):
    daemon, socket_path = await daemon_factory()
    shim = ShimEmulator(socket_path)
    pod = await asyncio.to_thread(make_pod_netns, "198.51.100.40/24", "198.51.100.1")
    run, _, _ = await start_pod(shim, "durable", "e2e", pod.path)
    await run.session.close()
    await daemon.close()  # the daemon exits; the VM keeps running
    again = Daemon(daemon.settings)
    await again.start()
    try:
        session = await AgentSession.dial(run.agent_socket, timeout=5)
        result = await session.exec(run.container_id, ["echo", "still here"])
        assert result.stdout == b"still here\n"
        await session.close()
        await shim.stop_vm(run.sandbox_id)
        assert await again.provider.list_owned({}) == []
    finally:
        await again.close()


_INITDATA_DOC = b'''version = "0.1.0"
algorithm = "sha384"

[data]
"aa.toml" = \'\'\'
[token_configs.kbs]
url = "https://198.51.100.80:8080"
\'\'\'
"cdh.toml" = \'\'\'
socket = "unix:///run/confidential-containers/cdh.sock"
\'\'\'
"policy.rego" = \'\'\'
package agent_policy
default ExecProcessRequest := true
\'\'\'
'''


async def test_initdata_reaches_the_vm_unpacked_with_its_digest_and_a_pod_without_gets_nothing(
        daemon_factory, make_pod_netns):
    import base64
    import gzip
    import hashlib
    import tomllib

    _, socket_path = await daemon_factory()
    shim = ShimEmulator(socket_path)
    pods = [await asyncio.to_thread(make_pod_netns, f"198.51.100.{30 + i}/24", "198.51.100.1") for i in range(2)]
    encoded = base64.b64encode(gzip.compress(_INITDATA_DOC)).decode()
    (with_init, _, _), (without, _, _) = await asyncio.gather(
        start_pod(shim, "coco", "e2e", pods[0].path,
                  annotations={"io.katacontainers.config.hypervisor.cc_init_data": encoded}),
        start_pod(shim, "plain", "e2e", pods[1].path))
    entries = tomllib.loads(_INITDATA_DOC.decode())["data"]
    for name in ("aa.toml", "cdh.toml", "policy.rego"):
        result = await with_init.exec(["cat", f"/run/peerpod/{name}"])
        assert result.exit_code == 0 and result.stdout.decode() == entries[name], (name, result)
    digest = await with_init.exec(["cat", "/run/peerpod/initdata.digest"])
    assert digest.stdout.decode() == hashlib.sha384(_INITDATA_DOC).hexdigest(), digest
    modes = await with_init.exec(["stat", "-c", "%n %a", "/run/peerpod/aa.toml", "/run/peerpod/initdata.digest"])
    assert modes.stdout.decode().split("\n")[:2] == ["/run/peerpod/aa.toml 600", "/run/peerpod/initdata.digest 644"]
    listing = await without.exec(["ls", "/run/peerpod"])
    assert listing.exit_code == 0, listing
    assert set(listing.stdout.decode().split()) & {"initdata", "aa.toml", "cdh.toml", "policy.rego",
                                                   "initdata.digest"} == set(), listing.stdout
    for run in (with_init, without):
        await stop_pod(shim, run)
