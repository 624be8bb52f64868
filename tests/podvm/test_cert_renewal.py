"""Certificate renewal between the adaptor's CertRenewal and a real forwarder on loopback (real TLS, real ttrpc):
what the VM writes, what it refuses, images without renewal, failures and their backoff."""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509

from cloudadaptor.adaptor.certrenewal import UNSUPPORTED, CertRenewal, RenewalOptions
from cloudadaptor.adaptor.store import Sandbox, SandboxState, SandboxStore
from cloudadaptor.config import Settings
from cloudadaptor.podconfig import ForwarderConfig
from cloudadaptor.podvm.certrenewal import ServerCertificate
from cloudadaptor.podvm.forwarder import AgentProtocolForwarder
from cloudadaptor.tls import AdaptorTls, server_context
from cloudadaptor.ttrpc.client import Client
from cloudadaptor.ttrpc.errors import Code, TtrpcError
from cloudadaptor.ttrpc.server import Server
from cloudadaptor.wire import CERT_CURRENT_METHOD, CERT_RENEW_METHOD, CERT_SERVICE

VM = "podvm-unit-0123abcd"
DAY = 86400.0


class Counts:
    def __init__(self) -> None:
        self.results: list[str] = []

    def cert_renewal(self, result: str) -> None:
        self.results.append(result)


@pytest.fixture
async def world(tmp_path):
    """An adaptor's TLS, a VM's apf.json, a kata-agent stand-in that serves nothing (UNIMPLEMENTED), a store."""
    tls = AdaptorTls.from_settings(Settings(state_dir=tmp_path / "adaptor"))
    apf = tmp_path / "vm" / "apf.json"
    apf.parent.mkdir()
    apf.write_text(ForwarderConfig("s", "p", "ns", tls=tls.mint_vm_material(VM)).to_json())
    os.chmod(apf, 0o600)
    agent = Server()
    await agent.serve_unix(str(tmp_path / "agent.sock"))
    store = SandboxStore(tmp_path / "state.db")
    forwarders: list[AgentProtocolForwarder] = []

    async def forwarder(renewable: bool = True) -> AgentProtocolForwarder:
        config = ForwarderConfig.from_json(apf.read_bytes())
        kw = ({"certificate": ServerCertificate.from_config(config, apf)} if renewable
              else {"ssl_context": server_context(config.tls)})  # an image built before renewal
        fwd = AgentProtocolForwarder(kata_agent_socket=str(tmp_path / "agent.sock"), host="127.0.0.1", port=0, **kw)
        await fwd.start()
        forwarders.append(fwd)
        return fwd

    yield tls, apf, store, forwarder
    for fwd in forwarders:
        await fwd.close()
    await agent.close()
    store.close()


def running_row(store: SandboxStore, tls: AdaptorTls, age_days: float = 25.0, sandbox_id: str = "a" * 64) -> Sandbox:
    """A running sandbox whose VM (at 127.0.0.1) holds a certificate ``age_days`` into its 30 days."""
    now = time.time()
    store.add(Sandbox(id=sandbox_id, pod_name="p", pod_namespace="ns", netns_path="/run/netns/x", vm_name=VM,
                      agent_socket="/nonexistent/agent.ttrpc", state=SandboxState.RUNNING, instance_id="i-unit",
                      vm_ips=("127.0.0.1",)))
    return store.update(sandbox_id, cert_issued_at=now - age_days * DAY, cert_not_after=now + (30 - age_days) * DAY,
                        cert_ca=tls.ca_key_id)


async def call(fwd: AgentProtocolForwarder, tls: AdaptorTls, method: str, payload: bytes) -> dict:
    client = await Client.connect_tcp("127.0.0.1", fwd.port, ssl=tls.client_context(), server_hostname=VM)
    try:
        return json.loads(await client.call(CERT_SERVICE, method, payload, timeout=5))
    finally:
        await client.close()


async def test_a_renewal_is_written_0600_to_apf_json_and_served_after_a_forwarder_restart(world):
    tls, apf, store, forwarder = world
    fwd = await forwarder()
    before = await call(fwd, tls, CERT_CURRENT_METHOD, b"")
    running_row(store, tls)
    counts = Counts()
    renewal = CertRenewal(store=store, tls=tls, options=RenewalOptions(port=fwd.port), recorder=counts)
    assert await renewal.run_once() == {"a" * 64: "ok"} and counts.results == ["ok"]
    after = await call(fwd, tls, CERT_CURRENT_METHOD, b"")
    assert after["serial"] != before["serial"]
    assert os.stat(apf).st_mode & 0o777 == 0o600
    written = x509.load_pem_x509_certificate(ForwarderConfig.from_json(apf.read_bytes()).tls.cert_pem.encode())
    assert format(written.serial_number, "x") == after["serial"]
    assert store.get("a" * 64).cert_not_after == written.not_valid_after_utc.timestamp()
    await fwd.close()
    assert (await call(await forwarder(), tls, CERT_CURRENT_METHOD, b""))["serial"] == after["serial"]


