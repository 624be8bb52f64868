"""agent-protocol-forwarder over real mutual TLS in front of a stand-in agent.

The stand-in agent is a raw unix ttrpc peer (struct only) that records every
request frame byte for byte and answers with the request envelope as payload.
The test PKI is built here with ``cryptography``; the server side uses
``cloudadaptor.tls.server_context`` exactly as the forwarder command does.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
import ssl
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloudadaptor.podvm.forwarder import POD_NETNS_PATH, AgentProtocolForwarder
from cloudadaptor.protocols import agent_pb2, ttrpc_pb2
from cloudadaptor.tls import ServerTlsMaterial, server_context
from cloudadaptor.ttrpc import Client, ConnectionClosed
from cloudadaptor.podconfig import ForwarderConfig

HDR = ">IIBB"
SERVER_NAME = "podvm-test"
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ test PKI


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@dataclass
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, cn: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, cn: str, server: bool) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM).decode(), _pem_key(key)


@dataclass
class Pki:
    material: ServerTlsMaterial
    server_ca_pem: str
    client_cert: tuple[str, str]
    foreign_client_cert: tuple[str, str]


@pytest.fixture(scope="module")
def pki() -> Pki:
    server_ca, client_ca, foreign_ca = Ca.create("vm CA"), Ca.create("adaptor CA"), Ca.create("foreign CA")
    cert, key = server_ca.issue(SERVER_NAME, server=True)
    return Pki(
        material=ServerTlsMaterial(cert_pem=cert, key_pem=key, client_ca_pem=client_ca.pem),
        server_ca_pem=server_ca.pem,
        client_cert=client_ca.issue("adaptor", server=False),
        foreign_client_cert=foreign_ca.issue("adaptor", server=False),
    )


def client_context(pki: Pki, tmp_path: Path, cert: tuple[str, str] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=pki.server_ca_pem)
    if cert is not None:
        (tmp_path / "c.pem").write_text(cert[0])
        (tmp_path / "c.key").write_text(cert[1])
        ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "c.key")
    return ctx


# ------------------------------------------------------------ stand-in agent


class StandInAgent:
    """Raw ttrpc peer on a unix socket: records request frames, answers with their envelope."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def start(self, path: str) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(10)
                length, sid, _, _ = struct.unpack(HDR, header)
                data = await reader.readexactly(length)
                self.frames.append(header + data)
                answer = ttrpc_pb2.Response(payload=data).SerializeToString()
                writer.write(struct.pack(HDR, len(answer), sid, 2, 0) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        writer.close()

    def requests(self) -> list[ttrpc_pb2.Request]:
        return [ttrpc_pb2.Request.FromString(f[10:]) for f in self.frames]


@pytest.fixture
async def setup(tmp_path, pki):
    agent = StandInAgent()
    agent_socket = str(tmp_path / "agent.sock")
    await agent.start(agent_socket)
    forwarder = AgentProtocolForwarder(
        kata_agent_socket=agent_socket, ssl_context=server_context(pki.material, "1.2"), host="127.0.0.1", port=0
    )
    await forwarder.start()
    yield forwarder, agent
    await forwarder.close()
    agent.server.close()


async def tls_client(forwarder: AgentProtocolForwarder, pki: Pki, tmp_path: Path) -> Client:
    ctx = client_context(pki, tmp_path, pki.client_cert)
    return await asyncio.wait_for(
        Client.connect_tcp("127.0.0.1", forwarder.port, ssl=ctx, server_hostname=SERVER_NAME), 5
    )


async def tls_streams(
    forwarder: AgentProtocolForwarder, pki: Pki, tmp_path: Path
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ctx = client_context(pki, tmp_path, pki.client_cert)
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", forwarder.port, ssl=ctx, server_hostname=SERVER_NAME), 5
    )


def agent_call_payload(agent: StandInAgent, method: str) -> bytes:
    matches = [r.payload for r in agent.requests() if r.method == method]
    assert len(matches) == 1, f"the agent should have received exactly one {method}, got {len(matches)}"
    return matches[0]


# --------------------------------------------------------------------- tests


async def test_create_container_gets_pod_network_namespace_appended(setup, pki, tmp_path):
    forwarder, agent = setup
    req = agent_pb2.CreateContainerRequest(container_id="c1")
    req.OCI.Linux.Namespaces.add(Type="pid")
    req.OCI.Linux.Namespaces.add(Type="mount")
    async with await tls_client(forwarder, pki, tmp_path) as client:
        await client.call("grpc.AgentService", "CreateContainer", req.SerializeToString(), timeout=5)
    got = agent_pb2.CreateContainerRequest.FromString(agent_call_payload(agent, "CreateContainer"))
    assert [(ns.Type, ns.Path) for ns in got.OCI.Linux.Namespaces] == [
        ("pid", ""), ("mount", ""), ("network", POD_NETNS_PATH)
    ]
    assert got.container_id == "c1"


async def test_existing_network_namespace_is_repointed_not_duplicated(setup, pki, tmp_path):
    forwarder, agent = setup
    req = agent_pb2.CreateContainerRequest(container_id="c2")
    req.OCI.Linux.Namespaces.add(Type="network", Path="/var/run/netns/cni-123")
    req.OCI.Linux.Namespaces.add(Type="ipc")
    async with await tls_client(forwarder, pki, tmp_path) as client:
        await client.call("grpc.AgentService", "CreateContainer", req.SerializeToString(), timeout=5)
    got = agent_pb2.CreateContainerRequest.FromString(agent_call_payload(agent, "CreateContainer"))
    assert [(ns.Type, ns.Path) for ns in got.OCI.Linux.Namespaces] == [("network", POD_NETNS_PATH), ("ipc", "")]


async def test_create_sandbox_dns_is_cleared(setup, pki, tmp_path):
    forwarder, agent = setup
    req = agent_pb2.CreateSandboxRequest(hostname="pod", dns=["nameserver 10.96.0.10", "search svc"], sandbox_id="s1")
    async with await tls_client(forwarder, pki, tmp_path) as client:
        await client.call("grpc.AgentService", "CreateSandbox", req.SerializeToString(), timeout=5)
    got = agent_pb2.CreateSandboxRequest.FromString(agent_call_payload(agent, "CreateSandbox"))
    assert list(got.dns) == []
    assert (got.hostname, got.sandbox_id) == ("pod", "s1")


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2); payloads here are < 128 bytes."""
    assert len(payload) < 128
    return bytes([(number << 3) | 2, len(payload)]) + payload


async def test_unmodelled_fields_pass_through_a_rewrite_unchanged(setup, pki, tmp_path):
    forwarder, agent = setup
    spec = agent_pb2.Spec(Version="1.1.0", Hostname="pod")
    spec.Annotations["io.kubernetes.cri.container-type"] = "container"
    spec.Linux.CgroupsPath = "/kubepods/pod1"
    # Spec field 11 (e.g. Windows/VM, unmodelled) and Storage (CreateContainerRequest field 5).
    spec_unknown = _field(11, b"\x0a\x05vm-id")
    storage = _field(5, _field(1, b"virtio-fs") + _field(5, b"/run/kata-containers/shared"))
    payload = (
        agent_pb2.CreateContainerRequest(container_id="c3").SerializeToString()
        + _field(6, spec.SerializeToString() + spec_unknown)
        + storage
    )
    envelope_unknown = _field(9, b"future-envelope-field")
    envelope = ttrpc_pb2.Request(
        service="grpc.AgentService", method="CreateContainer", payload=payload
    ).SerializeToString() + envelope_unknown

    reader, writer = await tls_streams(forwarder, pki, tmp_path)
    writer.write(struct.pack(HDR, len(envelope), 1, 1, 0) + envelope)
    await asyncio.wait_for(reader.readexactly(10), 5)
    writer.close()

    forwarded = agent.frames[0][10:]
    received = agent_call_payload(agent, "CreateContainer")
    assert storage in received, "Storage (unmodelled field 5) must reach the agent byte for byte"
    assert spec_unknown in received, "Spec field 11 (unmodelled) must reach the agent byte for byte"
    assert envelope_unknown in forwarded, "unknown envelope fields must survive the re-encoding"
    got = agent_pb2.CreateContainerRequest.FromString(received)
    assert got.OCI.Version == "1.1.0" and got.OCI.Hostname == "pod"
    assert dict(got.OCI.Annotations) == {"io.kubernetes.cri.container-type": "container"}
    assert got.OCI.Linux.CgroupsPath == "/kubepods/pod1"
    assert [(ns.Type, ns.Path) for ns in got.OCI.Linux.Namespaces] == [("network", POD_NETNS_PATH)]


async def test_other_methods_are_forwarded_byte_for_byte_both_ways(setup, pki, tmp_path):
    forwarder, agent = setup
    reader, writer = await tls_streams(forwarder, pki, tmp_path)
    tls_version = writer.get_extra_info("ssl_object").version()
    assert tls_version in ("TLSv1.2", "TLSv1.3")
    exec_req = agent_pb2.ExecProcessRequest(container_id="c1", exec_id="e1")
    exec_req.process.Args.extend(["sh", "-c", "echo hi"])
    # Non-canonical field order: any re-encoding would reorder these bytes.
    frames = [
        b"\x12\x0bExecProcess" + b"\x0a\x11grpc.AgentService" + _field(3, exec_req.SerializeToString()),
        ttrpc_pb2.Request(service="grpc.Health", method="Check", timeout_nano=10**9).SerializeToString(),
        b"\x12\x0fCreateContainer" + b"\x0a\x0bother.Agent",  # same method name, other service
    ]
    sent = [struct.pack(HDR, len(f), 2 * i + 1, 1, 0) + f for i, f in enumerate(frames)]
    writer.write(b"".join(sent))
    answers = []
    for _ in frames:
        header = await asyncio.wait_for(reader.readexactly(10), 5)
        answers.append(header + await asyncio.wait_for(reader.readexactly(struct.unpack(HDR, header)[0]), 5))
    writer.close()
    assert agent.frames == sent
    for frame_bytes, answer in zip(sent, answers):
        expected = ttrpc_pb2.Response(payload=frame_bytes[10:]).SerializeToString()
        assert answer == struct.pack(HDR, len(expected), struct.unpack(HDR, frame_bytes[:10])[1], 2, 0) + expected


async def _assert_refused(forwarder: AgentProtocolForwarder, ctx: ssl.SSLContext, caplog) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, ConnectionClosed, asyncio.IncompleteReadError)):
        client = await asyncio.wait_for(
            Client.connect_tcp("127.0.0.1", forwarder.port, ssl=ctx, server_hostname=SERVER_NAME), 5
        )
        try:
            await client.call("grpc.Health", "Check", b"", timeout=5)
        finally:
            await client.close()
    for _ in range(50):
        if any("refused" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.02)
    assert any("refused" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caplog.records)


async def test_client_without_certificate_is_refused(setup, pki, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cloudadaptor.podvm.forwarder")
    forwarder, agent = setup
    await _assert_refused(forwarder, client_context(pki, tmp_path, None), caplog)
    assert agent.frames == []


async def test_client_with_certificate_from_another_ca_is_refused(setup, pki, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cloudadaptor.podvm.forwarder")
    forwarder, agent = setup
    await _assert_refused(forwarder, client_context(pki, tmp_path, pki.foreign_client_cert), caplog)
    assert agent.frames == []


async def test_unreachable_agent_closes_client_connection_with_logged_reason(pki, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cloudadaptor.podvm.forwarder")
    missing = str(tmp_path / "no-agent.sock")
    forwarder = AgentProtocolForwarder(
        kata_agent_socket=missing, ssl_context=server_context(pki.material), host="127.0.0.1", port=0
    )
    await forwarder.start()
    try:
        async with await tls_client(forwarder, pki, tmp_path) as client:
            with pytest.raises(ConnectionClosed):
                await client.call("grpc.Health", "Check", b"", timeout=5)
        assert any("cannot reach kata-agent" in r.getMessage() and missing in r.getMessage() for r in caplog.records)
    finally:
        await forwarder.close()


async def test_plain_tcp_when_tls_is_disabled(tmp_path):
    agent = StandInAgent()
    await agent.start(str(tmp_path / "a.sock"))
    forwarder = AgentProtocolForwarder(
        kata_agent_socket=str(tmp_path / "a.sock"), ssl_context=None, host="127.0.0.1", port=0
    )
    await forwarder.start()
    try:
        req = agent_pb2.CreateSandboxRequest(dns=["x"])
        async with await asyncio.wait_for(Client.connect_tcp("127.0.0.1", forwarder.port), 5) as client:
            await client.call("grpc.AgentService", "CreateSandbox", req.SerializeToString(), timeout=5)
        assert list(agent_pb2.CreateSandboxRequest.FromString(agent_call_payload(agent, "CreateSandbox")).dns) == []
    finally:
        await forwarder.close()
        agent.server.close()


def test_plain_tcp_on_the_forwarders_own_loop_keeps_a_request_sent_at_once(tmp_path):
    """uvloop (``new_event_loop``, the standalone forwarder's and the VM init's loop) starts reading an
    accepted plain-TCP socket after ``connection_made`` paused it: bytes that come before the agent's
    socket is dialled must wait, not be dropped."""
    from cloudadaptor.eventloop import new_event_loop

    async def body() -> None:
        agent = StandInAgent()
        await agent.start(str(tmp_path / "a.sock"))
        forwarder = AgentProtocolForwarder(kata_agent_socket=str(tmp_path / "a.sock"), host="127.0.0.1", port=0)
        await forwarder.start()
        try:
            for _ in range(5):  # each connection's first request goes out with the connect
                async with await asyncio.wait_for(Client.connect_tcp("127.0.0.1", forwarder.port), 5) as client:
                    req = agent_pb2.CreateSandboxRequest(dns=["x"])
                    await client.call("grpc.AgentService", "CreateSandbox", req.SerializeToString(), timeout=5)
        finally:
            await forwarder.close()
            agent.server.close()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(body())


async def test_forwarder_command_serves_config_and_stops_cleanly_on_sigterm(pki, tmp_path):
    agent = StandInAgent()
    agent_socket = str(tmp_path / "agent.sock")
    await agent.start(agent_socket)
    config = tmp_path / "apf.json"
    config.write_text(ForwarderConfig(sandbox_id="s", pod_name="p", pod_namespace="n", tls=pki.material).to_json())
    cmd = [
        sys.executable, "-c", "import sys; from cloudadaptor.podvm.forwarder import main; sys.exit(main(sys.argv[1:]))",
        "--config", str(config), "--kata-agent-socket", agent_socket, "--host", "127.0.0.1", "--port", "0",
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=REPO, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        port = await _wait_for_port(proc)
        ctx = client_context(pki, tmp_path, pki.client_cert)
        connecting = Client.connect_tcp("127.0.0.1", port, ssl=ctx, server_hostname=SERVER_NAME)
        async with await asyncio.wait_for(connecting, 5) as client:
            sandbox = agent_pb2.CreateSandboxRequest(dns=["d"]).SerializeToString()
            await client.call("grpc.AgentService", "CreateSandbox", sandbox, timeout=5)
        assert list(agent_pb2.CreateSandboxRequest.FromString(agent_call_payload(agent, "CreateSandbox")).dns) == []
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        agent.server.close()


async def _wait_for_port(proc: asyncio.subprocess.Process) -> int:
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 15)).decode()
        assert line, "forwarder exited before listening"
        if "listening on 127.0.0.1:" in line:
            return int(line.split("listening on 127.0.0.1:")[1].split()[0])


def test_forwarder_command_refuses_bad_config_with_exit_code_2(tmp_path):
    config = tmp_path / "apf.json"
    config.write_text('{"pod_name": 3}')
    result = subprocess.run(
        [sys.executable, "-m", "cloudadaptor.podvm.forwarder", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "apf.json" in result.stderr and "configuration refused" in result.stderr


# ------------------------------------------------------------------ bounds (issue 11 item 8)


async def open_idle_tcp(port: int, count: int, batch: int = 100) -> list:
    """``count`` TCP connections to 127.0.0.1:``port`` that never say a word (no ClientHello)."""
    import socket as socket_module

    loop = asyncio.get_running_loop()
    socks = []

    async def one() -> None:
        sock = socket_module.socket()
        sock.setblocking(False)
        socks.append(sock)
        await loop.sock_connect(sock, ("127.0.0.1", port))

    for start in range(0, count, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, count - start))))
    return socks


async def test_10000_idle_connections_leave_a_real_call_served(setup, pki, tmp_path, many_files):
    forwarder, agent = setup
    idle = await open_idle_tcp(forwarder.port, 10_000)
    try:
        assert len(forwarder._handshaking) <= forwarder.max_handshakes
        assert forwarder.evicted >= 10_000 - forwarder.max_handshakes - 1024, "only the cap and the listen backlog may hold them"
        async with await tls_client(forwarder, pki, tmp_path) as client:
            req = agent_pb2.CreateSandboxRequest(hostname="pod", sandbox_id="s-flood")
            await client.call("grpc.AgentService", "CreateSandbox", req.SerializeToString(), timeout=10)
        assert agent_call_payload(agent, "CreateSandbox")
    finally:
        for sock in idle:
            sock.close()


async def test_handshake_timeout_closes_a_silent_connection(tmp_path, pki):
    forwarder = AgentProtocolForwarder(kata_agent_socket=str(tmp_path / "none.sock"),
                                       ssl_context=server_context(pki.material, "1.2"), host="127.0.0.1", port=0,
                                       handshake_timeout=0.3)
    await forwarder.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", forwarder.port)
        assert await asyncio.wait_for(reader.read(), 5) == b"", "the forwarder hung up on a silent client"
        writer.close()
    finally:
        await forwarder.close()


async def test_when_every_slot_holds_a_relay_new_connections_are_closed(setup, pki, tmp_path):
    forwarder, agent = setup
    forwarder.max_connections = 2
    clients = [await tls_client(forwarder, pki, tmp_path) for _ in range(2)]
    try:
        for client in clients:  # both relays established
            await client.call("grpc.AgentService", "CreateSandbox", agent_pb2.CreateSandboxRequest().SerializeToString(), timeout=5)
        reader, writer = await asyncio.open_connection("127.0.0.1", forwarder.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert forwarder.refused == 1
    finally:
        for client in clients:
            await client.close()
