"""Renewing a running pod VM's server certificate, end to end: the daemon, a local pod VM (its own netns,
the real forwarder with mTLS, the development agent), real TLS (issue 11 item 9)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.dev.shim import ShimEmulator, start_pod, stop_pod
from cloudadaptor.files import write_atomic
from cloudadaptor.tls import client_context
from cloudadaptor.tlscerts import CertificateAuthority, _builder
from cloudadaptor.ttrpc.client import Client
from cloudadaptor.ttrpc.errors import Code, ConnectionClosed, TtrpcError
from cloudadaptor.wire import AGENT_PORT, CERT_RENEW_METHOD, CERT_SERVICE

from test_e2e import daemon_factory  # noqa: F401 - the fixture is used by name

DAY = 86400.0


async def served(sandbox, context: ssl.SSLContext) -> x509.Certificate:
    """The certificate the VM's forwarder presents to a new connection (raises when the handshake fails)."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(sandbox.vm_ips[0], AGENT_PORT, ssl=context,
                                                       server_hostname=sandbox.vm_name)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)
    finally:
        writer.close()


async def running_pod(daemon_factory, make_pod_netns, name: str, ip: str, **env: str):  # noqa: F811
    daemon, socket_path = await daemon_factory(**env)
    shim = ShimEmulator(socket_path)
    pod = await asyncio.to_thread(make_pod_netns, f"198.51.100.{ip}/24", "198.51.100.1")
    run, _, _ = await start_pod(shim, name, "e2e", pod.path)
    return daemon, shim, run


def later(days: float):
    return lambda: time.time() + days * DAY


async def renew_call(sandbox, context: ssl.SSLContext, payload: bytes) -> bytes:
    client = await Client.connect_tcp(sandbox.vm_ips[0], AGENT_PORT, ssl=context, server_hostname=sandbox.vm_name)
    try:
        return await client.call(CERT_SERVICE, CERT_RENEW_METHOD, payload, timeout=10)
    finally:
        await client.close()


async def test_renewal_serves_a_new_certificate_while_an_open_agent_connection_keeps_working(
        daemon_factory, make_pod_netns):  # noqa: F811
    daemon, shim, run = await running_pod(daemon_factory, make_pod_netns, "renew", "60")
    sandbox = daemon.lifecycle.store.get(run.sandbox_id)
    tls = daemon.renewal.tls
    s1 = await served(sandbox, tls.client_context())
    assert await daemon.renewal.run_once() == {}, "a fresh certificate is not due"
    recorded = daemon.lifecycle.store.get(run.sandbox_id)
    assert recorded.cert_not_after == s1.not_valid_after_utc.timestamp(), "read from the user data and recorded"

    await asyncio.sleep(1.1)  # certificate times have one-second resolution: the new notAfter must be later
    daemon.renewal.clock = later(21)  # past 2/3 of VM_CERT_VALIDITY (30 days)
    assert await daemon.renewal.run_once() == {run.sandbox_id: "ok"}
    s2 = await served(sandbox, tls.client_context())
    assert s2.serial_number != s1.serial_number and s2.not_valid_after_utc > s1.not_valid_after_utc
    assert s2.fingerprint(hashes.SHA256()) != s1.fingerprint(hashes.SHA256())
    result = await run.exec(["sh", "-c", "echo still-here"])  # the shim's agent connection, opened before
    assert result.exit_code == 0 and result.stdout == b"still-here\n", result
    row = daemon.lifecycle.store.get(run.sandbox_id)
    assert row.cert_not_after == s2.not_valid_after_utc.timestamp() and row.cert_issued_at > recorded.cert_issued_at
    assert daemon.metrics.cert_renewals.labels("ok")._value.get() == 1
    daemon.renewal.clock = time.time
    assert await daemon.renewal.run_once() == {}, "renewed: not due again"
    await stop_pod(shim, run)


def shorten(ca: CertificateAuthority, days_left: float) -> CertificateAuthority:
    """The same CA (key, name, key id) re-issued to expire in ``days_left``: as if months had passed."""
    cert = ca.certificate
    builder = _builder(cert.subject, cert.subject, ca._key, days_left, ca=True).add_extension(
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value, critical=False)
    return CertificateAuthority(builder.sign(ca._key, hashes.SHA256()), ca._key)


