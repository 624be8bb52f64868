"""`cloud-api-adaptor`: one command, one subcommand per job.

Worker side: ``serve`` (the daemon), ``config check``, ``demo``, ``aws open-ports``, ``azure open-ports``.
Cluster side: ``peerpod-controller``, ``webhook``; ``probe`` (the DaemonSet's startup probe).
Pod VM side: ``process-user-data``, ``pod-network``, ``forwarder``. Images: ``image build|list|delete``.
Settings come from the environment (peer-pods-cm / peer-pods-secret keys,
see README); flags override them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from cloudadaptor import __version__

# serve flag -> environment key it overrides
_SERVE_FLAGS = {
    "provider": "CLOUD_PROVIDER",
    "socket": "SOCKET",
    "state_dir": "STATE_DIR",
    "pods_dir": "PODS_DIR",
    "grpc_endpoint": "GRPC_ENDPOINT",
    "proxy_timeout": "PROXY_TIMEOUT",
    "node_name": "NODE_NAME",
    "log_level": "LOG_LEVEL",
}


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (override the environment keys in brackets)")
    group.add_argument("--provider", help="[CLOUD_PROVIDER] aws | azure | local")
    group.add_argument("--socket", help="[SOCKET] hypervisor socket (default /run/peerpod/hypervisor.sock)")
    group.add_argument("--state-dir", help="[STATE_DIR] state store and TLS material (default /run/peerpod)")
    group.add_argument("--pods-dir", help="[PODS_DIR] per-pod agent sockets (default /run/peerpod/pods)")
    group.add_argument("--grpc-endpoint", help="[GRPC_ENDPOINT] also serve the hypervisor API over gRPC on host:port")
    group.add_argument("--proxy-timeout", help="[PROXY_TIMEOUT] how long StartVM waits for the agent (default 5m)")
    group.add_argument("--node-name", help="[NODE_NAME] this worker's name (default: hostname)")
    group.add_argument("--log-level", help="[LOG_LEVEL] debug | info | warning | error")


def _overrides(args: argparse.Namespace) -> dict[str, str | None]:
    return {key: getattr(args, flag, None) for flag, key in _SERVE_FLAGS.items()}


def _setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # pyroute2 logs every netlink message at debug: too much even for debugging us.
    logging.getLogger("pyroute2").setLevel(max(logging.INFO, logging.getLogger().level))


def _print_problems(problems: list) -> None:
    print(f"configuration refused ({len(problems)} problem{'s' if len(problems) != 1 else ''}):", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from cloudadaptor.adaptor.daemon import StartupError, serve
    from cloudadaptor.config import ConfigError, load_settings

    try:
        settings = load_settings(os.environ, overrides=_overrides(args))
    except ConfigError as exc:
        _print_problems(exc.problems)
        return 2
    _setup_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except ConfigError as exc:
        _print_problems(exc.problems)
        return 2
    except StartupError as exc:
        print(f"cannot start:\n{exc}", file=sys.stderr)
        return 1
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from cloudadaptor.config import check

    rows, problems = check(os.environ, overrides=_overrides(args))
    width = max((len(key) for key, _, _ in rows), default=10)
    for key, value, source in rows:
        print(f"{key:<{width}}  {value}  ({source})")
    if problems:
        print(file=sys.stderr)
        _print_problems(problems)
        return 1
    print("\nconfiguration OK")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"cloud-api-adaptor {__version__}")
    return 0


def _aws_command(parser: argparse.ArgumentParser):
    """Add the ``aws`` actions; boto3 is imported only when one runs."""
    sub = parser.add_subparsers(dest="aws_command", metavar="ACTION", required=True)
    ports = sub.add_parser("open-ports", help="allow 15150/tcp and VXLAN_PORT/udp within the worker security group (idempotent)")
    ports.add_argument("--group-id", help="security group to open (default: the first of AWS_SG_IDS, else the worker's first)")
    ports.add_argument("--vxlan-port", help="VXLAN UDP port (default: VXLAN_PORT or 9000)")

    def run(args: argparse.Namespace) -> int:
        from cloudadaptor.providers.aws import command

        return command.run(args)

    return run


# Subcommands that live in their own module: (name, help, module, parser builder, runner).
# Each module keeps its SDK imports inside the runner, so --help stays fast.
_MODULE_COMMANDS = (
    ("forwarder", "(pod VM) agent-protocol-forwarder: mTLS on 15150 in front of the kata-agent",
     "cloudadaptor.podvm.forwarder", "build_parser", "run"),
    ("pod-network", "(pod VM) join the VM's podns to the worker's pod network (VXLAN, from apf.json)",
     "cloudadaptor.podnetwork.vmside", "build_parser", "run"),
    ("process-user-data", "(pod VM) fetch user data and write the allow-listed files",
     "cloudadaptor.podvm.process_user_data", "build_parser", "run"),
    ("azure", "Azure operator helpers (open-ports: the NSG rules peer pods need)",
     "cloudadaptor.providers.azure.command", "build_parser", "run"),
    ("image", "pod VM images: build peer-pod-ami / peer-pod-vmimage, list, delete",
     "cloudadaptor.imagebuild.command", "build_parser", "run"),
    ("peerpod-controller", "delete VMs of PeerPods whose pod is gone; sweep unreferenced tagged VMs",
     "cloudadaptor.k8s.commands", "build_controller_parser", "run_controller"),
    ("webhook", "mutating admission webhook for peer pods (HTTPS)",
     "cloudadaptor.webhook.command", "build_parser", "run"),
    ("probe", "exit 0 when the adaptor answers on its hypervisor socket (startup probe)",
     "cloudadaptor.k8s.commands", "build_probe_parser", "run_probe"),
    ("demo", "run 3 peer pods end to end on the local provider, in a private namespace",
     "cloudadaptor.dev.demo", "build_parser", "run"),
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="cloud-api-adaptor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cloud-api-adaptor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run the worker daemon (hypervisor service for the kata shim)")
    _add_setting_flags(serve)
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="inspect the configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_sub.add_parser("check", help="print the effective settings (secrets masked); exit 1 listing every problem")
    _add_setting_flags(check)
    check.set_defaults(func=cmd_config_check)

    aws = sub.add_parser("aws", help="AWS operator helpers (open-ports: the security-group rules peer pods need)")
    aws.set_defaults(func=_aws_command(aws))

    for name, help_text, module_name, build, run in _MODULE_COMMANDS:
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text)
        getattr(module, build)(command)
        command.set_defaults(func=getattr(module, run))

    ver = sub.add_parser("version", help="print the version")
    ver.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