def material_doc(tls: AdaptorTls, name: str = VM, days: float | None = None) -> dict:
    if days is None:
        m = tls.mint_vm_material(name)
        return {"cert_pem": m.cert_pem, "key_pem": m.key_pem, "client_ca_pem": m.client_ca_pem}
    cert, key = tls.ca.issue(name, server=True, dns_names=[name], days=days)
    return {"cert_pem": cert, "key_pem": key, "client_ca_pem": tls.vm_client_ca_pem}


@pytest.mark.parametrize("case, expected", [
    ("expired", "expired"), ("wrong name", "names ['podvm-someone-else']"), ("mismatched key", "KEY_VALUES_MISMATCH"),
    ("not json", "not JSON"), ("missing field", "expected a JSON object"), ("not a certificate", "not a PEM certificate"),
])
async def test_a_bad_renewal_is_refused_and_the_old_certificate_stays(world, case, expected, caplog):
    tls, apf, _, forwarder = world
    fwd = await forwarder()
    before, file_before = await call(fwd, tls, CERT_CURRENT_METHOD, b""), apf.read_bytes()
    doc = material_doc(tls)
    payload = {
        "expired": lambda: json.dumps(material_doc(tls, days=-0.001)),
        "wrong name": lambda: json.dumps(material_doc(tls, "podvm-someone-else")),
        "mismatched key": lambda: json.dumps({**doc, "key_pem": material_doc(tls)["key_pem"]}),
        "not json": lambda: "{",
        "missing field": lambda: json.dumps({"cert_pem": doc["cert_pem"]}),
        "not a certificate": lambda: json.dumps({**doc, "cert_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n"}),
    }[case]().encode()
    with pytest.raises(TtrpcError) as err:
        await call(fwd, tls, CERT_RENEW_METHOD, payload)
    assert err.value.code == Code.INVALID_ARGUMENT and expected in err.value.message, err.value.message
    assert await call(fwd, tls, CERT_CURRENT_METHOD, b"") == before and apf.read_bytes() == file_before
    assert "PRIVATE KEY" not in caplog.text


async def test_an_image_without_renewal_is_logged_once_and_left_alone(world, caplog):
    tls, _, store, forwarder = world
    fwd = await forwarder(renewable=False)
    running_row(store, tls)
    counts = Counts()
    renewal = CertRenewal(store=store, tls=tls, options=RenewalOptions(port=fwd.port), recorder=counts)
    with caplog.at_level(logging.WARNING, logger="cloudadaptor.adaptor.certrenewal"):
        assert await renewal.run_once() == {"a" * 64: UNSUPPORTED}
        assert await renewal.run_once() == {}, "not tried again"
    assert store.get("a" * 64).cert_renewal == UNSUPPORTED and counts.results == [UNSUPPORTED]
    [line] = [r.getMessage() for r in caplog.records if "cannot renew" in r.getMessage()]
    assert "a" * 64 in line and "i-unit" in line


async def test_a_failed_renewal_is_retried_after_a_pause_and_never_logs_key_material(world, caplog):
    tls, _, store, forwarder = world
    fwd = await forwarder()
    port = fwd.port
    await fwd.close()  # the VM is unreachable for now
    running_row(store, tls)
    now = [time.time()]
    counts = Counts()
    renewal = CertRenewal(store=store, tls=tls, options=RenewalOptions(port=port, timeout=2), recorder=counts,
                          clock=lambda: now[0])
    with caplog.at_level(logging.INFO):
        assert await renewal.run_once() == {"a" * 64: "failed"}
        assert await renewal.run_once() == {}, "backing off"
        now[0] += 3600 * 2
        assert await renewal.run_once() == {"a" * 64: "failed"}
    assert counts.results == ["failed", "failed"]
    failures = [r.getMessage() for r in caplog.records if "renewal of sandbox" in r.getMessage()]
    assert len(failures) == 2 and all("i-unit" in f and VM in f and "next attempt" in f for f in failures)
    assert "PRIVATE KEY" not in caplog.text and "BEGIN" not in caplog.text


async def test_a_renewal_from_a_client_without_the_adaptor_certificate_never_reaches_the_service(world, tmp_path):
    tls, apf, _, forwarder = world
    fwd = await forwarder()
    stranger = AdaptorTls.from_settings(Settings(state_dir=tmp_path / "stranger"))  # another CA, another client cert
    context = stranger.client_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    before = apf.read_bytes()
    with pytest.raises(Exception) as err:
        client = await Client.connect_tcp("127.0.0.1", fwd.port, ssl=context, server_hostname=VM)
        try:
            await client.call(CERT_SERVICE, CERT_RENEW_METHOD, json.dumps(material_doc(stranger)).encode(), timeout=5)
        finally:
            await client.close()
    assert not isinstance(err.value, TtrpcError), "refused in the handshake, never answered"
    assert apf.read_bytes() == before
    assert Path(apf).stat().st_mode & 0o777 == 0o600
