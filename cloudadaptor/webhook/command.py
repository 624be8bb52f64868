"""`cloud-api-adaptor webhook`: settings, flags and the run loop (aiohttp is imported only when it runs)."""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
from pathlib import Path
from typing import Any, Mapping

from cloudadaptor.commandline import print_problems, serve_until_signal, setup_logging
from cloudadaptor.config import Key, Problem, merge_overrides, one_of, parse_csv, parse_host_port, parse_keys
from cloudadaptor.webhook.mutate import DEFAULT_RUNTIME_CLASS, DEFAULT_SYSTEM_NAMESPACES, MutationOptions

DEFAULT_CERT = "/etc/webhook/certs/tls.crt"
DEFAULT_KEY = "/etc/webhook/certs/tls.key"


KEYS: tuple[Key, ...] = (
    Key("TARGET_RUNTIME_CLASS", str, DEFAULT_RUNTIME_CLASS, help="the RuntimeClass whose pods become peer pods"),
    Key("WEBHOOK_SYSTEM_NAMESPACES", parse_csv, DEFAULT_SYSTEM_NAMESPACES,
        help="namespaces left alone (comma list; shell patterns like openshift-*)"),
    Key("WEBHOOK_ADDRESS", parse_host_port, ("", 8443), help='listen address "host:port" (":8443": all interfaces)'),
    Key("WEBHOOK_TLS_CERT_FILE", Path, Path(DEFAULT_CERT), help="serving certificate (PEM)"),
    Key("WEBHOOK_TLS_KEY_FILE", Path, Path(DEFAULT_KEY), help="serving key (PEM)"),
    Key("LOG_LEVEL", str, "info", help="debug | info | warning | error"),
    Key("LOG_FORMAT", one_of("text", "json"), "text", help="text, or json: one object per line"),
)

_FLAGS = {
    "address": "WEBHOOK_ADDRESS",
    "tls_cert": "WEBHOOK_TLS_CERT_FILE",
    "tls_key": "WEBHOOK_TLS_KEY_FILE",
    "runtime_class": "TARGET_RUNTIME_CLASS",
    "system_namespaces": "WEBHOOK_SYSTEM_NAMESPACES",
    "log_level": "LOG_LEVEL",
}


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Mutating admission webhook for peer pods (AdmissionReview v1 over HTTPS, JSONPatch)."
    group = parser.add_argument_group("settings (override the environment keys in brackets)")
    group.add_argument("--address", help='[WEBHOOK_ADDRESS] "host:port" to listen on (default :8443)')
    group.add_argument("--tls-cert", help=f"[WEBHOOK_TLS_CERT_FILE] serving certificate (default {DEFAULT_CERT})")
    group.add_argument("--tls-key", help=f"[WEBHOOK_TLS_KEY_FILE] serving key (default {DEFAULT_KEY})")
    group.add_argument("--runtime-class", help=f"[TARGET_RUNTIME_CLASS] pods of this RuntimeClass are mutated (default {DEFAULT_RUNTIME_CLASS})")
    group.add_argument("--system-namespaces", help="[WEBHOOK_SYSTEM_NAMESPACES] namespaces left alone (comma list, patterns)")
    group.add_argument("--log-level", help="[LOG_LEVEL] debug | info | warning | error")


def load(env: Mapping[str, str]) -> tuple[dict[str, Any], list[Problem]]:
    """The webhook's settings; TLS files must be readable. Returns (values, problems)."""
    values, problems = parse_keys(KEYS, env)
    for key in ("WEBHOOK_TLS_CERT_FILE", "WEBHOOK_TLS_KEY_FILE"):
        path = values[key]
        if not (path.is_file() and os.access(path, os.R_OK)):
            problems.append(Problem(key, str(path), "expected a readable PEM file"))
    return values, problems


def run(args: argparse.Namespace) -> int:
    env = merge_overrides(os.environ, {key: getattr(args, flag, None) for flag, key in _FLAGS.items()})
    values, problems = load(env)
    if problems:
        print_problems(problems)
        return 2
    setup_logging(str(values["LOG_LEVEL"]), str(values["LOG_FORMAT"]))
    from cloudadaptor.webhook.server import CertificateReloader, WebhookServer

    try:
        certificates = CertificateReloader(values["WEBHOOK_TLS_CERT_FILE"], values["WEBHOOK_TLS_KEY_FILE"])
    except (OSError, ssl.SSLError) as exc:
        print(f"cannot start: TLS certificate/key: {exc}", file=sys.stderr)
        return 1
    host, port = values["WEBHOOK_ADDRESS"]
    options = MutationOptions(runtime_class=values["TARGET_RUNTIME_CLASS"],
                              system_namespaces=tuple(values["WEBHOOK_SYSTEM_NAMESPACES"]))
    asyncio.run(serve_until_signal(WebhookServer(options, certificates, host, port)))
    return 0
