"""Mutual TLS between the adaptor and pod VMs: real handshakes over loopback."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import stat
import tempfile
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cloudadaptor.config import Settings
from cloudadaptor.tls import AdaptorTls, ServerTlsMaterial, TlsError, client_context, server_context
from cloudadaptor.tlscerts import CertificateAuthority

HANDSHAKE_FAILED = (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)
PING = b"ping-through-tls"


async def echo_once(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> bytes:
    """Serve one TLS echo on 127.0.0.1, dial it, return what came back (raises on failure)."""
    served = []

    async def handle(reader, writer):
        data = await reader.readexactly(len(PING))
        served.append(data)
        writer.write(data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname
            )
            try:
                writer.write(PING)
                await writer.drain()
                return await reader.readexactly(len(PING))
            finally:
                writer.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture(scope="module")
def pair(ca):
    """(server material for vm-1, client context trusting ca with a ca-issued client cert)."""
    cert, key = ca.issue("vm-1", server=True, dns_names=["vm-1"])
    material = ServerTlsMaterial(cert, key, ca.cert_pem)
    ccert, ckey = ca.issue("adaptor", server=False)
    return material, (ccert, ckey)


def quiet_loop_errors():
    """Failed handshakes are logged by the event loop; keep test output readable."""
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: None)


async def test_mutual_tls_handshake_succeeds(pair, ca):
    material, (ccert, ckey) = pair
    got = await echo_once(server_context(material), client_context(ccert, ckey, ca.cert_pem), "vm-1")
    assert got == PING


async def test_client_without_certificate_is_refused(pair, ca):
    quiet_loop_errors()
    material, _ = pair
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(cadata=ca.cert_pem)
    with pytest.raises(HANDSHAKE_FAILED):
        await echo_once(server_context(material), bare, "vm-1")


async def test_client_certificate_from_another_ca_is_refused(pair, ca):
    quiet_loop_errors()
    material, _ = pair
    stranger_cert, stranger_key = CertificateAuthority.create().issue("intruder", server=False)
    with pytest.raises(HANDSHAKE_FAILED):
        await echo_once(server_context(material),
                        client_context(stranger_cert, stranger_key, ca.cert_pem), "vm-1")


async def test_server_from_another_ca_is_refused_by_the_client(pair, ca):
    quiet_loop_errors()
    _, (ccert, ckey) = pair
    other = CertificateAuthority.create()
    cert, key = other.issue("vm-1", server=True, dns_names=["vm-1"])
    with pytest.raises(ssl.SSLCertVerificationError):
        await echo_once(server_context(ServerTlsMaterial(cert, key, ca.cert_pem)),
                        client_context(ccert, ckey, ca.cert_pem), "vm-1")


async def test_server_name_must_match_the_certificate(pair, ca):
    quiet_loop_errors()
    material, (ccert, ckey) = pair
    with pytest.raises(ssl.SSLCertVerificationError, match="vm-2"):
        await echo_once(server_context(material), client_context(ccert, ckey, ca.cert_pem), "vm-2")


async def test_skip_verify_accepts_an_unknown_server(pair, ca):
    _, (ccert, ckey) = pair
    cert, key = CertificateAuthority.create().issue("elsewhere", server=True, dns_names=["elsewhere"])
    got = await echo_once(server_context(ServerTlsMaterial(cert, key, ca.cert_pem)),
                          client_context(ccert, ckey, None, skip_verify=True), "vm-1")
    assert got == PING


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_1_1_client_is_refused_when_minimum_is_1_2(pair, ca):
    quiet_loop_errors()
    material, (ccert, ckey) = pair
    old = client_context(ccert, ckey, ca.cert_pem)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(HANDSHAKE_FAILED):
        await echo_once(server_context(material, "1.2"), old, "vm-1")


async def test_tls_1_2_client_is_refused_when_minimum_is_1_3(pair, ca):
    quiet_loop_errors()
    material, (ccert, ckey) = pair
    tls12 = client_context(ccert, ckey, ca.cert_pem)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    # The same client is fine against a 1.2 server ...
    assert await echo_once(server_context(material, "1.2"), tls12, "vm-1") == PING
    # ... and refused by a 1.3-only one.
    with pytest.raises(HANDSHAKE_FAILED):
        await echo_once(server_context(material, "1.3"), tls12, "vm-1")


def test_contexts_refuse_unknown_minimum_versions(pair):
    material, _ = pair
    with pytest.raises(ValueError, match="1.2 or 1.3"):
        server_context(material, "1.1")


def test_server_contexts_issue_no_session_tickets(pair, ca):
    """No client of a pod VM resumes a session, and each TLS 1.3 ticket cost the VM CPU per handshake."""
    material, (ccert, ckey) = pair
    ours, theirs = socket.socketpair()

    def serve() -> None:
        with server_context(material).wrap_socket(theirs, server_side=True) as conn:
            conn.sendall(PING)

    server = threading.Thread(target=serve)
    server.start()
    with client_context(ccert, ckey, ca.cert_pem).wrap_socket(ours, server_hostname="vm-1") as conn:
        assert conn.recv(len(PING)) == PING  # a ticket would have arrived before the data
        assert conn.version() == "TLSv1.3" and not conn.session.has_ticket
    server.join()


def test_key_material_is_loaded_without_files(pair, monkeypatch, tmp_path):
    """``ssl`` loads a chain only from files: the PEM text goes through memfds, never a temporary file."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    material, (ccert, ckey) = pair
    server_context(material)
    client_context(ccert, ckey, material.client_ca_pem)
    assert list(tmp_path.iterdir()) == [], "no key file may be written"


