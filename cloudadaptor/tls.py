"""Certificates for the adaptor <-> pod VM link (mutual TLS on ``wire.AGENT_PORT``).

The adaptor keeps a small CA under ``<STATE_DIR>/tls/`` (persisted, so a
restarted adaptor can redial the VMs it already runs). For every pod VM it
mints a fresh server certificate (DNS SAN = the name the adaptor dials with);
the VM's forwarder receives it through user data as ``ServerTlsMaterial``.
The adaptor presents a client certificate: its own (automatic mode) or the
operator's ``CERT_FILE``/``CERT_KEY``, in which case the forwarders trust
``CACERT_FILE`` as the client CA (operator mode).

Private keys are written with mode 0600 in 0700 directories, never logged and
never shown by a repr. ``ssl`` loads key pairs only from files: they go to two
anonymous memory files (memfd) closed right after loading, so a key never reaches
a disk. Making certificates needs ``cryptography``, which an idle daemon never
loads: that part is ``tlscerts``.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cloudadaptor.wire import DEFAULT_TLS_MIN_VERSION, TLS_VERSIONS

if TYPE_CHECKING:
    from cloudadaptor.config import Settings
    from cloudadaptor.tlscerts import CertificateAuthority

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


def ensure_private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def read_material(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{path}: cannot read: {exc.strerror or exc}") from None


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

DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class CaFacts:
    """The signing CA as the start-up child checked it (``adaptor/tlsstart.py``): enough to verify VMs,
    renew and decide on a rotation. Its key stays in ``directory`` until a certificate must be signed."""

    directory: Path
    cert_pem: str
    key_id: str
    not_after: datetime.datetime


class AdaptorTls:
    """The adaptor's TLS state: its CA, its client identity, and the client CA VMs trust.

    ``ca`` is the loaded CA, or the ``CaFacts`` a start-up child reported: then the CA
    (and ``cryptography``, about 11 MiB, issue 16) is loaded by the first certificate
    minted, and an idle daemon never loads it.
    """

    def __init__(
        self,
        ca: CertificateAuthority | CaFacts,
        client_cert_pem: str,
        client_key_pem: str,
        vm_client_ca_pem: str,
        *,
        min_version: str = DEFAULT_TLS_MIN_VERSION,
        skip_verify: bool = False,
        vm_cert_days: float = CERT_DAYS,
        trusted_ca_pem: str | None = None,
        client_not_after: datetime.datetime | None = None,
        refresh: Callable[[AdaptorTls], AdaptorTls | None] | None = None,
    ):
        _min_version(min_version)
        self._ca, self._facts = (None, ca) if isinstance(ca, CaFacts) else (ca, None)
        self.client_cert_pem = client_cert_pem
        self._client_key_pem = client_key_pem
        self._client_not_after = client_not_after  # None: read from client_cert_pem when asked
        self.vm_client_ca_pem = vm_client_ca_pem
        self.min_version = min_version
        self.skip_verify = skip_verify
        self.vm_cert_days = vm_cert_days
        # CAs whose VM certificates we accept
        self.trusted_ca_pem = trusted_ca_pem or ca.cert_pem
        self._refresh = refresh  # a newer state when the CA is due to rotate (``refresher``), else None
        self._client_context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return (f"AdaptorTls(ca_key_id={self.ca_key_id!r}, min_version={self.min_version!r}, "
                f"skip_verify={self.skip_verify})")

    @classmethod
    def from_settings(cls, settings: Settings) -> AdaptorTls | None:
        """None when DISABLE_TLS; otherwise load or create the material in this process
        (``tlsrotation.adaptor_tls``; the daemon has a child do it: ``adaptor/tlsstart.py``).

        Raises ``TlsError`` naming the file when persisted or operator material is bad.
        """
        from cloudadaptor.tlsrotation import adaptor_tls

        return adaptor_tls(settings)

    @property
    def ca(self) -> CertificateAuthority:
        """The signing CA, loaded from its directory the first time when it was reported
        (``TlsError`` naming the file when it is unreadable or no longer the reported CA)."""
        if self._ca is None:
            self._ca = _load_reported(self._reported())
        return self._ca

    @ca.setter
    def ca(self, ca: CertificateAuthority) -> None:
        self._ca, self._facts = ca, None

    def _reported(self) -> CaFacts:
        assert self._facts is not None, "an AdaptorTls holds a CA or the facts reported about it"
        return self._facts

    @property
    def ca_key_id(self) -> str:
        """The signing CA's key identifier (hex): a VM certificate signed by another CA predates a rotation."""
        if self._ca is None:
            return self._reported().key_id
        from cloudadaptor.tlscerts import key_id

        return key_id(self._ca.certificate)

    @property
    def ca_not_after(self) -> datetime.datetime:
        return self._reported().not_after if self._ca is None else self._ca.certificate.not_valid_after_utc

    @property
    def client_not_after(self) -> datetime.datetime:
        """When the client certificate ends: as reported at start, else read from ``client_cert_pem``."""
        if self._client_not_after is not None:
            return self._client_not_after
        from cloudadaptor.tlscerts import load_cert

        return load_cert(Path("client certificate"), self.client_cert_pem.encode()).not_valid_after_utc

    def mint_vm_material(self, server_name: str) -> ServerTlsMaterial:
        """A fresh server certificate for one pod VM (SAN = ``server_name``), valid ``vm_cert_days``;
        rotates the CA first when it is due."""
        self.refresh_if_due()
        ips = (server_name,) if _is_ip(server_name) else ()
        dns = () if ips else (server_name,)
        cert_pem, key_pem = self.ca.issue(server_name, server=True, dns_names=dns, ip_addresses=ips, days=self.vm_cert_days)
        return ServerTlsMaterial(cert_pem, key_pem, self.vm_client_ca_pem)

    def refresh_if_due(self) -> bool:
        """Rotate the CA (and replace the client certificate) when due (``refresher``); True when it did.
        Called before each VM certificate is minted and by the renewal loop, so a long-running daemon rotates."""
        newer = self._refresh(self) if self._refresh else None
        if newer is None:
            return False
        self.__dict__.update(newer.__dict__)  # same object: the lifecycle keeps its reference
        return True

    def client_context(self) -> ssl.SSLContext:
        """The context to dial pod VMs with (``server_hostname=server_name``); built once."""
        if self._client_context is None:  # TLS_SKIP_VERIFY was announced at start (announce_insecure_modes)
            self._client_context = client_context(
                self.client_cert_pem, self._client_key_pem, self.trusted_ca_pem,
                self.min_version, skip_verify=self.skip_verify,
            )
        return self._client_context


