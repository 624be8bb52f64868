"""CertRenewal: the adaptor renews the server certificates of running pod VMs (the VM's half: podvm/certrenewal.py).

A pod VM's server certificate lives ``VM_CERT_VALIDITY``; a pod may live
longer. A background task of the daemon looks at every running sandbox each
``interval`` and renews its VM's certificate when ``fraction`` (2/3) of its
life has passed, or when it was signed by a CA other than the current one (a
rotation: the renewal also carries the new CA bundle, so the VM trusts the
adaptor's client certificates of the new CA before the old CA expires).

A renewal dials the VM exactly as the agent proxy does (mutual TLS,
``server_hostname`` = VM name) on a connection of its own, asks which
certificate the VM serves (``wire.CERT_CURRENT_METHOD``) and sends a freshly
minted one (``wire.CERT_RENEW_METHOD``, apf.json's ``tls`` object). Open agent
connections are not touched. Each certificate's issue and expiry time and its
CA are recorded in the sandbox row, read from the user data the first time, so
a restarted daemon renews what fell due while it was down.

Failures are logged with sandbox, VM and instance (never key material),
counted (``recorder.cert_renewal``) and retried after a growing pause; they
never end the task. A VM whose image predates renewal (its forwarder relays the
call to the agent, which answers UNIMPLEMENTED) is logged once, recorded as
``unsupported`` and left alone; its certificate expires after
``VM_CERT_VALIDITY`` as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from cloudadaptor import userdata
from cloudadaptor.adaptor.store import Sandbox, SandboxState, SandboxStore
from cloudadaptor.podconfig import ForwarderConfig
from cloudadaptor.retry import Backoff
from cloudadaptor.tls import BACKDATE, AdaptorTls
from cloudadaptor.ttrpc.client import Client
from cloudadaptor.ttrpc.errors import Code, ConnectionClosed, TtrpcError
from cloudadaptor.userdata import APF_CONFIG_PATH
from cloudadaptor.wire import AGENT_PORT, CERT_CURRENT_METHOD, CERT_RENEW_METHOD, CERT_SERVICE

if TYPE_CHECKING:  # cryptography is imported when a certificate is read (issue 16: idle RSS)
    from cryptography import x509

log = logging.getLogger(__name__)

UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class RenewalOptions:
    fraction: float = 2 / 3  # of a certificate's life, after which it is renewed
    interval: float = 60.0  # seconds between passes (a CA rotation is noticed within one)
    port: int = AGENT_PORT
    timeout: float = 10.0  # one renewal: dial, two small calls
    retry: Backoff = Backoff(initial=30.0, factor=2.0, maximum=3600.0)


class RenewalRecorder(Protocol):
    def cert_renewal(self, result: str) -> None:
        """One renewal attempt ended: ``ok``, ``failed`` or ``unsupported``."""


class _Unsupported(Exception):
    """The VM's forwarder has no renewal service (an image built before it)."""


class RenewalFailed(Exception):
    """The VM could not be reached, or refused or botched the renewal; the message says which."""


@dataclass
class _Retry:
    delays: Iterator[float]
    at: float


