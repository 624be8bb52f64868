"""Certificates for the adaptor <-> pod VM link (mutual TLS on ``wire.AGENT_PORT``).

The adaptor keeps a small CA under ``<STATE_DIR>/tls/`` (persisted, so a
restarted adaptor can redial the VMs it already runs). For every pod VM it
mints a fresh server certificate (DNS SAN = the name the adaptor dials with);
the VM's forwarder receives it through user data as ``ServerTlsMaterial``.
The adaptor presents a client certificate: its own (automatic mode) or the
operator's ``CERT_FILE``/``CERT_KEY``, in which case the forwarders trust
``CACERT_FILE`` as the client CA (operator mode).

Private keys are written with mode 0600 in 0700 directories, never logged and
never shown by a repr. ``ssl`` loads key pairs only from files: they go to a
private temporary directory that is removed right after loading.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloudadaptor.files import write_atomic
from cloudadaptor.wire import DEFAULT_TLS_MIN_VERSION, TLS_VERSIONS

if TYPE_CHECKING:
    from cloudadaptor.config import Settings

log = logging.getLogger(__name__)

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
CLIENT_CERT_NAME = "client.pem"
CLIENT_KEY_NAME = "client.key"
CA_DAYS = 365.0  # CA_VALIDITY's default; rotated with overlap (tlsrotation)
CERT_DAYS = 30.0  # VM_CERT_VALIDITY's default
# Pod VMs boot with their own clock; accept a skew this large.
BACKDATE = datetime.timedelta(hours=1)

class TlsError(Exception):
    """TLS material is missing, unreadable or inconsistent; the message names the file."""


@dataclass(frozen=True)
class ServerTlsMaterial:
    """What a pod VM's forwarder needs: its server cert/key and the CA of allowed clients."""

    cert_pem: str
    key_pem: str = field(repr=False)
    client_ca_pem: str


# ------------------------------------------------------------------ file helpers


def _ensure_private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _load_cert(path: Path, data: bytes | None = None) -> x509.Certificate:
    data = _read(path) if data is None else data
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise TlsError(f"{path}: not a PEM certificate") from None


def _load_key(path: Path, data: bytes | None = None):
    data = _read(path) if data is None else data
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise TlsError(f"{path}: not an unencrypted PEM private key") from None


def _same_public_key(cert: x509.Certificate, key) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _key_pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _cert_pem(cert: x509.Certificate) -> str:
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
        return _cert_pem(self._cert)

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
        _ensure_private_dir(directory)
        cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
        if not cert_path.exists() and not key_path.exists():
            ca = cls.create(days=days)
            write_atomic(key_path, _key_pem(ca._key), 0o600)
            write_atomic(cert_path, ca.cert_pem, 0o644)
            log.info("created a new TLS CA in %s", directory)
            return ca
        for path in (cert_path, key_path):
            if not path.exists():
                raise TlsError(f"{path}: missing (the other half of the CA exists; "
                               f"remove both to create a new CA)")
        cert, key = _load_cert(cert_path), _load_key(key_path)
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
        return _cert_pem(cert), _key_pem(key)


# -------------------------------------------------------------------- contexts


def _min_version(version: str) -> ssl.TLSVersion:
    try:
        return TLS_VERSIONS[version]
    except KeyError:
        raise ValueError(f"TLS minimum version must be {' or '.join(TLS_VERSIONS)}, not {version!r}") from None


