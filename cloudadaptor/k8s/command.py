"""Subcommands of the Kubernetes side: ``peerpod-controller`` and ``probe``.

Each has ``build_*_parser(parser)`` and ``run_*(args) -> exit code``, the
shape ``cloudadaptor.cli`` wires in. Configuration errors exit 2 with one line
per problem, like ``serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
import uuid

from cloudadaptor import __version__
from cloudadaptor.commandline import print_problems, run_until_signal, setup_logging
from cloudadaptor.config import ConfigError, merge_overrides, parse_keys
from cloudadaptor.providers.base import load_provider

log = logging.getLogger(__name__)

HYPERVISOR_SERVICE = "hypervisor.Hypervisor"
DEFAULT_SOCKET = "/run/peerpod/hypervisor.sock"
LEASE_NAME = "peerpod-controller"  # coordination.k8s.io/v1 Lease in POD_NAMESPACE: one replica leads

# peerpod-controller flag -> environment key it overrides
_CONTROLLER_FLAGS = {
    "provider": "CLOUD_PROVIDER",
    "interval": "PEERPOD_CONTROLLER_INTERVAL",
    "sweep_grace": "PEERPOD_SWEEP_GRACE",
    "sweep": "PEERPOD_SWEEP",
    "kubeconfig": "KUBECONFIG",
    "log_level": "LOG_LEVEL",
}


# ------------------------------------------------------------ peerpod-controller


def build_controller_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Delete the VMs of PeerPods deleted while their finalizer is still on (the adaptor died, the node "
        "vanished), sweep tagged VMs that no PeerPod or live pod references, and keep the kata.peerpods.io/vm "
        "capacity of the nodes each PeerPodConfig selects equal to its limit. With several replicas one leads "
        "(Lease peerpod-controller). Needs the cloud settings (peer-pods-cm, peer-pods-secret) and Kubernetes "
        "access (in-cluster, or KUBECONFIG)."
    )
    group = parser.add_argument_group("settings (override the environment keys in brackets)")
    group.add_argument("--provider", help="[CLOUD_PROVIDER] aws | azure | local")
    group.add_argument("--interval", help="[PEERPOD_CONTROLLER_INTERVAL] time between passes (default 30s)")
    group.add_argument("--sweep-grace", help="[PEERPOD_SWEEP_GRACE] unreferenced time before a VM is swept (default 10m)")
    group.add_argument("--sweep", choices=("true", "false"), help="[PEERPOD_SWEEP] sweep unreferenced VMs (default true)")
    group.add_argument("--kubeconfig", help="[KUBECONFIG] kubeconfig file (default: in-cluster service account)")
    group.add_argument("--log-level", help="[LOG_LEVEL] debug | info | warning | error")
    parser.add_argument("--once", action="store_true", help="run one pass and exit (1 when it reported errors)")


def run_controller(args: argparse.Namespace) -> int:
    from cloudadaptor.k8s import controller

    env = merge_overrides(os.environ, {key: getattr(args, flag, None) for flag, key in _CONTROLLER_FLAGS.items()})
    values, problems = parse_keys(controller.KEYS, env)
    try:
        settings, provider_config = load_provider(env)
    except ConfigError as exc:
        problems = exc.problems + problems
        settings = provider_config = None
    if problems or settings is None or provider_config is None:
        print_problems(problems)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        return asyncio.run(_controller_main(settings, provider_config, values, args.once))
    except ConfigError as exc:
        print_problems(exc.problems)
        return 2


async def _controller_main(settings, provider_config, values, once: bool) -> int:
    from cloudadaptor.k8s import controller
    from cloudadaptor.k8s.client import API_ERRORS, KubeConfigError, connect, describe
    from cloudadaptor.k8s.peerpods import PeerPodApi
    from cloudadaptor.metrics import ControllerMetrics
    from cloudadaptor.probes import ProbeBindError, ProbeServer
    from cloudadaptor.providers.base import create_provider

    try:
        api = await connect(settings.provider_env)
    except KubeConfigError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    if api is None:
        print("cannot start: no Kubernetes configuration (set KUBECONFIG or run in a cluster)", file=sys.stderr)
        return 1
    try:
        cluster_id = settings.cluster_id or await PeerPodApi(api).cluster_uid()
    except API_ERRORS as exc:
        await api.close()
        print(f"cannot start: reading namespace kube-system for the cluster id failed ({describe(exc)}); "
              "set CLUSTER_ID or allow get on namespaces", file=sys.stderr)
        return 1
    options = controller.ControllerOptions.from_values(values, settings.cloud_provider, settings.tags, cluster_id)
    interval = values["PEERPOD_CONTROLLER_INTERVAL"]
    provider = create_provider(settings, provider_config)
    log.info("PeerPod controller: provider %s, cluster %s, every %.0fs, sweep %s (grace %.0fs, tags %s)",
             options.provider_name, cluster_id, interval, "on" if options.sweep else "off", options.sweep_grace,
             dict(options.sweep_tags) or "-")
    metrics = ControllerMetrics(options.provider_name)
    probes = None if once else ProbeServer(settings.probe_address, settings.probe_port, metrics, lambda: True)
    try:
        if probes is not None:
            await probes.start()  # /metrics, /healthz, /startup of the controller
        report = await run_until_signal(lambda stop: _lead_or_once(
            api, values, once, stop, lambda until: controller.run(
                PeerPodApi(api), provider, options, interval=interval, stop=until, once=once, metrics=metrics)))
    except ProbeBindError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        if probes is not None:
            await probes.close()
        with contextlib.suppress(Exception):
            await provider.close()
        await api.close()
    if once and (report is None or report.errors):
        return 1
    return 0


async def _lead_or_once(api, values, once: bool, stop: asyncio.Event, peerpod_loop):
    """Both loops — PeerPods (``controller``) and PeerPodConfigs (``nodelimits``) — once, or while this
    replica holds the leader Lease. Returns the PeerPod loop's last report."""
    from cloudadaptor.k8s import nodelimits
    from cloudadaptor.k8s.leader import LeaderElector

    configs = nodelimits.NodeLimitController(api)
    reports: list = []

    async def lead(until: asyncio.Event) -> None:
        peerpods, _ = await asyncio.gather(peerpod_loop(until), nodelimits.run(configs, stop=until, once=once))
        reports.append(peerpods)

    if once:
        await lead(stop)
    else:
        identity = values["POD_NAME"] or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        await LeaderElector(api, values["POD_NAMESPACE"], LEASE_NAME, identity).run(stop, lead)
    return reports[-1] if reports else None


