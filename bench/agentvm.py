"""Agent calls through a real local pod: the shim's socket → daemon's proxy → mTLS → the VM init's forwarder.

``bench.agentpath`` runs the forwarder as its own process (``python -m
cloudadaptor.podvm.forwarder``); a local namespace VM runs it inside its init
(``providers/local_vminit.py``), and that is what a client of the daemon's
shim socket reaches. Here ``cloud-api-adaptor serve`` (``CLOUD_PROVIDER=local``)
starts one pod through the shim emulator, and the client alternates rounds
between the pod's ``agent.ttrpc`` (the shim's socket) and the VM's own agent
socket, as ``agentpath`` does.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from pathlib import Path

from cloudadaptor.dev.podnet import create_pod_netns
from cloudadaptor.dev.shim import AgentSession, ShimEmulator, start_pod, stop_pod

from bench import procs
from bench.agentpath import _latencies
from bench.pods import daemon_env
from bench.table import Row


async def _measure(directory: Path, quick: bool) -> list[Row]:
    rounds, calls = (3, 200) if quick else (6, 500)
    netns = await asyncio.to_thread(create_pod_netns, "bench-agentvm", "198.51.100.70/24", "198.51.100.1")
    try:
        run, _, _ = await start_pod(ShimEmulator(str(directory / "hv.sock")), "bench-agentvm", "default", netns.path)
        try:
            (vm_socket,) = (directory / "cloud").glob("*/run/kata-containers/agent.sock")
            sessions = {"proxied": await AgentSession.dial(run.agent_socket), "direct": await AgentSession.dial(str(vm_socket))}
            lat: dict[str, list[float]] = {name: [] for name in sessions}
            try:
                for _ in range(rounds):
                    for name, session in sessions.items():
                        await _latencies(session.client, 20)  # warm this connection again after the other ran
                        lat[name] += await _latencies(session.client, calls)
            finally:
                for session in sessions.values():
                    await session.close()
        finally:
            await stop_pod(ShimEmulator(str(directory / "hv.sock")), run)
    finally:
        await asyncio.to_thread(netns.delete)
    rows = []
    for label, pct in (("p50", 50), ("p99", 99)):
        ms = {n: statistics.quantiles(v, n=100)[pct - 1] * 1e3 for n, v in lat.items()}
        rows.append(Row(f"agent call Health.Check {label}, local pod (shim socket → daemon → mTLS → VM init's forwarder)",
                        ms["proxied"], "ms", ms["direct"], "direct to the VM's agent", "≤ 2×" if pct == 50 else ""))
    return rows


def run(quick: bool) -> list[Row]:
    """Start the daemon, one pod; measure; stop them (also on failure)."""
    with tempfile.TemporaryDirectory(prefix="bench-avm-") as tmp:
        directory = Path(tmp)
        daemon = procs.python("-m", "cloudadaptor.cli", "serve", env=daemon_env(directory), log=directory / "daemon.log")
        with procs.running(daemon):
            procs.wait_for_path(directory / "hv.sock", daemon, timeout=60)
            return asyncio.run(_measure(directory, quick))