def test_issued_certificates_carry_usage_constraints_and_key_ids(ca):
    cert_pem, _ = ca.issue("vm-9", server=True, dns_names=["vm-9"], ip_addresses=["192.0.2.9"])
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    ext = cert.extensions
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["vm-9"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.9"]
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert aki == ca_ski
    client_pem, _ = ca.issue("adaptor", server=False)
    client = x509.load_pem_x509_certificate(client_pem.encode())
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]


def test_server_material_repr_hides_the_key(pair):
    material, _ = pair
    assert "PRIVATE KEY" not in repr(material)
    assert material.key_pem.startswith("-----BEGIN PRIVATE KEY-----")


# ------------------------------------------------------------- persistence


def test_ca_is_persisted_private_and_reused_after_reload(tmp_path):
    directory = tmp_path / "state" / "tls"
    first = CertificateAuthority.load_or_create(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    again = CertificateAuthority.load_or_create(directory)
    assert again.cert_pem == first.cert_pem, "a restarted adaptor must keep its CA"
    # A certificate issued before the restart still verifies against the reloaded CA.
    cert_pem, _ = first.issue("vm-1", server=True, dns_names=["vm-1"])
    x509.load_pem_x509_certificate(cert_pem.encode()).verify_directly_issued_by(again.certificate)


def test_corrupt_ca_file_is_named_in_the_error(tmp_path):
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / "ca.pem").write_text("garbage")
    with pytest.raises(TlsError, match=r"ca\.pem: not a PEM certificate"):
        CertificateAuthority.load_or_create(tmp_path)


def test_mismatched_ca_key_is_named_in_the_error(tmp_path):
    CertificateAuthority.load_or_create(tmp_path / "a")
    CertificateAuthority.load_or_create(tmp_path / "b")
    os.replace(tmp_path / "b" / "ca.key", tmp_path / "a" / "ca.key")
    with pytest.raises(TlsError, match=r"ca\.key: does not match"):
        CertificateAuthority.load_or_create(tmp_path / "a")


def test_half_a_ca_is_an_error_not_a_silent_new_ca(tmp_path):
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(TlsError, match=r"ca\.key: missing"):
        CertificateAuthority.load_or_create(tmp_path)


# -------------------------------------------------------------- AdaptorTls


def test_disable_tls_gives_no_tls(tmp_path):
    assert AdaptorTls.from_settings(Settings(state_dir=tmp_path, disable_tls=True)) is None
    assert not (tmp_path / "tls").exists()