# ---------------------------------------------------------------------- probe


def build_probe_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Exit 0 when the adaptor answers a ttrpc Version call on its hypervisor socket "
                          "(what the DaemonSet's startup probe runs), 1 otherwise.")
    parser.add_argument("--socket", default=None, help=f"[SOCKET] hypervisor socket (default {DEFAULT_SOCKET})")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")


def run_probe(args: argparse.Namespace) -> int:
    socket = args.socket or os.environ.get("SOCKET") or DEFAULT_SOCKET
    began = time.monotonic()
    from cloudadaptor.ttrpc.errors import ConnectionClosed, TtrpcError

    try:
        version = asyncio.run(probe(socket, args.timeout))
    except (OSError, TimeoutError, TtrpcError, ConnectionClosed) as exc:  # anything else is a bug: its traceback shows
        print(f"not ready: {socket}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"ready: cloud-api-adaptor {version} on {socket} ({(time.monotonic() - began) * 1000:.0f} ms)")
    return 0


async def probe(socket: str, timeout: float) -> str:
    """One ttrpc ``hypervisor.Hypervisor/Version`` call on ``socket``; returns the daemon's version.

    Raises ``OSError`` when nobody listens, ``TimeoutError`` after ``timeout``
    seconds, ``TtrpcError`` for an error answer.
    """
    from cloudadaptor.protocols import hypervisor_pb2 as hv
    from cloudadaptor.ttrpc.client import Client

    async with asyncio.timeout(timeout):
        client = await Client.connect_unix(socket)
        try:
            response = await client.call_message(
                HYPERVISOR_SERVICE, "Version", hv.VersionRequest(version=__version__), hv.VersionResponse, timeout=timeout)
        finally:
            await client.close()
    return response.version
