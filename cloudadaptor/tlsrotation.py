"""The adaptor's CA over time: short lifetimes, rotation with overlap (docs/ARCHITECTURE.md, "TLS").

Pod VM server certificates live ``VM_CERT_VALIDITY`` (30 days by default) and
the CA ``CA_VALIDITY`` (365 days). When less than a third of the CA's lifetime
is left, the CA is *rotated*: the current pair becomes ``ca-previous.pem``/
``ca-previous.key`` and a new CA signs from then on. The previous CA stays
trusted until it expires:

- the adaptor verifies VM certificates against both (VMs made before the
  rotation keep working; ``VM_CERT_VALIDITY`` <= a third of ``CA_VALIDITY``, a
  cross check in ``config_security``, so their certificates expire first);
- in automatic mode the adaptor's client certificate is signed by the previous
  CA while it has more than a day left (VMs made before the rotation trust only
  that one), and VMs made after the rotation trust both.

Rotation is checked at start, before each VM certificate is minted and by the
renewal loop (``adaptor/certrenewal.py``), so a long-running daemon rotates
too, and replaces its client certificate once the previous CA has less than a
day left. Running VMs get the new CA in their trust bundle (and a server
certificate of the new CA) from that loop right after a rotation.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature

from cloudadaptor.files import write_atomic
from cloudadaptor.tls import (
    CA_CERT_NAME, CA_KEY_NAME, CLIENT_CERT_NAME, CLIENT_KEY_NAME, DAY, AdaptorTls, TlsError, _now, read_material,
    announce_insecure_modes, refresher,
)
from cloudadaptor.tlscerts import CertificateAuthority, key_to_pem, load_cert, load_key, load_pair

if TYPE_CHECKING:
    from cloudadaptor.config import Settings

log = logging.getLogger("cloudadaptor.tls")

PREVIOUS_CERT_NAME = "ca-previous.pem"
PREVIOUS_KEY_NAME = "ca-previous.key"


@dataclass(frozen=True)
class CaPair:
    """The CA that signs now and, during the overlap, the one it replaced."""

    current: CertificateAuthority
    previous: CertificateAuthority | None

    @property
    def trust_pem(self) -> str:
        """Both CAs' certificates: what VM certificates are verified against."""
        return self.current.cert_pem + (self.previous.cert_pem if self.previous else "")

    @property
    def client_issuer(self) -> CertificateAuthority:
        """The CA every live VM trusts for client certificates: the previous one while it lasts."""
        if self.previous is not None and self.previous.certificate.not_valid_after_utc > _now() + DAY:
            return self.previous
        return self.current


def rotation_due(ca: CertificateAuthority, ca_days: float) -> bool:
    return ca.certificate.not_valid_after_utc - _now() < datetime.timedelta(days=ca_days) / 3


def load_cas(directory: Path, ca_days: float) -> CaPair:
    """Load (or create) the CA in ``directory``, rotating it when due; the previous one
    is forgotten (its files removed) once expired. Raises ``TlsError`` naming a bad file."""
    current = CertificateAuthority.load_or_create(directory, ca_days)
    previous = _load_previous(directory)
    if rotation_due(current, ca_days):
        # The previous pair is written first: a crash leaves the old CA either current or previous.
        write_atomic(directory / PREVIOUS_KEY_NAME, key_to_pem(current._key), 0o600)
        write_atomic(directory / PREVIOUS_CERT_NAME, current.cert_pem, 0o644)
        new = CertificateAuthority.create(days=ca_days)
        write_atomic(directory / CA_KEY_NAME, key_to_pem(new._key), 0o600)
        write_atomic(directory / CA_CERT_NAME, new.cert_pem, 0o644)
        log.warning("rotated the TLS CA in %s: a new CA signs from now on; the previous one stays trusted until %s",
                    directory, current.certificate.not_valid_after_utc.isoformat())
        current, previous = new, current
    return CaPair(current, previous)


def _load_previous(directory: Path) -> CertificateAuthority | None:
    cert_path, key_path = directory / PREVIOUS_CERT_NAME, directory / PREVIOUS_KEY_NAME
    if not cert_path.exists():
        return None
    cert, key = load_cert(cert_path), load_key(key_path)
    if cert.not_valid_after_utc <= _now():
        key_path.unlink(missing_ok=True)
        cert_path.unlink(missing_ok=True)
        log.info("the previous TLS CA in %s expired and is no longer trusted", directory)
        return None
    return CertificateAuthority(cert, key)


def adaptor_tls(settings: Settings) -> AdaptorTls | None:
    """``AdaptorTls`` from settings (None when DISABLE_TLS), able to rotate its CA while running."""
    if not announce_insecure_modes(settings):
        return None
    return build(settings)


def client_pair_paths(settings: Settings) -> tuple[Path, Path]:
    """Where the adaptor's client certificate and key are: the operator's, or its own in ``<STATE_DIR>/tls``."""
    if settings.cacert_file and settings.cert_file and settings.cert_key:
        return Path(settings.cert_file), Path(settings.cert_key)
    tls_dir = Path(settings.state_dir) / "tls"
    return tls_dir / CLIENT_CERT_NAME, tls_dir / CLIENT_KEY_NAME


def build(settings: Settings) -> AdaptorTls:
    """Load (or create) the CA, rotating it when due, and the client identity, checked; ``TlsError``
    naming a bad file. The result rebuilds itself when due (``tls.refresher``)."""
    tls_dir = Path(settings.state_dir) / "tls"
    ca_days = settings.ca_validity / 86400
    pair = load_cas(tls_dir, ca_days)
    if settings.cacert_file and settings.cert_file and settings.cert_key:
        _, cert_pem, key_pem = load_pair(*client_pair_paths(settings))
        client_ca = read_material(Path(settings.cacert_file))
        load_cert(Path(settings.cacert_file), client_ca)
        vm_client_ca = client_ca.decode()
    else:
        cert_pem, key_pem = _load_or_issue_client(pair.client_issuer, tls_dir, settings.node_name)
        vm_client_ca = pair.trust_pem
    return AdaptorTls(pair.current, cert_pem, key_pem, vm_client_ca, min_version=settings.tls_min_version,
                      skip_verify=settings.tls_skip_verify, vm_cert_days=settings.vm_cert_validity / 86400,
                      trusted_ca_pem=pair.trust_pem, refresh=refresher(settings))


def _load_or_issue_client(ca: CertificateAuthority, tls_dir: Path, node_name: str) -> tuple[str, str]:
    """The persisted client pair if it is still good (signed by ``ca``, matching, not
    expiring within a day); otherwise a new one, persisted."""
    cert_path, key_path = tls_dir / CLIENT_CERT_NAME, tls_dir / CLIENT_KEY_NAME
    if cert_path.exists() and key_path.exists():
        try:
            cert, cert_pem, key_pem = load_pair(cert_path, key_path)
            cert.verify_directly_issued_by(ca.certificate)
            if cert.not_valid_after_utc > _now() + DAY:
                return cert_pem, key_pem
        except (TlsError, ValueError, TypeError, InvalidSignature) as exc:
            log.warning("replacing the adaptor client certificate in %s: %s", tls_dir, exc)
    cert_pem, key_pem = ca.issue(f"cloud-api-adaptor {node_name}", server=False)
    write_atomic(key_path, key_pem, 0o600)
    write_atomic(cert_path, cert_pem, 0o644)
    return cert_pem, key_pem
