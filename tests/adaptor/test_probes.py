"""The daemon's HTTP endpoint: /healthz, /startup, /metrics, and a start refused when it cannot listen."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading

import aiohttp
import pytest

from cloudadaptor.adaptor.daemon import Daemon, StartupError
from cloudadaptor import probes
from cloudadaptor.probes import ProbeServer
from cloudadaptor.config import ConfigError, load_settings
from cloudadaptor.dev.shim import ShimEmulator, shim_annotations
from cloudadaptor.metrics import Metrics

from cloudadaptor.protocols import health_pb2
from cloudadaptor.ttrpc.server import Server, unary

SANDBOX = "e" * 64
PORT = 18000


def _settings(short_dir, **extra: str):
    return load_settings({
        "CLOUD_PROVIDER": "local", "NODE_NAME": "worker-1", "DISABLE_TLS": "true",
        "STATE_DIR": str(short_dir / "state"), "SOCKET": str(short_dir / "hv.sock"), "PODS_DIR": str(short_dir / "pods"),
        "PROBE_PORT": str(PORT), **extra,
    })


async def _agent_on_port_15150() -> Server:
    """The fake VM's agent: the daemon dials the fake provider's 127.0.0.1 on 15150 (our port in the private namespace)."""
    server = Server()

    async def check(request, ctx):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server.register("grpc.Health", "Check", unary(health_pb2.CheckRequest, check))
    await server.serve_tcp("127.0.0.1", 15150)
    return server


async def _get(path: str, port: int = PORT) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as response:
            return response.status, await response.text()


async def test_probe_endpoint_serves_health_startup_and_metrics(private_ns, short_dir, provider, pod_network, netns_file):
    agent = await _agent_on_port_15150()
    daemon = Daemon(_settings(short_dir), provider=provider, pod_network=pod_network)
    await daemon.start()
    try:
        assert await _get("/healthz") == (200, "ok\n")
        assert await _get("/startup") == (200, "started\n")
        shim = ShimEmulator(str(daemon.settings.socket))
        await shim.create_vm(SANDBOX, netns_file, shim_annotations("web", "prod"))
        await shim.start_vm(SANDBOX)
        status, text = await _get("/metrics")
        assert status == 200
        assert 'cloud_api_adaptor_startvm_phase_seconds_count{phase="agent_ready",provider="fake"} 1.0' in text, text
        assert 'cloud_api_adaptor_sandboxes{state="running"} 1.0' in text
        assert 'cloud_api_adaptor_hypervisor_calls_total{code="OK",method="CreateVM"} 1.0' in text
        assert 'cloud_api_adaptor_agent_proxy_dials_total{result="ok"}' in text
        await shim.stop_vm(SANDBOX)
    finally:
        await daemon.close()
        await agent.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get("/healthz")  # closed with the daemon


async def test_startup_is_503_until_the_daemon_says_started(private_ns):
    started = False
    server = ProbeServer("127.0.0.1", PORT, Metrics("fake"), lambda: started)
    await server.start()
    try:
        status, text = await _get("/startup")
        assert status == 503 and "not served" in text
        assert (await _get("/healthz"))[0] == 200, "liveness answers while starting"
        started = True
        assert (await _get("/startup"))[0] == 200
    finally:
        await server.close()


async def test_port_in_use_refuses_the_start_with_one_line(private_ns, short_dir, provider, pod_network):
    taken = socket.socket()
    # The earlier tests' connections may sit in TIME_WAIT on this port (the endpoint speaks
    # HTTP/1.0 and closes first); a listener is what must refuse the start, not those.
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", PORT))
    taken.listen()
    try:
        daemon = Daemon(_settings(short_dir), provider=provider, pod_network=pod_network)
        with pytest.raises(StartupError) as err:
            await daemon.start()
        message = str(err.value)
        assert message == f"PROBE_ADDRESS:PROBE_PORT 127.0.0.1:{PORT}: cannot listen: port already in use", message
        assert daemon.lifecycle is None, "nothing started behind a refused probe endpoint"
    finally:
        taken.close()


async def test_address_not_on_this_host_is_refused(private_ns, short_dir, provider, pod_network):
    daemon = Daemon(_settings(short_dir, PROBE_ADDRESS="192.0.2.77"), provider=provider, pod_network=pod_network)
    with pytest.raises(StartupError) as err:
        await daemon.start()
    assert "192.0.2.77" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("value", ["0", "70000", "http", "-1"])
def test_bad_probe_port_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError) as err:
        load_settings({"CLOUD_PROVIDER": "local", "PROBE_PORT": value})
    assert [p.key for p in err.value.problems] == ["PROBE_PORT"]
    assert "port number from 1 to 65535" in str(err.value)


def test_bad_probe_address_and_log_format_are_refused():
    with pytest.raises(ConfigError) as err:
        load_settings({"CLOUD_PROVIDER": "local", "PROBE_ADDRESS": "pod-ip", "LOG_FORMAT": "xml"})
    assert sorted(p.key for p in err.value.problems) == ["LOG_FORMAT", "PROBE_ADDRESS"]
    assert "text, json" in str(err.value)


def _blocking_get(path: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) with the standard library's client, from any thread."""
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        connection.close()


async def test_healthz_is_503_while_the_event_loop_does_not_answer(private_ns, monkeypatch):
    monkeypatch.setattr(probes, "LOOP_TIMEOUT", 0.2)
    server = ProbeServer("127.0.0.1", PORT, Metrics("fake"), lambda: True)
    await server.start()
    try:
        answers = []
        client = threading.Thread(target=lambda: answers.append(_blocking_get("/healthz")))
        client.start()
        client.join()  # on the loop's thread: the loop cannot answer until the client has its reply
        assert answers[0][0] == 503 and "did not answer" in answers[0][2], answers
        assert await asyncio.to_thread(_blocking_get, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
    finally:
        await server.close()


async def test_other_paths_and_methods_are_refused_and_head_has_no_body(private_ns):
    server = ProbeServer("127.0.0.1", PORT, Metrics("fake"), lambda: True)
    await server.start()
    try:
        assert (await asyncio.to_thread(_blocking_get, "/nothing"))[0] == 404
        assert (await asyncio.to_thread(_blocking_get, "/metrics", "POST"))[0] == 405
        status, kind, body = await asyncio.to_thread(_blocking_get, "/metrics", "HEAD")
        assert (status, body) == (200, "") and kind.startswith("text/plain; version=")
        status, kind, body = await asyncio.to_thread(_blocking_get, "/metrics")
        assert kind.startswith("text/plain; version=") and "cloud_api_adaptor_build_info" in body, body[:300]
    finally:
        await server.close()