def _load_chain(context: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """``load_cert_chain`` from PEM text (``ssl`` loads a chain only from files) via two anonymous
    memory files (memfd): no other process can open them, the key reaches no disk, and there is
    no directory to make and remove per context (~0.4 ms of a pod VM's CPU)."""
    fds: list[int] = []
    try:
        for data in (cert_pem, key_pem):
            fds.append(os.memfd_create("cloudadaptor-tls", os.MFD_CLOEXEC))
            os.write(fds[-1], data.encode())
        context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


def server_context(material: ServerTlsMaterial, min_version: str = DEFAULT_TLS_MIN_VERSION) -> ssl.SSLContext:
    """A server context presenting ``material``'s cert; clients must present a cert
    signed by ``material.client_ca_pem``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _min_version(min_version)
    context.verify_mode = ssl.CERT_REQUIRED
    # No TLS 1.3 session tickets: no client of a pod VM resumes a session (the adaptor dials
    # each connection afresh), and OpenSSL's two tickets cost ~0.4 ms of the VM's CPU per handshake.
    context.num_tickets = 0
    context.load_verify_locations(cadata=material.client_ca_pem)
    _load_chain(context, material.cert_pem, material.key_pem)
    return context


def client_context(cert_pem: str, key_pem: str, server_ca_pem: str | None,
                   min_version: str = DEFAULT_TLS_MIN_VERSION, skip_verify: bool = False) -> ssl.SSLContext:
    """A client context presenting ``cert_pem``; verifies the server (name included)
    against ``server_ca_pem`` unless ``skip_verify``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = _min_version(min_version)
    if skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        if not server_ca_pem:
            raise ValueError("server_ca_pem is required unless skip_verify is set")
        context.load_verify_locations(cadata=server_ca_pem)
    _load_chain(context, cert_pem, key_pem)
    return context


# ------------------------------------------------------------------ AdaptorTls


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class AdaptorTls:
    """The adaptor's TLS state: its CA, its client identity, and the client CA VMs trust."""

    def __init__(
        self,
        ca: CertificateAuthority,
        client_cert_pem: str,
        client_key_pem: str,
        vm_client_ca_pem: str,
        *,
        min_version: str = DEFAULT_TLS_MIN_VERSION,
        skip_verify: bool = False,
        vm_cert_days: float = CERT_DAYS,
        trusted_ca_pem: str | None = None,
        refresh: Callable[[], AdaptorTls | None] | None = None,
    ):
        _min_version(min_version)
        self.ca = ca
        self.client_cert_pem = client_cert_pem
        self._client_key_pem = client_key_pem
        self.vm_client_ca_pem = vm_client_ca_pem
        self.min_version = min_version
        self.skip_verify = skip_verify
        self.vm_cert_days = vm_cert_days
        self.trusted_ca_pem = trusted_ca_pem or ca.cert_pem  # CAs whose VM certificates we accept
        self._refresh = refresh  # a newer state when the CA was rotated (tlsrotation), else None
        self._client_context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return (f"AdaptorTls(ca={self.ca!r}, min_version={self.min_version!r}, "
                f"skip_verify={self.skip_verify})")

    @classmethod
    def from_settings(cls, settings: Settings) -> AdaptorTls | None:
        """None when DISABLE_TLS; otherwise load or create the material (``tlsrotation.adaptor_tls``).

        Raises ``TlsError`` naming the file when persisted or operator material is bad.
        """
        from cloudadaptor.tlsrotation import adaptor_tls

        return adaptor_tls(settings)

    def mint_vm_material(self, server_name: str) -> ServerTlsMaterial:
        """A fresh server certificate for one pod VM (SAN = ``server_name``), valid ``vm_cert_days``;
        rotates the CA first when it is due."""
        self.refresh_if_due()
        ips = (server_name,) if _is_ip(server_name) else ()
        dns = () if ips else (server_name,)
        cert_pem, key_pem = self.ca.issue(server_name, server=True, dns_names=dns, ip_addresses=ips, days=self.vm_cert_days)
        return ServerTlsMaterial(cert_pem, key_pem, self.vm_client_ca_pem)

    def refresh_if_due(self) -> bool:
        """Rotate the CA (and replace the client certificate) when due (``tlsrotation``); True when it did.
        Called before each VM certificate is minted and by the renewal loop, so a long-running daemon rotates."""
        newer = self._refresh() if self._refresh else None
        if newer is None:
            return False
        self.__dict__.update(newer.__dict__)  # same object: the lifecycle keeps its reference
        return True

    @property
    def ca_key_id(self) -> str:
        """The signing CA's key identifier (hex): a VM certificate signed by another CA predates a rotation."""
        return key_id(self.ca.certificate)

    def client_context(self) -> ssl.SSLContext:
        """The context to dial pod VMs with (``server_hostname=server_name``); built once."""
        if self._client_context is None:  # TLS_SKIP_VERIFY was announced at start (tlsrotation.adaptor_tls)
            self._client_context = client_context(
                self.client_cert_pem, self._client_key_pem, self.trusted_ca_pem,
                self.min_version, skip_verify=self.skip_verify,
            )
        return self._client_context


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


def _load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, str, str]:
    """(certificate, cert PEM, key PEM) read from the two files; ``TlsError`` naming the
    file that is unreadable or not PEM, or the key when it does not match the certificate."""
    cert_data, key_data = _read(cert_path), _read(key_path)
    cert, key = _load_cert(cert_path, cert_data), _load_key(key_path, key_data)
    if not _same_public_key(cert, key):
        raise TlsError(f"{key_path}: does not match the certificate in {cert_path}")
    return cert, cert_data.decode(), key_data.decode()
