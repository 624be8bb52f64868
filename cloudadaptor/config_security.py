"""The common keys that bound and protect what the adaptor exposes, and their cross checks.

Kept apart from ``config.py`` (which lists them in ``common_keys()`` and loads
them into ``Settings``) so the security rules read in one place:

- ``GRPC_ENDPOINT`` serves CreateVM/StartVM/StopVM: it must be loopback or a
  unix socket, or carry mutual TLS (``GRPC_TLS_CERT``/``GRPC_TLS_KEY``/
  ``GRPC_TLS_CLIENT_CA``, set together);
- ``DISABLE_TLS``/``TLS_SKIP_VERIFY`` are refused with ``USE_PUBLIC_IP`` (the
  agent would be exposed, or impersonated, on the internet);
- caps on connections and requests in flight, and on GetInfo waits.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping

from cloudadaptor.config import Key, Problem
from cloudadaptor.parsers import (
    int_range, parse_abs_path, parse_host_port, parse_positive_duration, parse_readable_file,
)

GRPC_TLS_KEYS = ("GRPC_TLS_CERT", "GRPC_TLS_KEY", "GRPC_TLS_CLIENT_CA")
UNIX_PREFIX = "unix:"


def parse_grpc_endpoint(text: str) -> str:
    """``host:port``, ``[v6]:port``, ``:port`` or ``unix:/absolute/path``; returned as given."""
    text = text.strip()
    if text.startswith(UNIX_PREFIX):
        parse_abs_path(text[len(UNIX_PREFIX):])
        return text
    try:
        parse_host_port(text)
    except ValueError:
        raise ValueError('expected "host:port" (e.g. 127.0.0.1:50051 or [::1]:50051) or "unix:/absolute/path"') from None
    return text


def endpoint_is_local(endpoint: str) -> bool:
    """True for a unix socket or a loopback address; ``:port`` (all interfaces) and names other
    than ``localhost`` are not local (a name may resolve to anything)."""
    if endpoint.startswith(UNIX_PREFIX):
        return True
    host = endpoint.rpartition(":")[0].strip("[]")  # the port (even 0, "any free port") does not matter here
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def security_keys() -> tuple[Key, ...]:
    """The keys above, for ``config.common_keys()``."""
    return (
        Key("GRPC_ENDPOINT", parse_grpc_endpoint,
            help="optional host:port (loopback unless GRPC_TLS_* are set) or unix:/path for the gRPC binding"),
        Key("GRPC_TLS_CERT", parse_readable_file, help="server certificate of the gRPC endpoint (PEM)"),
        Key("GRPC_TLS_KEY", parse_readable_file, help="private key of GRPC_TLS_CERT (PEM)"),
        Key("GRPC_TLS_CLIENT_CA", parse_readable_file, help="CA that signs the certificates gRPC clients must present"),
        Key("TTRPC_MAX_CONNECTIONS", int_range(1, 65536), 512,
            help="open connections on SOCKET; past it the longest-idle one is closed"),
        Key("TTRPC_MAX_REQUESTS", int_range(1, 65536), 64,
            help="requests in flight per connection; past it RESOURCE_EXHAUSTED"),
        Key("GETINFO_WAIT_TIMEOUT", parse_positive_duration, 600.0,
            help="how long GetInfo with wait and no deadline waits for the pod VM"),
        Key("VM_CERT_VALIDITY", parse_positive_duration, 30 * 86400.0,
            help="lifetime of each pod VM's server certificate"),
        Key("CA_VALIDITY", parse_positive_duration, 365 * 86400.0,
            help="lifetime of the adaptor's CA; renewed when a third of it is left, the old one trusted until it expires"),
    )


def security_problems(values: Mapping[str, Any], env: Mapping[str, str]) -> list[Problem]:
    """What ``serve`` refuses between these keys and the common ones (one Problem each)."""
    problems = []
    given = [k for k in GRPC_TLS_KEYS if values.get(k) is not None]
    if given and len(given) < len(GRPC_TLS_KEYS):
        problems += [Problem(k, None, "GRPC_TLS_CERT, GRPC_TLS_KEY and GRPC_TLS_CLIENT_CA are set together or not at all")
                     for k in GRPC_TLS_KEYS if k not in given]
    endpoint = values.get("GRPC_ENDPOINT")
    if endpoint and not given and not endpoint_is_local(endpoint):
        problems.append(Problem("GRPC_ENDPOINT", endpoint,
                                "a non-loopback address needs mutual TLS (set GRPC_TLS_CERT, GRPC_TLS_KEY and"
                                " GRPC_TLS_CLIENT_CA), or use 127.0.0.1:PORT or unix:/path"))
    if values.get("USE_PUBLIC_IP"):
        for key in ("DISABLE_TLS", "TLS_SKIP_VERIFY"):
            if values.get(key):
                problems.append(Problem(key, env.get(key, "true"),
                                        "not allowed with USE_PUBLIC_IP=true: pod VMs are reached over the internet"))
    vm_cert, ca = values.get("VM_CERT_VALIDITY"), values.get("CA_VALIDITY")
    if vm_cert and ca and vm_cert * 3 > ca:
        problems.append(Problem("VM_CERT_VALIDITY", env.get("VM_CERT_VALIDITY", ""),
                                "must be at most a third of CA_VALIDITY (a VM certificate never outlives its CA)"))
    return problems