def _load_reported(facts: CaFacts) -> CertificateAuthority:
    from cloudadaptor.tlscerts import CertificateAuthority, key_id

    ca = CertificateAuthority.load(facts.directory)
    if key_id(ca.certificate) != facts.key_id:
        raise TlsError(f"{facts.directory / CA_CERT_NAME}: not the CA the adaptor started with "
                       f"(key id {key_id(ca.certificate)}, expected {facts.key_id}); restart the adaptor")
    return ca


def refresher(settings: Settings) -> Callable[[AdaptorTls], AdaptorTls | None]:
    """``AdaptorTls``'s ``refresh`` for ``settings``: the state rebuilt (``tlsrotation.build``,
    which rotates the CA) when the CA has less than a third of ``CA_VALIDITY`` left, or the
    client certificate ends within a day (one signed by the previous CA ends with it).
    The check reads dates only; the rebuild imports ``cryptography``."""
    third = datetime.timedelta(seconds=settings.ca_validity) / 3

    def refresh(tls: AdaptorTls) -> AdaptorTls | None:
        now = _now()
        if tls.ca_not_after - now >= third and tls.client_not_after > now + DAY:
            return None
        from cloudadaptor.tlsrotation import build

        return build(settings)

    return refresh


def announce_insecure_modes(settings: Settings) -> bool:
    """Warn loudly about DISABLE_TLS and TLS_SKIP_VERIFY (once, at start); False when TLS is disabled."""
    if settings.disable_tls:
        log.warning("DISABLE_TLS is set: the adaptor talks to pod VMs in plain TCP, and anyone on the VM network "
                    "can reach their kata-agent. Use it for development only.")
        return False
    if settings.tls_skip_verify:
        log.warning("TLS_SKIP_VERIFY is set: pod VM certificates are not verified, so anyone on the VM network "
                    "can impersonate a pod VM. Use it for development only.")
    return True
