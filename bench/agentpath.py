"""Agent calls through the whole agent path next to the same calls straight to the agent.

Four processes, as in a real pod: the development agent on a unix socket, the
pod VM's forwarder (``python -m cloudadaptor.podvm.forwarder``, mutual TLS on
loopback), the worker's ``AgentProxy`` (``bench.proxyproc``) and this client.
The client alternates rounds between the proxy's socket and the agent's socket
so both see the same machine noise.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from google.protobuf import empty_pb2

from cloudadaptor.dev.shim import AgentSession
from cloudadaptor.podconfig import ForwarderConfig
from cloudadaptor.protocols import agent_pb2, health_pb2
from cloudadaptor.tls import ServerTlsMaterial
from cloudadaptor.tlscerts import CertificateAuthority
from cloudadaptor.ttrpc import Client, TtrpcError

from bench import procs
from bench.table import Row

SERVER_NAME = "podvm-bench"
PODNS = "podns"
STREAM_BYTES = 64 << 20
READ_LEN = 32 * 1024  # what the Go shim's io.Copy asks per ReadStdout


def _pki(directory: Path) -> tuple[ServerTlsMaterial, Path, Path, Path]:
    ca = CertificateAuthority.create("bench CA")
    cert, key = ca.issue(SERVER_NAME, server=True, dns_names=[SERVER_NAME])
    client_cert, client_key = ca.issue("bench adaptor", server=False)
    paths = [directory / name for name in ("client.pem", "client.key", "ca.pem")]
    for path, text in zip(paths, (client_cert, client_key, ca.cert_pem), strict=True):
        path.write_text(text)
    (directory / "server.pem").write_text(cert + key)  # for the socat reference
    return ServerTlsMaterial(cert, key, ca.cert_pem), *paths  # type: ignore[return-value]


async def _latencies(client: Client, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        began = time.perf_counter()
        await client.call_message("grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse)
        out.append(time.perf_counter() - began)
    return out


async def _stream(session: AgentSession, container_id: str) -> float:
    """Seconds to exec a process printing STREAM_BYTES and read it all with ReadStdout."""
    exec_id = f"stream-{time.monotonic_ns()}"
    process = agent_pb2.Process(Args=["head", "-c", str(STREAM_BYTES), "/dev/zero"], Cwd="/",
                                Env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
    began = time.perf_counter()
    await session.client.call_message("grpc.AgentService", "ExecProcess",
                                      agent_pb2.ExecProcessRequest(container_id=container_id, exec_id=exec_id, process=process),
                                      empty_pb2.Empty)
    request = agent_pb2.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=READ_LEN)
    total = 0
    while True:
        try:
            reply = await session.client.call_message("grpc.AgentService", "ReadStdout", request, agent_pb2.ReadStreamResponse)
        except TtrpcError:
            break
        if not reply.data:
            break
        total += len(reply.data)
    elapsed = time.perf_counter() - began
    if total != STREAM_BYTES:
        raise RuntimeError(f"streamed {total} bytes, expected {STREAM_BYTES}")
    return elapsed


async def _prepare(socket_path: str) -> tuple[AgentSession, str]:
    session = await AgentSession.dial(socket_path)
    container_id = f"bench-{time.monotonic_ns()}"
    await session.create_sandbox(container_id, hostname="bench")
    await session.create_container(container_id, ["sleep", "infinity"], f"/run/netns/{PODNS}")
    await session.start_container(container_id)
    return session, container_id


async def _measure(sockets: dict[str, str], quick: bool) -> list[Row]:
    """``sockets``: "direct", "proxied" and maybe "socat" (the same two hops through a C relay)."""
    rounds, calls = (3, 200) if quick else (6, 500)
    sessions = {name: await _prepare(path) for name, path in sockets.items()}
    try:
        lat: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, (session, _) in sessions.items():
                await _latencies(session.client, 20)  # warm this connection again after the others ran
                lat[name] += await _latencies(session.client, calls)
        streams: dict[str, list[float]] = {name: [] for name in ("direct", "proxied")}
        for _ in range(1 if quick else 3):
            for name in streams:  # not through socat: its Nagle/delayed-ACK stalls make it crawl
                session, cid = sessions[name]
                streams[name].append(await _stream(session, cid))
    finally:
        for session, _ in sessions.values():
            await session.destroy_sandbox()
            await session.close()
    rows = []
    for label, pct in (("p50", 50), ("p99", 99)):
        ms = {n: statistics.quantiles(v, n=100)[pct - 1] * 1e3 for n, v in lat.items()}
        rows.append(Row(f"agent call Health.Check {label} (proxy → mTLS → forwarder)", ms["proxied"], "ms",
                        ms["direct"], "direct to agent", "≤ 2×" if pct == 50 else ""))
        if "socat" in ms:
            rows.append(Row(f"  same two hops through socat (C relay, same mTLS) {label}", ms["socat"], "ms",
                            ms["direct"], "direct to agent"))
    rate = {n: STREAM_BYTES / (1 << 20) / min(v) for n, v in streams.items()}
    rows.append(Row("ExecProcess 64 MiB read with ReadStdout (32 KiB calls)", rate["proxied"], "MiB/s", rate["direct"],
                    "direct to agent"))
    return rows


def _socat_chain(directory: Path, agent_sock: Path, ca: Path) -> list:  # type: ignore[type-arg]
    """The reference: the same unix → mTLS → unix hops through two socat processes (C, no parsing)."""
    port = procs.free_port()
    vm = subprocess.Popen(["socat", f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={directory / 'server.pem'},"
                           f"cafile={ca},verify=1", f"UNIX-CONNECT:{agent_sock}"], stderr=subprocess.DEVNULL)
    worker = subprocess.Popen(["socat", f"UNIX-LISTEN:{directory / 'socat.sock'},fork",
                               f"OPENSSL:127.0.0.1:{port},cert={directory / 'client.pem'},key={directory / 'client.key'},"
                               f"cafile={ca},commonname={SERVER_NAME},nodelay"], stderr=subprocess.DEVNULL)
    return [vm, worker]


def run(quick: bool) -> list[Row]:
    """Start agent, forwarder and proxy; measure; stop them all (also on failure)."""
    from pyroute2 import netns

    with tempfile.TemporaryDirectory(prefix="bench-agentpath-") as tmp:
        directory = Path(tmp)
        material, cert, key, ca = _pki(directory)
        port = procs.free_port()
        apf = directory / "apf.json"
        apf.write_text(ForwarderConfig("bench", "bench", "default", port, material).to_json())
        agent_sock, proxy_sock = directory / "agent.sock", directory / "proxy.sock"
        netns.create(PODNS)
        agent = procs.python("-m", "cloudadaptor.dev.devagent", "--socket", str(agent_sock), log=directory / "agent.log")
        forwarder = procs.python("-m", "cloudadaptor.podvm.forwarder", "--config", str(apf), "--kata-agent-socket",
                                 str(agent_sock), "--host", "127.0.0.1", "--log-level", "warning", profile_as="forwarder")
        proxy = procs.python("-m", "bench.proxyproc", str(proxy_sock), "127.0.0.1", str(port), SERVER_NAME,
                             str(cert), str(key), str(ca), profile_as="proxy")
        socat = _socat_chain(directory, agent_sock, ca) if shutil.which("socat") else []
        try:
            with procs.running(agent, forwarder, proxy, *socat):
                procs.wait_for_path(agent_sock, agent)
                procs.wait_for_port("127.0.0.1", port, forwarder)
                procs.wait_for_path(proxy_sock, proxy)
                sockets = {"direct": str(agent_sock), "proxied": str(proxy_sock)}
                if socat:
                    procs.wait_for_path(directory / "socat.sock", socat[1])
                    sockets["socat"] = str(directory / "socat.sock")
                return asyncio.run(_measure(sockets, quick))
        finally:
            netns.remove(PODNS)