async def test_after_a_ca_rotation_the_vm_trusts_the_new_ca(daemon_factory, make_pod_netns):  # noqa: F811
    daemon, shim, run = await running_pod(daemon_factory, make_pod_netns, "rotate", "61",
                                          CA_VALIDITY="720h", VM_CERT_VALIDITY="240h")
    sandbox = daemon.lifecycle.store.get(run.sandbox_id)
    tls = daemon.renewal.tls
    old = shorten(tls.ca, days_left=5)  # less than a third of CA_VALIDITY left: rotation due
    write_atomic(daemon.settings.state_dir / "tls" / "ca.pem", old.cert_pem, 0o644)
    tls.ca = old
    assert await daemon.renewal.run_once() == {run.sandbox_id: "ok"}, "rotated, then renewed at once"
    new_ca = tls.ca
    assert new_ca.cert_pem != old.cert_pem
    served_now = await served(sandbox, tls.client_context())
    served_now.verify_directly_issued_by(new_ca.certificate)
    cert_pem, key_pem = new_ca.issue("cloud-api-adaptor next", server=False)  # what the adaptor presents later
    new_client = client_context(cert_pem, key_pem, tls.trusted_ca_pem)
    assert (await served(sandbox, new_client)).serial_number == served_now.serial_number
    result = await run.exec(["true"])
    assert result.exit_code == 0
    await stop_pod(shim, run)


async def test_renewal_refused_without_the_adaptor_certificate_or_with_a_bogus_payload(
        daemon_factory, make_pod_netns):  # noqa: F811
    daemon, shim, run = await running_pod(daemon_factory, make_pod_netns, "refuse", "62")
    sandbox = daemon.lifecycle.store.get(run.sandbox_id)
    tls = daemon.renewal.tls
    s1 = await served(sandbox, tls.client_context())
    good = tls.mint_vm_material(sandbox.vm_name)
    payload = json.dumps(dataclasses.asdict(good)).encode()

    stranger_pem, stranger_key = CertificateAuthority.create().issue("intruder", server=False)
    stranger = client_context(stranger_pem, stranger_key, tls.trusted_ca_pem)
    with pytest.raises((OSError, ssl.SSLError, ConnectionClosed)):
        await renew_call(sandbox, stranger, payload)
    assert (await served(sandbox, tls.client_context())).serial_number == s1.serial_number

    other = tls.mint_vm_material(sandbox.vm_name)
    mismatched = json.dumps({**dataclasses.asdict(good), "key_pem": other.key_pem}).encode()
    with pytest.raises(TtrpcError) as err:
        await renew_call(sandbox, tls.client_context(), mismatched)
    assert err.value.code == Code.INVALID_ARGUMENT and "KEY_VALUES_MISMATCH" in err.value.message
    assert (await served(sandbox, tls.client_context())).serial_number == s1.serial_number, "the old certificate stays"
    result = await run.exec(["true"])
    assert result.exit_code == 0
    await stop_pod(shim, run)


async def test_a_renewal_that_fell_due_while_the_daemon_was_down_happens_after_restart(
        daemon_factory, make_pod_netns):  # noqa: F811
    daemon, shim, run = await running_pod(daemon_factory, make_pod_netns, "restart", "63")
    sandbox = daemon.lifecycle.store.get(run.sandbox_id)
    s1 = await served(sandbox, daemon.renewal.tls.client_context())
    await daemon.renewal.run_once()  # records the certificate's times
    row = daemon.lifecycle.store.get(run.sandbox_id)
    await daemon.close()
    # Time passes while the daemon is down: the recorded certificate is now 25 of 30 days old.
    overdue = row.cert_issued_at - 25 * DAY
    restarted = Daemon(daemon.settings)
    try:
        from cloudadaptor.adaptor.store import SandboxStore

        store = SandboxStore(daemon.settings.state_dir / "state.db")
        store.update(run.sandbox_id, cert_issued_at=overdue, cert_not_after=row.cert_not_after - 25 * DAY)
        store.close()
        await restarted.start()
        # The first pass runs at start. Watch the issue time, not the expiry: on a quiet machine
        # the renewed certificate can end in the same second as the first one.
        async with asyncio.timeout(30):
            while restarted.lifecycle.store.get(run.sandbox_id).cert_issued_at <= overdue:
                await asyncio.sleep(0.1)
        s2 = await served(sandbox, restarted.renewal.tls.client_context())
        assert s2.serial_number != s1.serial_number
        assert restarted.lifecycle.store.get(run.sandbox_id).cert_not_after == s2.not_valid_after_utc.timestamp()
    finally:
        if restarted.lifecycle is not None:  # the first daemon is closed: its fixture leaves the VM to us
            for left in restarted.lifecycle.store.all():
                await restarted.lifecycle.stop(left.id)
        await restarted.close()
