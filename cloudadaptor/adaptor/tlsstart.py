"""``python -m cloudadaptor.adaptor.tlsstart``: the daemon's TLS start-up, done by a short-lived child.

Loading (or creating) the CA in ``<STATE_DIR>/tls``, rotating it when due, and
checking (or issuing) the adaptor's client certificate need ``cryptography``,
which would stay in the daemon's memory for good: about 11 MiB of resident
memory (issue 16: idle RSS). So ``start_tls`` has this child do that work —
exactly what ``AdaptorTls.from_settings`` does in-process (``tlsrotation.build``)
— and builds the daemon's ``AdaptorTls`` from what the child reports: the
certificates (public), the CA's key id and expiry date, the client
certificate's expiry date, the path of the client key, and the log lines the
child wrote. No key passes through the pipe: the daemon reads the client key
from its file, and the CA key stays on disk until the first VM certificate is
minted (``AdaptorTls.ca``). A bad file comes back as the ``TlsError`` text, so
the daemon refuses to start with the same message as before.

Protocol: the settings the work needs as one JSON object on stdin; one JSON
object on stdout, with ``error`` or the report, and ``log``; exit status 0.
Anything else (no interpreter, a crash, a timeout, an unreadable answer)
means the child could not do the work: the daemon does it itself and logs why.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cloudadaptor.config import Settings
from cloudadaptor.tls import AdaptorTls, CaFacts, TlsError, announce_insecure_modes, read_material, refresher

log = logging.getLogger(__name__)
tls_log = logging.getLogger("cloudadaptor.tls")  # the child's lines appear as if the daemon wrote them

START_TIMEOUT = 60.0
_FIELDS = ("state_dir", "node_name", "ca_validity", "vm_cert_validity", "tls_min_version", "tls_skip_verify",
           "cacert_file", "cert_file", "cert_key")
_PATHS = ("state_dir", "cacert_file", "cert_file", "cert_key")


class _ChildFailed(Exception):
    """The child could not do the work (the message says why); the daemon does it itself."""


async def start_tls(settings: Settings) -> AdaptorTls | None:
    """The daemon's ``AdaptorTls`` (None with DISABLE_TLS), its material checked or created by a child;
    ``TlsError`` naming the file when persisted or operator material is bad. Blocks only on the child."""
    if not announce_insecure_modes(settings):
        return None
    try:
        report = await _run_child(settings)
    except _ChildFailed as exc:
        return _in_process(settings, str(exc))
    for level, message in report.get("log", []):
        tls_log.log(int(level), "%s", message)
    if "error" in report:
        raise TlsError(str(report["error"]))
    try:
        return _from_report(settings, report)
    except (KeyError, TypeError, ValueError) as exc:
        return _in_process(settings, f"an incomplete report: {type(exc).__name__} {exc}")


def _in_process(settings: Settings, why: str) -> AdaptorTls:
    log.warning("TLS start-up child failed (%s): loading the TLS material in the daemon instead", why)
    from cloudadaptor.tlsrotation import build

    return build(settings)


async def _run_child(settings: Settings) -> dict[str, Any]:
    params = {name: getattr(settings, name) for name in _FIELDS}
    params.update({name: str(params[name]) if params[name] is not None else None for name in _PATHS})
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cloudadaptor.adaptor.tlsstart",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except (OSError, ValueError) as exc:
        raise _ChildFailed(f"cannot run {sys.executable or 'the interpreter'}: {exc}") from None
    try:
        out, err = await asyncio.wait_for(child.communicate(json.dumps(params).encode()), START_TIMEOUT)
    except asyncio.TimeoutError:
        child.kill()
        await child.wait()
        raise _ChildFailed(f"no answer within {START_TIMEOUT:.0f} s") from None
    if child.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines() or [""]
        raise _ChildFailed(f"exit status {child.returncode}: {lines[-1][:300]}")
    try:
        report = json.loads(out)
    except ValueError:
        report = None
    if not isinstance(report, dict):
        raise _ChildFailed("its answer is not a JSON object")
    return report


def _from_report(settings: Settings, report: dict[str, Any]) -> AdaptorTls:
    ca = CaFacts(Path(settings.state_dir) / "tls", report["ca_cert_pem"], report["ca_key_id"],
                 datetime.datetime.fromisoformat(report["ca_not_after"]))
    key_pem = read_material(Path(report["client_key"])).decode()  # read here: keys never travel through the pipe
    return AdaptorTls(ca, report["client_cert_pem"], key_pem, report["vm_client_ca_pem"],
                      min_version=settings.tls_min_version, skip_verify=settings.tls_skip_verify,
                      vm_cert_days=settings.vm_cert_validity / 86400, trusted_ca_pem=report["trusted_ca_pem"],
                      client_not_after=datetime.datetime.fromisoformat(report["client_not_after"]),
                      refresh=refresher(settings))


# ------------------------------------------------------------------- the child


def _report(settings: Settings) -> dict[str, Any]:
    from cloudadaptor.tlsrotation import build, client_pair_paths

    tls = build(settings)
    return {"ca_cert_pem": tls.ca.cert_pem, "ca_key_id": tls.ca_key_id, "ca_not_after": tls.ca_not_after.isoformat(),
            "client_cert_pem": tls.client_cert_pem, "client_key": str(client_pair_paths(settings)[1]),
            "client_not_after": tls.client_not_after.isoformat(), "vm_client_ca_pem": tls.vm_client_ca_pem,
            "trusted_ca_pem": tls.trusted_ca_pem}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def main() -> int:
    collect = _Collect()
    root = logging.getLogger("cloudadaptor")
    root.addHandler(collect)
    root.setLevel(logging.INFO)
    params = json.load(sys.stdin)
    params.update({name: Path(params[name]) if params.get(name) else None for name in _PATHS})
    try:
        doc = _report(Settings(**params))
    except TlsError as exc:
        doc = {"error": str(exc)}
    doc["log"] = collect.lines
    json.dump(doc, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