class CertRenewal:
    """Renews running VMs' certificates; ``start()`` runs passes in the background until ``close()``."""

    def __init__(self, *, store: SandboxStore, tls: AdaptorTls, options: RenewalOptions = RenewalOptions(),
                 recorder: RenewalRecorder | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store, self.tls, self.options = store, tls, options
        self.recorder = recorder
        self.clock = clock
        self._retries: dict[str, _Retry] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="cert-renewal")

    async def close(self) -> None:
        """Stop the task (a renewal in flight is abandoned; the VM keeps whichever certificate it has). Idempotent."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # noqa: BLE001 - e.g. the store or the CA files: try again next pass
                log.exception("certificate renewal pass failed")
            await asyncio.sleep(self.options.interval)

    async def run_once(self) -> dict[str, str]:
        """One pass: rotate the CA when due, then renew every due certificate.
        Returns sandbox id → ``ok``/``failed``/``unsupported`` for each attempt."""
        if self.tls.refresh_if_due():
            log.info("the TLS CA was rotated: running pod VMs get certificates of the new CA")
        now, results = self.clock(), {}
        for sandbox in self.store.all():
            if sandbox.state is not SandboxState.RUNNING or not sandbox.vm_ips or sandbox.cert_renewal == UNSUPPORTED:
                continue
            sandbox = self._with_certificate(sandbox)
            retry = self._retries.get(sandbox.id)
            if sandbox.cert_not_after and self.due(sandbox, now) and (retry is None or retry.at <= now):
                results[sandbox.id] = await self._attempt(sandbox, now)
        return results

    def due(self, sandbox: Sandbox, now: float) -> bool:
        """Renew when ``fraction`` of the certificate's life has passed, or another CA signed it."""
        life = sandbox.cert_not_after - sandbox.cert_issued_at
        return now >= sandbox.cert_issued_at + self.options.fraction * life or sandbox.cert_ca != self.tls.ca_key_id

    def _with_certificate(self, sandbox: Sandbox) -> Sandbox:
        """The row with its certificate's times recorded (read once from the user data it was booted with)."""
        if sandbox.cert_not_after:
            return sandbox
        cert = _certificate_in(sandbox.user_data)
        if cert is None:
            return sandbox  # no TLS material: nothing to renew
        return self._record(sandbox.id, cert) or sandbox

    def _record(self, sandbox_id: str, cert: x509.Certificate) -> Sandbox | None:
        from cloudadaptor.tlscerts import key_id

        issued = cert.not_valid_before_utc.timestamp() + BACKDATE.total_seconds()  # issued BACKDATE after its start
        with contextlib.suppress(KeyError):  # StopVM removed the row meanwhile
            return self.store.update(sandbox_id, cert_issued_at=issued, cert_not_after=cert.not_valid_after_utc.timestamp(),
                                     cert_ca=key_id(cert, issuer=True))
        return None

    async def _attempt(self, sandbox: Sandbox, now: float) -> str:
        where = f"sandbox {sandbox.id} (VM {sandbox.vm_name}, instance {sandbox.instance_id})"
        try:
            cert = await self.renew(sandbox)
        except _Unsupported:
            self._retries.pop(sandbox.id, None)
            with contextlib.suppress(KeyError):
                self.store.change(sandbox.id, cert_renewal=UNSUPPORTED)
            log.warning("%s cannot renew its certificate (an image without renewal); it expires %s",
                        where, _iso(sandbox.cert_not_after))
            return self._count(UNSUPPORTED)
        except RenewalFailed as exc:
            current = self.store.get(sandbox.id)
            if current is None or current.state is not SandboxState.RUNNING:
                return self._count("failed")  # stopped meanwhile: nothing to retry
            retry = self._retries.setdefault(sandbox.id, _Retry(self.options.retry.delays(), now))
            pause = next(retry.delays)
            retry.at = now + pause
            log.warning("certificate renewal of %s failed, next attempt in %.0f s: %s", where, pause, exc)
            return self._count("failed")
        self._retries.pop(sandbox.id, None)
        self._record(sandbox.id, cert)
        log.info("renewed the certificate of %s: valid until %s", where, cert.not_valid_after_utc.isoformat())
        return self._count("ok")

    def _count(self, result: str) -> str:
        if self.recorder is not None:
            self.recorder.cert_renewal(result)
        return result

    async def renew(self, sandbox: Sandbox) -> x509.Certificate:
        """Send ``sandbox``'s VM a new certificate (and the CA bundle); returns it once the VM serves it.
        Raises ``RenewalFailed``, or ``_Unsupported`` for a VM without the renewal service."""
        from cryptography import x509

        material = self.tls.mint_vm_material(sandbox.vm_name)
        cert = x509.load_pem_x509_certificate(material.cert_pem.encode())
        payload = json.dumps({"cert_pem": material.cert_pem, "key_pem": material.key_pem,
                              "client_ca_pem": material.client_ca_pem}).encode()
        try:
            async with asyncio.timeout(self.options.timeout):
                client = await Client.connect_tcp(sandbox.vm_ips[0], self.options.port, ssl=self.tls.client_context(),
                                                  server_hostname=sandbox.vm_name)
                try:
                    await self._call(client, CERT_CURRENT_METHOD, b"")  # asks first: an old image never gets the key
                    answer = await self._call(client, CERT_RENEW_METHOD, payload)
                finally:
                    await client.close()
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise RenewalFailed(f"cannot reach {sandbox.vm_ips[0]}:{self.options.port}: "
                                f"{exc or type(exc).__name__}") from None
        if _serial_of(answer) != format(cert.serial_number, "x"):
            raise RenewalFailed("the VM answered, but does not report the new certificate")
        return cert

    async def _call(self, client: Client, method: str, payload: bytes) -> bytes:
        try:
            return await client.call(CERT_SERVICE, method, payload, timeout=self.options.timeout)
        except TtrpcError as exc:
            if exc.code == Code.UNIMPLEMENTED:
                raise _Unsupported() from None
            raise RenewalFailed(f"{method}: {exc}") from None
        except ConnectionClosed as exc:
            raise RenewalFailed(f"{method}: connection closed: {exc}") from None


def _certificate_in(user_data: str) -> x509.Certificate | None:
    """The server certificate in a sandbox's user data (apf.json's ``tls``), or None."""
    try:
        apf = [e for e in userdata.parse_entries(user_data) if e.path == APF_CONFIG_PATH]
        config = ForwarderConfig.from_json(apf[-1].content) if apf else None
    except (ValueError, userdata.UserDataError):
        return None
    if config is None or config.tls is None:
        return None
    from cryptography import x509

    return x509.load_pem_x509_certificate(config.tls.cert_pem.encode())


def _serial_of(answer: bytes) -> str:
    try:
        doc = json.loads(answer)
    except ValueError:
        return ""
    return str(doc.get("serial", "")) if isinstance(doc, dict) else ""


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
