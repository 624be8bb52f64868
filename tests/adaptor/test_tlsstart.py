"""The daemon's TLS start-up in a child (``python -m cloudadaptor.adaptor.tlsstart``): same material,
same errors, no key in the pipe, a fallback when the child cannot run, rotation from reported dates."""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys

import pytest
from cryptography import x509

from cloudadaptor.adaptor import tlsstart
from cloudadaptor.adaptor.tlsstart import start_tls
from cloudadaptor.config import Settings
from cloudadaptor.tls import AdaptorTls, TlsError, server_context
from cloudadaptor.tlscerts import CertificateAuthority
from test_tls import PING, echo_once, write_operator_files


async def test_the_child_checks_what_the_daemon_would_and_the_daemon_signs_only_when_minting(tmp_path, caplog):
    settings = Settings(state_dir=tmp_path, node_name="node-a")
    with caplog.at_level(logging.INFO, logger="cloudadaptor.tls"):
        tls = await start_tls(settings)
    assert tls is not None and tls._ca is None, "the CA (and its key) stays on disk until a certificate is signed"
    assert any("created a new TLS CA" in r.getMessage() for r in caplog.records), "the child's log lines reach the daemon"
    in_process = AdaptorTls.from_settings(settings)  # what the daemon did before: the same CA and client pair
    assert tls.ca_key_id == in_process.ca_key_id and tls.ca_not_after == in_process.ca_not_after
    assert tls.client_cert_pem == in_process.client_cert_pem == (tmp_path / "tls" / "client.pem").read_text()
    assert tls.client_not_after == in_process.client_not_after
    assert tls.trusted_ca_pem == tls.vm_client_ca_pem == in_process.ca.cert_pem
    assert not tls.refresh_if_due() and tls._ca is None, "the renewal check reads dates, not the CA"
    material = tls.mint_vm_material("podvm-lazy")
    assert tls._ca is not None and tls._ca.cert_pem == in_process.ca.cert_pem
    assert await echo_once(server_context(material), tls.client_context(), "podvm-lazy") == PING


async def test_operator_mode_through_the_child(tmp_path):
    cacert, cert, key, operator_ca = write_operator_files(tmp_path)  # as a Secret would mount them
    settings = Settings(state_dir=tmp_path / "s", cacert_file=cacert, cert_file=cert, cert_key=key)
    tls = await start_tls(settings)
    assert tls is not None and tls.client_cert_pem == cert.read_text() and tls.vm_client_ca_pem == cacert.read_text()
    assert tls.client_not_after == x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    material = tls.mint_vm_material("podvm-op")
    assert await echo_once(server_context(material), tls.client_context(), "podvm-op") == PING


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "ca.pem").write_text("garbage"), r"tls/ca\.pem: not a PEM certificate"),
    (lambda d: (d / "ca.key").unlink(), r"tls/ca\.key: missing"),
    (lambda d: (d / "client.key").write_text("garbage"), None),  # a bad own client pair is replaced, as before
])
async def test_bad_files_give_the_same_error_as_before(tmp_path, damage, expected):
    settings = Settings(state_dir=tmp_path)
    before = AdaptorTls.from_settings(settings)
    damage(tmp_path / "tls")
    if expected is None:
        tls = await start_tls(settings)
        assert tls is not None and tls.client_cert_pem != before.client_cert_pem, "a new client pair"
        return
    with pytest.raises(TlsError, match=expected) as child_error:
        await start_tls(settings)
    with pytest.raises(TlsError) as in_process_error:
        AdaptorTls.from_settings(settings)
    assert str(child_error.value) == str(in_process_error.value)


def test_no_key_travels_through_the_pipe(tmp_path):
    params = {"state_dir": str(tmp_path), "node_name": "n", "ca_validity": 365 * 86400.0,
              "vm_cert_validity": 30 * 86400.0, "tls_min_version": "1.2", "tls_skip_verify": False,
              "cacert_file": None, "cert_file": None, "cert_key": None}
    child = subprocess.run([sys.executable, "-m", "cloudadaptor.adaptor.tlsstart"], input=json.dumps(params),
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    assert report["client_key"] == str(tmp_path / "tls" / "client.key")
    assert "PRIVATE KEY" not in child.stdout + child.stderr, "keys stay in their files"


@pytest.mark.parametrize("child, why", [
    (None, "no-such-python"),  # no interpreter to run
    ("#!/bin/sh\necho 'child crashed here' >&2\nexit 3\n", "exit status 3: child crashed here"),
    ("#!/bin/sh\ncat >/dev/null\necho 'not json'\n", "not a JSON object"),
    ("#!/bin/sh\ncat >/dev/null\necho '{\"log\": []}'\n", "an incomplete report: KeyError"),
], ids=["missing", "crash", "garbage", "incomplete"])
async def test_a_child_that_cannot_do_the_work_leaves_it_to_the_daemon(tmp_path, monkeypatch, caplog, child, why):
    python = tmp_path / "no-such-python"
    if child is not None:
        python.write_text(child)
        python.chmod(0o755)
    monkeypatch.setattr(tlsstart.sys, "executable", str(python))
    with caplog.at_level(logging.WARNING, logger="cloudadaptor.adaptor.tlsstart"):
        tls = await start_tls(Settings(state_dir=tmp_path / "state"))
    [warning] = [r.getMessage() for r in caplog.records if r.name == "cloudadaptor.adaptor.tlsstart"]
    assert why in warning and "in the daemon instead" in warning, warning
    assert tls is not None and tls._ca is not None, "loaded in-process"
    assert (tmp_path / "state" / "tls" / "ca.pem").exists()


async def test_disable_tls_runs_no_child(tmp_path, monkeypatch):
    monkeypatch.setattr(tlsstart.sys, "executable", str(tmp_path / "no-such-python"))
    assert await start_tls(Settings(state_dir=tmp_path, disable_tls=True)) is None
    assert not (tmp_path / "tls").exists()


async def test_a_rotation_falls_due_by_the_reported_dates(tmp_path, monkeypatch):
    from cloudadaptor import tls as tls_module
    from cloudadaptor import tlsrotation

    settings = Settings(state_dir=tmp_path, ca_validity=30 * 86400.0, vm_cert_validity=86400.0)
    tls = await start_tls(settings)
    assert tls is not None and not tls.refresh_if_due()
    old_id, old_pem = tls.ca_key_id, tls.trusted_ca_pem
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=25)  # 5 of 30 days left
    for module in (tls_module, tlsrotation):
        monkeypatch.setattr(module, "_now", lambda: later)
    assert tls.refresh_if_due(), "due by the CA's reported expiry"
    assert tls.ca_key_id != old_id and (tmp_path / "tls" / "ca-previous.pem").read_text() == old_pem
    monkeypatch.undo()  # back to today: the new CA (made with today's clock) is not due
    material = tls.mint_vm_material("podvm-after")
    cert = x509.load_pem_x509_certificate(material.cert_pem.encode())
    cert.verify_directly_issued_by(tls.ca.certificate)
    assert old_pem in material.client_ca_pem, "VMs made after the rotation still trust the old CA's client certificate"
    assert isinstance(tls.ca, CertificateAuthority)
