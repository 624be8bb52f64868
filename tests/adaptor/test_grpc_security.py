"""GRPC_ENDPOINT serves only locally, or with mutual TLS (issue 11 item 1).

The non-loopback address is a documentation address on a bridge inside the
private namespace; certificates come from throw-away CAs made here.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2 as grpc_health_pb2
from grpc_health.v1 import health_pb2_grpc

from cloudadaptor.adaptor.daemon import Daemon, StartupError
from cloudadaptor.adaptor.grpc_binding import GrpcBinding, GrpcTls
from cloudadaptor.adaptor.service import HypervisorService
from cloudadaptor.config import ConfigError, Settings, load_settings
from cloudadaptor.dev.datapath import CloudNet
from cloudadaptor.protocols import hypervisor_pb2 as hv
from cloudadaptor.tlscerts import CertificateAuthority

ADDRESS = "192.0.2.225"


@pytest.fixture
def public_address(private_ns):
    """A non-loopback address of this (private) netns: the first host of 192.0.2.224/28 on a bridge."""
    net = CloudNet(bridge=f"ppgr{os.getpid() % 10000}", cidr="192.0.2.224/28").open()
    assert net.worker_ip == ADDRESS
    yield ADDRESS
    net.close()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """Server pair for ADDRESS, the client CA, a client signed by it and one signed by a stranger."""
    ca, stranger = CertificateAuthority.create("grpc clients"), CertificateAuthority.create("stranger")
    server_ca = CertificateAuthority.create("grpc server")
    files = {}
    pairs = {
        "server": server_ca.issue("adaptor", server=True, ip_addresses=[ADDRESS, "127.0.0.1"]),
        "client": ca.issue("kubelet", server=False),
        "stranger": stranger.issue("intruder", server=False),
    }
    for name, (cert, key) in pairs.items():
        (tmp_path / f"{name}.pem").write_text(cert)
        (tmp_path / f"{name}.key").write_text(key)
        files[name], files[f"{name}_key"] = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    (tmp_path / "client-ca.pem").write_text(ca.cert_pem)
    (tmp_path / "server-ca.pem").write_text(server_ca.cert_pem)
    files["client_ca"], files["server_ca"] = tmp_path / "client-ca.pem", tmp_path / "server-ca.pem"
    return files


@pytest.fixture
def service(lifecycle_factory):
    return HypervisorService(lifecycle_factory(agent_port=1))


async def version(channel: grpc.aio.Channel) -> str:
    call = channel.unary_unary("/hypervisor.Hypervisor/Version", request_serializer=hv.VersionRequest.SerializeToString,
                               response_deserializer=hv.VersionResponse.FromString)
    return (await call(hv.VersionRequest(), timeout=5)).version


def env(**extra: str) -> dict[str, str]:
    return {"CLOUD_PROVIDER": "local", **extra}


@pytest.mark.parametrize("endpoint", [f"{ADDRESS}:50051", ":50051", "0.0.0.0:50051", "[::]:50051", "node-1:50051"])
def test_config_refuses_a_non_loopback_endpoint_without_tls_in_one_line(endpoint):
    with pytest.raises(ConfigError) as err:
        load_settings(env(GRPC_ENDPOINT=endpoint))
    [line] = [str(p) for p in err.value.problems]
    assert line.startswith("GRPC_ENDPOINT=") and "GRPC_TLS_CERT" in line and "\n" not in line


@pytest.mark.parametrize("endpoint", ["127.0.0.1:50051", "[::1]:50051", "localhost:50051", "unix:/run/peerpod/grpc.sock"])
def test_config_accepts_loopback_and_unix_endpoints(endpoint):
    assert load_settings(env(GRPC_ENDPOINT=endpoint)).grpc_endpoint == endpoint


def test_grpc_tls_keys_come_together(pki):
    with pytest.raises(ConfigError) as err:
        load_settings(env(GRPC_ENDPOINT=f"{ADDRESS}:50051", GRPC_TLS_CERT=str(pki["server"])))
    assert {p.key for p in err.value.problems} >= {"GRPC_TLS_KEY", "GRPC_TLS_CLIENT_CA"}
    settings = load_settings(env(GRPC_ENDPOINT=f"{ADDRESS}:50051", GRPC_TLS_CERT=str(pki["server"]),
                                 GRPC_TLS_KEY=str(pki["server_key"]), GRPC_TLS_CLIENT_CA=str(pki["client_ca"])))
    assert settings.grpc_tls_client_ca == pki["client_ca"]


async def test_daemon_refuses_to_start_on_a_public_address_without_tls(tmp_path, short_dir, provider, pod_network):
    settings = Settings(grpc_endpoint=f"{ADDRESS}:50051", state_dir=tmp_path / "state", pods_dir=short_dir / "pods",
                        socket=short_dir / "hv.sock", disable_tls=True)
    daemon = Daemon(settings, provider=provider, pod_network=pod_network)
    try:
        with pytest.raises(StartupError, match="not loopback"):
            await daemon.start()
    finally:
        await daemon.close()


async def test_unauthenticated_client_on_a_public_address_is_refused(public_address, pki, service):
    binding = GrpcBinding(service, f"{public_address}:0",
                          GrpcTls(pki["server"], pki["server_key"], pki["client_ca"]))
    await binding.start()
    target = f"{public_address}:{binding.port}"
    server_ca = pki["server_ca"].read_bytes()
    try:
        async with grpc.aio.insecure_channel(target) as channel:  # no TLS at all
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await version(channel)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(server_ca)) as channel:  # TLS, no cert
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await version(channel)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        stranger = grpc.ssl_channel_credentials(server_ca, pki["stranger_key"].read_bytes(), pki["stranger"].read_bytes())
        async with grpc.aio.secure_channel(target, stranger) as channel:  # a cert from another CA
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await version(channel)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        client = grpc.ssl_channel_credentials(server_ca, pki["client_key"].read_bytes(), pki["client"].read_bytes())
        async with grpc.aio.secure_channel(target, client) as channel:
            assert await version(channel)
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(grpc_health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == grpc_health_pb2.HealthCheckResponse.SERVING
    finally:
        await binding.close()


def test_binding_itself_refuses_a_public_address_without_tls(service):
    with pytest.raises(ValueError, match="not loopback"):
        GrpcBinding(service, f"{ADDRESS}:50051")


async def version_over_unix_socket(service: HypervisorService, path: Path) -> str:
    """Serve ``service`` on ``unix:path`` and ask it its version through grpc.aio."""
    binding = GrpcBinding(service, f"unix:{path}")
    await binding.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            return await version(channel)
    finally:
        await binding.close()


async def test_unix_socket_endpoint_serves(service, short_dir):
    assert await version_over_unix_socket(service, short_dir / "grpc.sock")


def test_the_binding_serves_on_the_daemons_own_loop(service, short_dir):
    """``serve`` runs on uvloop (``cloudadaptor.eventloop``); grpc.aio must serve there too."""
    import asyncio

    from cloudadaptor.eventloop import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        assert runner.run(version_over_unix_socket(service, short_dir / "grpc.sock"))
