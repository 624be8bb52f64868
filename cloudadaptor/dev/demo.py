"""`cloud-api-adaptor demo`: three peer pods end to end on the local provider.

Enters a private user+net+mount namespace by itself (nothing on the machine's
network changes), starts `cloud-api-adaptor serve` with CLOUD_PROVIDER=local,
starts pods through the shim emulator exactly as containerd-shim-kata-v2
would, runs a command in each pod VM (shim → agent proxy → mTLS → forwarder →
agent), shows the pod IP inside the VM's podns and a TCP round trip from the
worker to a server on that pod IP (through the VXLAN tunnel), prints a table,
stops the pods and proves nothing is left. ``--vm qemu`` does the same on
real QEMU VMs booting the image of ``image build local`` (LOCAL_VM=qemu) and
adds each VM's boot-to-agent-ready time (from its console).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cloudadaptor.dev import privatens

SOCKET = "/run/peerpod/hypervisor.sock"
STATE_DB = Path("/run/peerpod/state.db")
PODS_DIR = Path("/run/peerpod/pods")
DEMO_COMMAND = ["sh", "-c", "echo \"$(hostname) $(readlink /proc/self/ns/net)\""]


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pods", type=int, default=3, help="number of peer pods (default 3)")
    parser.add_argument("--boot-delay", default="0s", help="LOCAL_BOOT_DELAY: imitated cloud boot time (default 0s)")
    parser.add_argument("--proxy-timeout", help="PROXY_TIMEOUT for the demo daemon (default 30s; 480s with --vm qemu)")
    parser.add_argument("--vm", choices=("namespace", "qemu"), default="namespace",
                        help="LOCAL_VM: namespace VMs (default, fast) or real QEMU VMs (needs `image build local`)")


def run(args: argparse.Namespace) -> int:
    if not privatens.inside():
        privatens.exec_inside([sys.executable, "-m", "cloudadaptor.cli", "demo", *sys.argv[2:]])
    if args.pods < 1:
        print("--pods must be at least 1", file=sys.stderr)
        return 2
    return asyncio.run(_demo(args))


ECHO_PORT = 8080


@dataclass
class Row:
    pod: str
    sandbox_id: str
    vm_id: str = "-"
    vm_ip: str = "-"
    vni: str = "-"
    pod_ip_in_vm: str = "-"
    create_ms: float = 0.0
    start_ms: float = 0.0
    tcp_ms: str = "-"
    output: str = ""
    boot_s: str = "-"


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


async def _demo(args: argparse.Namespace) -> int:
    from cloudadaptor.dev.podnet import create_pod_netns

    log_file = tempfile.NamedTemporaryFile(prefix="cloud-api-adaptor-demo-", suffix=".log", delete=False)
    timeout = args.proxy_timeout or ("480s" if args.vm == "qemu" else "30s")
    env = {**os.environ, "CLOUD_PROVIDER": "local", "LOCAL_BOOT_DELAY": args.boot_delay, "LOCAL_VM": args.vm,
           "PROXY_TIMEOUT": timeout, "NODE_NAME": "demo-worker"}
    _say(f"private namespace ready; starting `cloud-api-adaptor serve` (log: {log_file.name})")
    daemon = subprocess.Popen([sys.executable, "-m", "cloudadaptor.cli", "serve"], env=env, stdout=log_file, stderr=subprocess.STDOUT)
    pod_netns = []
    ok = False
    try:
        await _wait_for_socket(daemon)
        for i in range(args.pods):
            # pyroute2's synchronous API runs its own event loop: keep it off ours.
            pod_netns.append(await asyncio.to_thread(create_pod_netns, f"cni-demo-{i}", f"198.51.100.{10 + i}/24", "198.51.100.1"))
        ok = await _run_pods(args.pods, pod_netns, args.vm)
    except Exception as exc:
        _say(f"demo failed: {type(exc).__name__}: {exc}")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
        for netns in pod_netns:
            await asyncio.to_thread(netns.delete)
        await asyncio.to_thread(_delete_cloud_bridge)  # the cloud's metadata service exits with it
    if not ok:
        _say(f"daemon log ({log_file.name}):")
        print(Path(log_file.name).read_text()[-4000:])
        return 1
    leftovers = await asyncio.to_thread(_leftovers)
    for _ in range(50):  # the metadata service notices its bridge is gone within a second
        if not leftovers:
            break
        await asyncio.sleep(0.1)
        leftovers = await asyncio.to_thread(_leftovers)
    if leftovers:
        _say("LEFT BEHIND after the daemon exited:")
        for line in leftovers:
            print(f"  - {line}")
        return 1
    _say("daemon stopped; no VM process, VM namespace, VM link or agent socket remains")
    os.unlink(log_file.name)
    return 0


async def _wait_for_socket(daemon: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(SOCKET):
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {daemon.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{SOCKET} did not appear within {timeout:.0f}s")
        await asyncio.sleep(0.05)
    _say(f"daemon serving {SOCKET}")


async def _run_pods(count: int, pod_netns: list, vm: str = "namespace") -> bool:
    from cloudadaptor.dev.shim import ShimEmulator, start_pod, stop_pod

    shim = ShimEmulator(SOCKET)
    _say(f"hypervisor service version {await shim.version()}; starting {count} peer pods through the shim emulator")
    names = [f"demo-pod-{i}" for i in range(count)]
    results = await asyncio.gather(
        *(start_pod(shim, name, "default", netns.path) for name, netns in zip(names, pod_netns)),
        return_exceptions=True,
    )
    runs, rows, failed = [], [], False
    for name, result, netns in zip(names, results, pod_netns):
        if isinstance(result, BaseException):
            _say(f"{name}: failed to start: {result}")
            failed = True
            continue
        run, create_s, start_s = result
        runs.append(run)
        row = Row(name, run.sandbox_id, create_ms=create_s * 1000, start_ms=start_s * 1000)
        row.vm_id, row.vm_ip, row.vni = _vm_of(run.sandbox_id)
        executed = await run.exec(DEMO_COMMAND)
        row.output = (executed.stdout.decode().strip() or executed.stderr.decode().strip()) + (
            f" (exit {executed.exit_code})" if executed.exit_code else "")
        failed |= executed.exit_code != 0
        failed |= not await _probe_data_path(run, row, netns.pod_ip, "python3" if vm == "qemu" else sys.executable)
        if vm == "qemu":
            row.boot_s = _boot_to_agent(row.vm_id)
        rows.append(row)
        _say(f"{name}: VM {row.vm_id} at {row.vm_ip} answered; pod IP {netns.pod_ip} reached through VNI {row.vni}")
    _print_table(rows, vm)
    for run in runs:
        await stop_pod(shim, run)
    _say(f"stopped {len(runs)} pods (StopVM)")
    for netns in pod_netns:
        left = await asyncio.to_thread(_tunnel_leftovers, netns.path)
        if left:
            _say(f"pod netns {netns.path} still has {left} after StopVM")
            failed = True
    remaining = _state_rows()
    if remaining:
        _say(f"state store still has {remaining} rows after StopVM")
        failed = True
    return not failed and len(runs) == count


async def _probe_data_path(run, row: Row, pod_ip: str, python: str) -> bool:
    """The pod IP as the VM's podns shows it (`ip -br addr` through ExecProcess), and
    a TCP round trip from the worker to a one-shot echo server on it in the pod."""
    from cloudadaptor.dev.datapath import ECHO_SERVER, POD_ADDR_COMMAND, tcp_round_trip

    shown = await run.exec(POD_ADDR_COMMAND)
    lines = [line.split() for line in shown.stdout.decode().splitlines()]
    row.pod_ip_in_vm = ",".join(word for line in lines if line and line[0] != "lo" for word in line[2:3]) or "-"
    server = asyncio.create_task(run.exec([python, "-c", ECHO_SERVER, pod_ip, str(ECHO_PORT)]))
    try:
        reply, seconds = await asyncio.to_thread(tcp_round_trip, pod_ip, ECHO_PORT)
    except OSError as exc:
        server.cancel()
        row.tcp_ms = f"failed: {exc}"
        return False
    served = await server
    row.tcp_ms = f"{seconds * 1000:.2f}" if reply == b"PING THROUGH THE TUNNEL" else f"bad reply {reply!r}"
    return served.exit_code == 0 and row.pod_ip_in_vm.startswith(pod_ip) and reply == b"PING THROUGH THE TUNNEL"


def _tunnel_leftovers(netns_path: str) -> list[str]:
    """Tunnel devices or tc redirects still in a pod netns."""
    from cloudadaptor.podnetwork import tunnel
    from cloudadaptor.podnetwork.netns import open_netns

    with open_netns(netns_path) as ipr:
        left = [f"link {link.get('IFLA_IFNAME')}" for link in ipr.get_links()
                if link.get("IFLA_IFNAME") not in ("lo", "eth0")]
        for index in ipr.link_lookup(ifname="eth0"):
            left += [f"tc redirect on eth0 to ifindex {t}" for t in tunnel.redirect_targets(ipr, index)]
    return left


def _vm_of(sandbox_id: str) -> tuple[str, str, str]:
    from cloudadaptor.adaptor.store import SandboxStore

    store = SandboxStore(STATE_DB)
    try:
        sandbox = store.get(sandbox_id)
        if sandbox is None or not sandbox.vm_ips:
            return "-", "-", "-"
        return sandbox.instance_id, sandbox.vm_ips[0], str(sandbox.vni or "-")
    finally:
        store.close()


def _state_rows() -> int:
    from cloudadaptor.adaptor.store import SandboxStore

    store = SandboxStore(STATE_DB)
    try:
        return len(store.all())
    finally:
        store.close()


def _boot_to_agent(vm_id: str) -> str:
    """Seconds from the guest kernel's start to the forwarder in front of the agent (console timestamps)."""
    console = Path("/run/peerpod/local-cloud") / vm_id / "console.log"
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return "-"
    for line in text.splitlines():
        if "Started agent-protocol-forwarder" in line and line.startswith("["):
            return line[1:].split("]", 1)[0].strip()
    return "-"


