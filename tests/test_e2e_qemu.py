"""End to end on real VMs: LOCAL_VM=qemu boots the image `image build local` made.

The shim emulator starts two pods, each on its own QEMU VM (TCG unless a KVM
probe boots a guest) on the local cloud bridge. The VMs take their user data
from the cloud's IMDSv2 endpoint and boot the image's systemd units, so this
covers the image, its units, process-user-data against a real HTTP metadata
service, the guest kernel's VXLAN and the forwarder on the image's Python.

The image must be the one for the code under test (same input key; the
``qemu_image`` fixture of qemu_support.py); `make test` builds it (a cache hit
when nothing changed). With CI=true a missing QEMU or image fails the test,
never skips it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from cloudadaptor.dev import privatens
from cloudadaptor.dev.datapath import ECHO_SERVER, POD_ADDR_COMMAND, tcp_round_trip
from cloudadaptor.dev.shim import ShimEmulator, start_pod, stop_pod
from qemu_support import leftovers
from test_e2e import daemon_factory  # noqa: F401 - the fixture

CONNECT_PROBE = ("import socket, sys\n"
                 "s = socket.socket(); s.settimeout(3)\n"
                 "try:\n    s.connect((sys.argv[1], int(sys.argv[2]))); print('connected')\n"
                 "except OSError as e:\n    print('unreachable', e)\n")


async def test_pods_on_qemu_vms_run_in_the_guest_and_are_isolated(qemu_image, daemon_factory, make_pod_netns):  # noqa: F811
    daemon, socket_path = await daemon_factory(LOCAL_VM="qemu", LOCAL_QEMU_IMAGE=str(qemu_image.directory),
                                               PROXY_TIMEOUT="480s")
    cloud_dir = Path(daemon.settings.state_dir) / "local-cloud"
    shim = ShimEmulator(socket_path)
    pods = [await asyncio.to_thread(make_pod_netns, f"198.51.100.{50 + i}/24", "198.51.100.1") for i in range(2)]
    started = await asyncio.gather(*(start_pod(shim, f"vm-{i}", "e2e", pod.path) for i, pod in enumerate(pods)))
    (first, _, _), (second, _, _) = started
    release = await first.exec(["uname", "-r"])
    assert release.exit_code == 0, release
    assert release.stdout.decode().strip() == qemu_image.info["kernel_release"] != os.uname().release, release
    addr = await first.exec(POD_ADDR_COMMAND)
    assert f"{pods[0].pod_ip}/24" in addr.stdout.decode(), addr
    # The worker reaches a server on the pod IP, through the VXLAN into the guest's podns.
    server = asyncio.create_task(first.exec(["python3", "-c", ECHO_SERVER, pods[0].pod_ip, "8080"]))
    reply, _ = await asyncio.to_thread(tcp_round_trip, pods[0].pod_ip, 8080, timeout=60.0)
    assert reply == b"PING THROUGH THE TUNNEL"
    assert (await server).exit_code == 0
    # The other pod's VM cannot reach the first pod through its own tunnel.
    server = asyncio.create_task(first.exec(["python3", "-c", ECHO_SERVER, pods[0].pod_ip, "8081"]))
    probe = await second.exec(["python3", "-c", CONNECT_PROBE, pods[0].pod_ip, "8081"])
    assert probe.stdout.startswith(b"unreachable"), probe
    await asyncio.to_thread(tcp_round_trip, pods[0].pod_ip, 8081, timeout=60.0)  # ends the server
    await server
    console = (cloud_dir / daemon.lifecycle.store.get(first.sandbox_id).instance_id / "console.log").read_text(
        errors="replace")
    assert "Started agent-protocol-forwarder.service" in console
    for run, _, _ in started:
        await stop_pod(shim, run)
    assert await daemon.provider.list_owned({}) == []
    assert await asyncio.to_thread(leftovers, cloud_dir) == ([], [], []), "StopVM leaves no tap, directory or QEMU"


def test_the_qemu_demo_runs_one_pod_on_a_real_vm_and_leaves_nothing(qemu_image, private_ns):
    """`cloud-api-adaptor demo --vm qemu --pods 1` as a user runs it: in a fresh private namespace of
    its own (the demo enters one when it is not inside one), on this checkout's image. One pod only:
    each VM costs a boot of about a minute under TCG."""
    env = {k: v for k, v in os.environ.items() if k != privatens.MARK}
    env["LOCAL_QEMU_IMAGE"] = str(qemu_image.directory)
    done = subprocess.run([sys.executable, "-m", "cloudadaptor.cli", "demo", "--vm", "qemu", "--pods", "1"],
                          env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"the demo failed (exit {done.returncode}):\n{output[-4000:]}"
    lines = output.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("POD ")), None)
    assert header is not None and lines[header].rstrip().endswith("BOOT→AGENT s"), f"no QEMU table:\n{output}"
    print("\n".join(lines[header:header + 2]))  # the figures, shown with -s
    row = lines[header + 1].split()
    assert row[0] == "demo-pod-0" and row[2].startswith("i-local-"), f"the pod's row: {lines[header + 1]}"
    assert float(row[-1]) > 0, f"boot to agent-ready read from the guest console: {lines[header + 1]}"
    assert " podvm net:[" in lines[header + 1], f"the command ran in the guest (hostname podvm): {lines[header + 1]}"
    assert "no VM process, VM namespace, VM link or agent socket remains" in output, output[-2000:]
