"""The pod VM's half of certificate renewal: the forwarder's server certificate, renewable while it serves.

The adaptor renews a running VM's server certificate before it expires (and
after it rotated its CA) by calling ``wire.CERT_SERVICE/CERT_RENEW_METHOD`` on
the forwarder's port. The forwarder answers that call itself (the relay's
``local`` methods: it never reaches the kata-agent), so only a client that
passed the mutual-TLS handshake — the adaptor's certificate — can renew.

A renewal carries apf.json's ``tls`` object: a new server certificate and key,
and the CA bundle of allowed clients (so a rotated CA's new client
certificates are trusted). It is refused (INVALID_ARGUMENT), keeping the old
material, unless the certificate is a PEM certificate valid now, names exactly
what the current one names (the adaptor dials with ``server_hostname`` = VM
name), the key matches it and the bundle loads. An accepted renewal is written
to apf.json (0600, atomically: a restarted forwarder serves it) and then the
forwarder's SSL context is swapped: new connections get the new certificate,
connections already open keep theirs.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import ssl
from pathlib import Path

from cryptography import x509

from cloudadaptor.files import write_atomic
from cloudadaptor.podconfig import ForwarderConfig
from cloudadaptor.tls import ServerTlsMaterial, server_context
from cloudadaptor.ttrpc.errors import Code, TtrpcError
from cloudadaptor.ttrpc.relay import LocalMethods
from cloudadaptor.wire import CERT_CURRENT_METHOD, CERT_RENEW_METHOD, CERT_SERVICE

log = logging.getLogger("cloudadaptor.podvm.certrenewal")

TLS_FIELDS = ("cert_pem", "key_pem", "client_ca_pem")


def describe(cert: x509.Certificate) -> bytes:
    """What both methods answer: the served certificate's serial (hex) and expiry (ISO 8601), as JSON."""
    return json.dumps({"serial": format(cert.serial_number, "x"),
                       "not_after": cert.not_valid_after_utc.isoformat()}).encode()


def names_of(cert: x509.Certificate) -> set[str]:
    """The DNS and IP subject alternative names: what a client may dial the certificate as."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(sans.get_values_for_type(x509.DNSName)) | {str(a) for a in sans.get_values_for_type(x509.IPAddress)}


class ServerCertificate:
    """The forwarder's TLS material and SSL context; ``context`` is what a new connection gets.

    ``config_path`` is the apf.json a renewal is written to (None: kept in memory only).
    """

    def __init__(self, material: ServerTlsMaterial, min_version: str, config_path: Path | None = None) -> None:
        self.min_version = min_version
        self.config_path = config_path
        self.context = server_context(material, min_version)
        self._cert_pem = material.cert_pem
        self._certificate: x509.Certificate | None = None

    @property
    def certificate(self) -> x509.Certificate:
        """The served certificate, parsed on first use (a CertCurrent or CertRenew call), not at
        every VM's start (OpenSSL has checked the PEM text already: the context loaded it)."""
        if self._certificate is None:
            self._certificate = x509.load_pem_x509_certificate(self._cert_pem.encode())
        return self._certificate

    @classmethod
    def from_config(cls, config: ForwarderConfig, config_path: Path | None) -> ServerCertificate | None:
        """None when the config has no TLS (plain TCP, nothing to renew). Raises ``ssl.SSLError``/``ValueError``."""
        return None if config.tls is None else cls(config.tls, config.tls_min_version, config_path)

    def methods(self) -> LocalMethods:
        """The relay's local methods."""
        return {(CERT_SERVICE, CERT_CURRENT_METHOD): self.current, (CERT_SERVICE, CERT_RENEW_METHOD): self.renew}

    def current(self, payload: bytes) -> bytes:
        return describe(self.certificate)

    def renew(self, payload: bytes) -> bytes:
        """Validate, persist, then swap; raises ``TtrpcError`` (nothing changed) when refused."""
        material = _parse(payload)
        cert = self._check(material)
        try:
            context = server_context(material, self.min_version)
        except (ssl.SSLError, ValueError) as exc:  # the key does not match, or the bundle does not load
            raise _refused(f"the TLS material does not load: {_reason(exc)}") from None
        self._persist(material)
        self.context, self._certificate = context, cert  # new connections only; open ones keep their session
        log.info("server certificate renewed: serial %x, valid until %s", cert.serial_number,
                 cert.not_valid_after_utc.isoformat())
        return describe(cert)

    def _check(self, material: ServerTlsMaterial) -> x509.Certificate:
        try:
            cert = x509.load_pem_x509_certificate(material.cert_pem.encode())
        except ValueError:
            raise _refused("cert_pem is not a PEM certificate") from None
        now = datetime.datetime.now(datetime.timezone.utc)
        if cert.not_valid_after_utc <= now:
            raise _refused(f"the certificate expired at {cert.not_valid_after_utc.isoformat()}")
        if cert.not_valid_before_utc > now:
            raise _refused(f"the certificate is not valid before {cert.not_valid_before_utc.isoformat()}")
        want, got = names_of(self.certificate), names_of(cert)
        if got != want:
            raise _refused(f"the certificate names {sorted(got)}, this VM is {sorted(want)}")
        return cert

    def _persist(self, material: ServerTlsMaterial) -> None:
        """Write the material into apf.json (0600) so a restarted forwarder serves it."""
        if self.config_path is None:
            return
        try:
            config = ForwarderConfig.from_json(self.config_path.read_bytes())
            write_atomic(self.config_path, dataclasses.replace(config, tls=material).to_json(), 0o600)
        except (OSError, ValueError) as exc:
            log.error("renewal refused: cannot write %s: %s", self.config_path, exc)
            raise TtrpcError(Code.INTERNAL, f"renewal refused: cannot write {self.config_path}") from None


def _parse(payload: bytes) -> ServerTlsMaterial:
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise _refused("the payload is not JSON") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) and doc[k] for k in TLS_FIELDS):
        raise _refused(f"expected a JSON object with the strings {', '.join(TLS_FIELDS)}")
    return ServerTlsMaterial(doc["cert_pem"], doc["key_pem"], doc["client_ca_pem"])


def _reason(exc: Exception) -> str:
    """The ssl error's reason (e.g. KEY_VALUES_MISMATCH), never file contents."""
    return str(getattr(exc, "reason", None) or type(exc).__name__)


def _refused(why: str) -> TtrpcError:
    log.warning("certificate renewal refused, the current certificate stays: %s", why)
    return TtrpcError(Code.INVALID_ARGUMENT, f"renewal refused: {why}")