def _delete_cloud_bridge() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=os.environ.get("LOCAL_CLOUD_BRIDGE", "ppcloud0")):
            ipr.link("del", index=index)


def _print_table(rows: list[Row], vm: str = "namespace") -> None:
    header = ("POD", "SANDBOX ID", "VM ID", "VM IP", "VNI", "POD IP IN VM podns", "CreateVM ms", "StartVM ms",
              "TCP RTT ms", "COMMAND OUTPUT")
    table = [header] + [
        (r.pod, r.sandbox_id[:12], r.vm_id, r.vm_ip, r.vni, r.pod_ip_in_vm, f"{r.create_ms:.1f}", f"{r.start_ms:.1f}",
         r.tcp_ms, r.output) for r in rows
    ]
    if vm == "qemu":
        table = [(*line, cell) for line, cell in zip(table, ["BOOT→AGENT s"] + [r.boot_s for r in rows])]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(table[0]))]
    print()
    for line in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())
    print(f"\ncommand run in each pod VM: {' '.join(DEMO_COMMAND)}")
    print("POD IP IN VM podns: `ip -br addr show` run in the pod through ExecProcess; TCP RTT: the worker "
          f"connects to a server on the pod IP (port {ECHO_PORT}) started in the pod, through the VXLAN tunnel\n",
          flush=True)


