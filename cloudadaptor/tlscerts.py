"""Certificate making for the adaptor <-> pod VM link: the CA, its certificates, PEM loading (``cryptography``).

Split from ``tls`` (contexts and the adaptor's TLS state) because importing
``cryptography`` costs the daemon about 11 MiB of resident memory (issue 16:
idle RSS): an idle daemon never imports this module. It is loaded by the
start-up child (``adaptor/tlsstart.py``), by the first VM certificate minted,
and by a CA rotation (``tlsrotation``).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloudadaptor.files import write_atomic
from cloudadaptor.tls import (
    BACKDATE, CA_CERT_NAME, CA_DAYS, CA_KEY_NAME, CERT_DAYS, TlsError, ensure_private_dir, read_material,
)

log = logging.getLogger("cloudadaptor.tls")  # one logger for the whole TLS story


def load_cert(path: Path, data: bytes | None = None) -> x509.Certificate:
    data = read_material(path) if data is None else data
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise TlsError(f"{path}: not a PEM certificate") from None


def load_key(path: Path, data: bytes | None = None):
    data = read_material(path) if data is None else data
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise TlsError(f"{path}: not an unencrypted PEM private key") from None


def _same_public_key(cert: x509.Certificate, key) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def key_to_pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def cert_to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# ------------------------------------------------------------------------- CA


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: float, *,
             ca: bool, not_after: datetime.datetime | None = None) -> x509.CertificateBuilder:
    """What every certificate we sign shares: a random serial, validity backdated by
    ``BACKDATE`` (pod VM clocks drift) for ``days`` but never past ``not_after``,
    critical basic constraints and key usage (certificate signing only for a CA)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=days)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(until if not_after is None else min(until, not_after))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=ca, crl_sign=ca,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )


class CertificateAuthority:
    """A persisted ECDSA P-256 CA that issues server and client certificates."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        self._cert = cert
        self._key = key

    def __repr__(self) -> str:
        return f"CertificateAuthority(subject={self._cert.subject.rfc4514_string()!r})"

    @property
    def cert_pem(self) -> str:
        return cert_to_pem(self._cert)

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @classmethod
    def create(cls, common_name: str = "cloud-api-adaptor CA", days: float = CA_DAYS) -> CertificateAuthority:
        """A new CA held in memory only."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            _builder(name, name, key, days, ca=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load_or_create(cls, directory: Path, days: float = CA_DAYS) -> CertificateAuthority:
        """Load ``ca.pem``/``ca.key`` from ``directory``, or create and persist them.

        The directory is made 0700 and the key file 0600. Restart-safe: an
        existing CA is reused. Raises ``TlsError`` naming the file when one of
        the two is missing, corrupt, not a CA, or does not match the other.
        """
        directory = Path(directory)
        ensure_private_dir(directory)
        cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
        if not cert_path.exists() and not key_path.exists():
            ca = cls.create(days=days)
            write_atomic(key_path, key_to_pem(ca._key), 0o600)
            write_atomic(cert_path, ca.cert_pem, 0o644)
            log.info("created a new TLS CA in %s", directory)
            return ca
        for path in (cert_path, key_path):
            if not path.exists():
                raise TlsError(f"{path}: missing (the other half of the CA exists; "
                               f"remove both to create a new CA)")
        return cls.load(directory)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Load ``ca.pem``/``ca.key`` from ``directory``; ``TlsError`` naming the file when one is
        missing, corrupt, not a CA, or does not match the other. Fixes a key file readable by others."""
        cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
        cert, key = load_cert(cert_path), load_key(key_path)
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise TlsError(f"{key_path}: unsupported key type (expected ECDSA or RSA)")
        if not _same_public_key(cert, key):
            raise TlsError(f"{key_path}: does not match the certificate in {cert_path}")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise TlsError(f"{cert_path}: not a CA certificate")
        if key_path.stat().st_mode & 0o077:
            os.chmod(key_path, 0o600)
        return cls(cert, key)

    def issue(
        self,
        common_name: str,
        *,
        server: bool,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        days: float = CERT_DAYS,
    ) -> tuple[str, str]:
        """A new key pair and certificate signed by this CA, as (cert_pem, key_pem).

        ``server`` selects the extended key usage: serverAuth or clientAuth.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            _builder(name, self._cert.subject, key, days, ca=False, not_after=self._cert.not_valid_after_utc)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return cert_to_pem(cert), key_to_pem(key)



def key_id(cert: x509.Certificate, *, issuer: bool = False) -> str:
    """Hex of the certificate's subject key identifier, or with ``issuer`` of its authority key
    identifier (the CA that signed it); "" when absent."""
    try:
        if issuer:
            aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
            return aki.hex() if aki else ""
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    except x509.ExtensionNotFound:
        return ""


def load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, str, str]:
    """(certificate, cert PEM, key PEM) read from the two files; ``TlsError`` naming the
    file that is unreadable or not PEM, or the key when it does not match the certificate."""
    cert_data, key_data = read_material(cert_path), read_material(key_path)
    cert, key = load_cert(cert_path, cert_data), load_key(key_path, key_data)
    if not _same_public_key(cert, key):
        raise TlsError(f"{key_path}: does not match the certificate in {cert_path}")
    return cert, cert_data.decode(), key_data.decode()