async def test_automatic_mode_end_to_end(tmp_path):
    settings = Settings(state_dir=tmp_path, tls_min_version="1.3")
    tls = AdaptorTls.from_settings(settings)
    assert "PRIVATE KEY" not in repr(tls)
    material = tls.mint_vm_material("podvm-web-1234abcd")
    got = await echo_once(server_context(material, "1.3"), tls.client_context(), "podvm-web-1234abcd")
    assert got == PING
    assert tls.client_context().minimum_version == ssl.TLSVersion.TLSv1_3
    key = tmp_path / "tls" / "client.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


async def test_automatic_mode_survives_a_restart(tmp_path):
    before = AdaptorTls.from_settings(Settings(state_dir=tmp_path))
    material = before.mint_vm_material("podvm-a")  # a VM created before the restart
    after = AdaptorTls.from_settings(Settings(state_dir=tmp_path))
    assert after.client_cert_pem == before.client_cert_pem
    assert await echo_once(server_context(material), after.client_context(), "podvm-a") == PING


def test_each_vm_gets_a_fresh_server_certificate(tmp_path):
    tls = AdaptorTls.from_settings(Settings(state_dir=tmp_path))
    a, b = tls.mint_vm_material("podvm-a"), tls.mint_vm_material("podvm-b")
    assert a.key_pem != b.key_pem and a.cert_pem != b.cert_pem
    san = x509.load_pem_x509_certificate(a.cert_pem.encode()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["podvm-a"]


def write_operator_files(directory: Path) -> tuple[Path, Path, Path, CertificateAuthority]:
    operator_ca = CertificateAuthority.create("operator CA")
    cert, key = operator_ca.issue("adaptor.operator", server=False)
    paths = directory / "ca.crt", directory / "tls.crt", directory / "tls.key"
    for path, text in zip(paths, (operator_ca.cert_pem, cert, key)):
        path.write_text(text)
    return *paths, operator_ca


async def test_operator_mode_end_to_end(tmp_path):
    cacert, cert, key, operator_ca = write_operator_files(tmp_path)
    settings = Settings(state_dir=tmp_path / "state", cacert_file=cacert, cert_file=cert, cert_key=key)
    tls = AdaptorTls.from_settings(settings)
    assert tls.client_cert_pem == cert.read_text(), "the adaptor presents the operator's cert"
    material = tls.mint_vm_material("podvm-op")
    assert material.client_ca_pem == operator_ca.cert_pem, "VMs trust the operator's CA"
    assert await echo_once(server_context(material), tls.client_context(), "podvm-op") == PING


async def test_operator_mode_vm_refuses_the_automatic_client_cert(tmp_path):
    quiet_loop_errors()
    cacert, cert, key, _ = write_operator_files(tmp_path)
    operator = AdaptorTls.from_settings(Settings(state_dir=tmp_path / "s", cacert_file=cacert,
                                                 cert_file=cert, cert_key=key))
    automatic = AdaptorTls.from_settings(Settings(state_dir=tmp_path / "s"))
    material = operator.mint_vm_material("podvm-op")
    with pytest.raises(HANDSHAKE_FAILED):
        await echo_once(server_context(material), automatic.client_context(), "podvm-op")


def test_operator_key_that_does_not_match_is_named(tmp_path):
    cacert, cert, key, operator_ca = write_operator_files(tmp_path)
    key.write_text(operator_ca.issue("other", server=False)[1])
    with pytest.raises(TlsError, match=r"tls\.key: does not match"):
        AdaptorTls.from_settings(Settings(state_dir=tmp_path / "s", cacert_file=cacert,
                                          cert_file=cert, cert_key=key))


def test_skip_verify_warns_once(tmp_path, caplog):
    tls = AdaptorTls.from_settings(Settings(state_dir=tmp_path, tls_skip_verify=True))
    with caplog.at_level(logging.WARNING, logger="cloudadaptor.tls"):
        tls.client_context()
        tls.client_context()
    warnings = [r for r in caplog.records if "TLS_SKIP_VERIFY" in r.getMessage()]
    assert len(warnings) == 1
    assert tls.client_context().verify_mode == ssl.CERT_NONE