def _leftovers() -> list[str]:
    """Everything of the pods that should be gone: netns, links, sockets, processes, rows."""
    from pyroute2 import IPRoute

    found = []
    netns_dir = Path("/run/netns")
    found += [f"network namespace {p.name}" for p in netns_dir.iterdir()] if netns_dir.exists() else []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            kind = (link.get_attr("IFLA_LINKINFO") or {}).get_attr("IFLA_INFO_KIND") if link.get_attr("IFLA_LINKINFO") else None
            if kind in ("veth", "vxlan", "tun"):
                found.append(f"link {name} ({kind})")
    if PODS_DIR.exists():
        found += [f"pod directory {p}" for p in PODS_DIR.iterdir()]
    found += [f"socket {p}" for p in Path("/run/peerpod").rglob("*") if p.is_socket()]
    our_userns = os.stat("/proc/self/ns/user").st_ino
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if os.stat(proc / "ns" / "user").st_ino != our_userns:
                    continue  # not ours: another namespace's processes
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "cloudadaptor" in cmdline or "qemu-system" in cmdline:
                found.append(f"process {proc.name}: {cmdline.strip()}")
    if STATE_DB.exists() and _state_rows():
        found.append(f"{_state_rows()} sandbox rows in {STATE_DB}")
    return found
