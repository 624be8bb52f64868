"""`cloud-api-adaptor`: one command, one subcommand per job.

Worker side: ``serve`` (the daemon), ``config check``, ``console``, ``diagnose``, ``demo``, ``aws open-ports``,
``azure open-ports``.
Cluster side: ``peerpod-controller``, ``webhook``; ``probe`` (the DaemonSet's startup probe).
Pod VM side: ``process-user-data``, ``wait-for-claim``, ``pod-network``, ``forwarder``. Images: ``image build|list|delete``.
Settings come from the environment (peer-pods-cm / peer-pods-secret keys,
see README); flags override them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from cloudadaptor import __version__
from cloudadaptor.commandline import Subcommand, print_problems, setup_logging
from cloudadaptor.wire import AGENT_PORT

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


def cmd_serve(args: argparse.Namespace) -> int:
    from cloudadaptor.adaptor.daemon import StartupError, serve
    from cloudadaptor.eventloop import new_event_loop
    from cloudadaptor.config import ConfigError, load_settings

    try:
        settings = load_settings(os.environ, overrides=_overrides(args))
    except ConfigError as exc:
        print_problems(exc.problems)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:  # uvloop: the agent proxy's relay is compiled
            runner.run(serve(settings))
    except ConfigError as exc:
        print_problems(exc.problems)
        return 2
    except StartupError as exc:
        print(f"cannot start:\n{exc}", file=sys.stderr)
        return 1
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from cloudadaptor.config import check, merge_overrides
    from cloudadaptor.configwarnings import config_warnings

    rows, problems = check(os.environ, overrides=_overrides(args))
    width = max((len(key) for key, _, _ in rows), default=10)
    for key, value, source in rows:
        print(f"{key:<{width}}  {value}  ({source})")
    warnings = config_warnings(merge_overrides(os.environ, _overrides(args)), {key for key, _, _ in rows})
    if warnings:
        print()
    for line in warnings:  # advice only: the exit code stays that of the problems
        print(f"warning: {line}")
    if problems:
        print(file=sys.stderr)
        print_problems(problems)
        return 1
    print("\nconfiguration OK")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"cloud-api-adaptor {__version__}")
    return 0


# Subcommands that live in their own module (see cloudadaptor.commandline: build_parser(parser), run(args)).
# Each module keeps its SDK imports inside the runner, so --help stays fast.
SUBCOMMANDS = (
    Subcommand("aws", "AWS operator helpers (open-ports: the security-group rules peer pods need)",
               "cloudadaptor.providers.aws.command"),
    Subcommand("azure", "Azure operator helpers (open-ports: the NSG rules peer pods need)",
               "cloudadaptor.providers.azure.command"),
    Subcommand("forwarder", f"(pod VM) agent-protocol-forwarder: mTLS on {AGENT_PORT} in front of the kata-agent",
               "cloudadaptor.podvm.forwarder"),
    Subcommand("pod-network", "(pod VM) join the VM's podns to the worker's pod network (VXLAN, from apf.json)",
               "cloudadaptor.podnetwork.vmside"),
    Subcommand("process-user-data", "(pod VM) fetch user data and write the allow-listed files",
               "cloudadaptor.podvm.process_user_data"),
    Subcommand("wait-for-claim", f"(pod VM) a warm-pool VM takes its pod config as one mTLS claim on {AGENT_PORT}",
               "cloudadaptor.podvm.claim"),
    Subcommand("image", "pod VM images: build peer-pod-ami / peer-pod-vmimage, list, delete",
               "cloudadaptor.imagebuild.command"),
    Subcommand("peerpod-controller", "delete VMs of PeerPods whose pod is gone; sweep unreferenced tagged VMs",
               "cloudadaptor.k8s.command", "build_controller_parser", "run_controller"),
    Subcommand("webhook", "mutating admission webhook for peer pods (HTTPS)", "cloudadaptor.webhook.command"),
    Subcommand("probe", "exit 0 when the adaptor answers on its hypervisor socket (startup probe)",
               "cloudadaptor.k8s.command", "build_probe_parser", "run_probe"),
    Subcommand("console", "print a pod VM's serial console (POD or SANDBOX_ID; secrets removed)",
               "cloudadaptor.adaptor.consolecmd"),
    Subcommand("diagnose", "write a support bundle (tar.gz): versions, config, sandboxes vs cloud VMs, tunnels, "
               "logs, consoles, metrics", "cloudadaptor.adaptor.diagnose"),
    Subcommand("demo", "run 3 peer pods end to end on the local provider, in a private namespace",
               "cloudadaptor.dev.demo"),
)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole CLI. Given ``argv``, only the chosen subcommand's module is imported
    (the others are listed with their help): ``serve`` never loads the image builder."""
    chosen = next((arg for arg in argv if not arg.startswith("-")), None) if argv is not None else None
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

    for subcommand in SUBCOMMANDS:
        if chosen is None or chosen == subcommand.name:
            subcommand.mount(sub)
        else:
            sub.add_parser(subcommand.name, help=subcommand.help)

    ver = sub.add_parser("version", help="print the version")
    ver.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
