"""Short certificate lifetimes, CA rotation with overlap, and loud insecure modes (issue 11 item 9)."""

from __future__ import annotations

import datetime
import logging

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloudadaptor.config import ConfigError, Settings, load_settings
from cloudadaptor.tls import BACKDATE, AdaptorTls, ServerTlsMaterial, server_context
from cloudadaptor.tlscerts import CertificateAuthority
from cloudadaptor.tlsrotation import PREVIOUS_CERT_NAME, load_cas, rotation_due
from test_tls import PING, echo_once

def lifetime(cert_pem: str) -> datetime.timedelta:
    """How long the certificate was issued for (its start is backdated by ``BACKDATE`` for VM clocks)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return cert.not_valid_after_utc - (cert.not_valid_before_utc + BACKDATE)


def test_vm_certificates_live_days_not_years(tmp_path):
    tls = AdaptorTls.from_settings(Settings(state_dir=tmp_path))
    assert abs(lifetime(tls.mint_vm_material("podvm-a").cert_pem) - datetime.timedelta(days=30)) < datetime.timedelta(seconds=5)
    assert abs(lifetime(tls.ca.cert_pem) - datetime.timedelta(days=365)) < datetime.timedelta(seconds=5)
    short = AdaptorTls.from_settings(Settings(state_dir=tmp_path / "s", vm_cert_validity=2 * 86400.0))
    assert abs(lifetime(short.mint_vm_material("podvm-b").cert_pem) - datetime.timedelta(days=2)) < datetime.timedelta(seconds=5)


def test_config_keys_for_lifetimes_and_their_cross_check():
    env = {"CLOUD_PROVIDER": "local", "VM_CERT_VALIDITY": "72h", "CA_VALIDITY": "2400h"}
    settings = load_settings(env)
    assert (settings.vm_cert_validity, settings.ca_validity) == (72 * 3600.0, 2400 * 3600.0)
    with pytest.raises(ConfigError, match="VM_CERT_VALIDITY.*a third of CA_VALIDITY"):
        load_settings({**env, "VM_CERT_VALIDITY": "1000h"})
    with pytest.raises(ConfigError, match="VM_CERT_VALIDITY"):
        load_settings({**env, "VM_CERT_VALIDITY": "0"})


def age_ca(directory, days_left: float, total_days: float = 30.0) -> CertificateAuthority:
    """Replace the CA in ``directory`` with one that has ``days_left`` of ``total_days`` left."""
    from cloudadaptor.files import write_atomic
    from cloudadaptor.tlscerts import key_to_pem

    old = CertificateAuthority.create(days=days_left)
    write_atomic(directory / "ca.key", key_to_pem(old._key), 0o600)
    write_atomic(directory / "ca.pem", old.cert_pem, 0o644)
    assert rotation_due(old, total_days) == (days_left < total_days / 3)
    return old


async def test_ca_is_rotated_before_expiry_and_the_old_one_stays_trusted(tmp_path):
    settings = Settings(state_dir=tmp_path, ca_validity=30 * 86400.0, vm_cert_validity=86400.0 * 5)
    (tmp_path / "tls").mkdir(mode=0o700)
    kept = age_ca(tmp_path / "tls", days_left=20)
    assert AdaptorTls.from_settings(settings).ca.cert_pem == kept.cert_pem, "not due yet: kept"

    old = age_ca(tmp_path / "tls", days_left=5)  # time passes: less than a third is left
    cert, key = old.issue("podvm-old", server=True, dns_names=["podvm-old"], days=4)
    vm_made_before = ServerTlsMaterial(cert, key, old.cert_pem)  # trusts only the old CA for clients
    rotated = AdaptorTls.from_settings(settings)
    assert (tmp_path / "tls" / PREVIOUS_CERT_NAME).exists()
    assert rotated.ca.cert_pem != old.cert_pem, "a new CA signs"
    vm_made_after = rotated.mint_vm_material("podvm-new")
    assert old.cert_pem in vm_made_after.client_ca_pem and rotated.ca.cert_pem in vm_made_after.client_ca_pem
    context = rotated.client_context()
    assert await echo_once(server_context(vm_made_before), context, "podvm-old") == PING
    assert await echo_once(server_context(vm_made_after), context, "podvm-new") == PING


async def test_a_running_daemon_rotates_when_minting(tmp_path):
    settings = Settings(state_dir=tmp_path, ca_validity=30 * 86400.0, vm_cert_validity=86400.0)
    tls = AdaptorTls.from_settings(settings)
    tls.ca = aged = age_ca(tmp_path / "tls", days_left=2)  # months later, in the same process
    material = tls.mint_vm_material("podvm-x")
    assert tls.ca.cert_pem != aged.cert_pem and not rotation_due(tls.ca, 30)
    assert aged.cert_pem in material.client_ca_pem, "the previous CA is still trusted"
    assert await echo_once(server_context(material), tls.client_context(), "podvm-x") == PING


def test_expired_previous_ca_is_forgotten(tmp_path):
    directory = tmp_path / "tls"
    directory.mkdir(mode=0o700)
    age_ca(directory, days_left=1)
    load_cas(directory, 30)
    assert (directory / PREVIOUS_CERT_NAME).exists()
    expired = CertificateAuthority.create(days=-0.01)
    (directory / PREVIOUS_CERT_NAME).write_text(expired.cert_pem)
    assert load_cas(directory, 30).previous is None
    assert not (directory / PREVIOUS_CERT_NAME).exists()


@pytest.mark.parametrize("key", ["DISABLE_TLS", "TLS_SKIP_VERIFY"])
def test_insecure_modes_are_refused_with_public_ip(key):
    with pytest.raises(ConfigError) as err:
        load_settings({"CLOUD_PROVIDER": "local", "USE_PUBLIC_IP": "true", key: "true"})
    [line] = [str(p) for p in err.value.problems]
    assert line.startswith(f"{key}=") and "USE_PUBLIC_IP" in line


@pytest.mark.parametrize("field, key", [("disable_tls", "DISABLE_TLS"), ("tls_skip_verify", "TLS_SKIP_VERIFY")])
def test_insecure_modes_warn_loudly_at_start(tmp_path, caplog, field, key):
    with caplog.at_level(logging.WARNING, logger="cloudadaptor.tls"):
        AdaptorTls.from_settings(Settings(state_dir=tmp_path, **{field: True}))
    [warning] = [r for r in caplog.records if key in r.getMessage() and r.levelno == logging.WARNING]
    assert "development only" in warning.getMessage()


def test_a_running_daemon_replaces_its_client_certificate_when_the_previous_ca_nears_its_end(tmp_path):
    from cryptography.hazmat.primitives import hashes

    from cloudadaptor.files import write_atomic
    from cloudadaptor.tlscerts import _builder

    settings = Settings(state_dir=tmp_path, ca_validity=30 * 86400.0, vm_cert_validity=86400.0)
    (tmp_path / "tls").mkdir(mode=0o700)
    old = age_ca(tmp_path / "tls", days_left=5)
    tls = AdaptorTls.from_settings(settings)  # rotated at start: the client certificate is still the old CA's
    client = x509.load_pem_x509_certificate(tls.client_cert_pem.encode())
    client.verify_directly_issued_by(old.certificate)
    assert not tls.refresh_if_due(), "nothing due yet"
    # Days later: the previous CA (and the client certificate it signed) have half a day left.
    ending = _builder(old.certificate.subject, old.certificate.subject, old._key, 0.5, ca=True).sign(old._key, hashes.SHA256())
    write_atomic(tmp_path / "tls" / PREVIOUS_CERT_NAME, ending.public_bytes(serialization.Encoding.PEM).decode(), 0o644)
    tls.client_cert_pem, _ = CertificateAuthority(ending, old._key).issue("cloud-api-adaptor node", server=False, days=0.5)
    assert tls.refresh_if_due()
    x509.load_pem_x509_certificate(tls.client_cert_pem.encode()).verify_directly_issued_by(tls.ca.certificate)
