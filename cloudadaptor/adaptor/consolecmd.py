"""`cloud-api-adaptor console POD|SANDBOX_ID`: print a pod VM's serial console, secrets removed.

The target is a sandbox id (or a prefix of at least 8 characters), ``namespace/pod``
or a pod name; it is looked up in the state store, then among the VMs tagged
for this node (a VM the store no longer knows). Exit 1 when the console cannot
be read (the reason is printed), 2 for bad settings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from cloudadaptor.adaptor.console import scrub, secret_lines, tail
from cloudadaptor.adaptor.store import Sandbox, SandboxStore
from cloudadaptor.config import Settings
from cloudadaptor.providers import base as providers


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="POD|SANDBOX_ID", help="namespace/pod, pod name, or sandbox id (prefix of 8+)")
    parser.add_argument("--lines", "-n", type=int, default=0, help="only the last N lines (default: all)")


def run(args: argparse.Namespace) -> int:
    from cloudadaptor.commandline import load_settings_or_report

    settings = load_settings_or_report("console")
    if settings is None:
        return 2
    code, text = asyncio.run(console(settings, args.target, args.lines))
    print(text, file=sys.stdout if code == 0 else sys.stderr)
    return code


def find(sandboxes: list[Sandbox], target: str) -> list[Sandbox]:
    """The sandboxes ``target`` names (id, id prefix, ns/pod, or pod name)."""
    if "/" in target:
        return [s for s in sandboxes if f"{s.pod_namespace}/{s.pod_name}" == target]
    exact = [s for s in sandboxes if s.id == target or s.pod_name == target]
    if exact or len(target) < 8:
        return exact
    return [s for s in sandboxes if s.id.startswith(target)]


async def console(settings: Settings, target: str, lines: int = 0) -> tuple[int, str]:
    """(exit code, text to print) for ``target``."""
    store_path = settings.state_dir / "state.db"
    sandboxes: list[Sandbox] = []
    if store_path.exists():
        store = SandboxStore(store_path)
        try:
            sandboxes = store.all()
        finally:
            store.close()
    matches = find(sandboxes, target)
    if len(matches) > 1:
        return 1, f"{target!r} names {len(matches)} sandboxes: {', '.join(s.id for s in matches)}; give a sandbox id"
    provider = providers.create_provider(settings)
    try:
        if matches:
            sandbox = matches[0]
            if not sandbox.instance_id:
                return 1, (f"sandbox {sandbox.id} ({sandbox.state.value}) has no VM now"
                           f"{': ' + sandbox.error if sandbox.error else ''}; a failed VM's last console lines are "
                           f"in its PodVMFailed event and the daemon's log")
            instance_id, user_data = sandbox.instance_id, sandbox.user_data
        else:
            tag = providers.TAG_POD if "/" in target else providers.TAG_SANDBOX
            owned = await provider.list_owned({providers.TAG_NODE: settings.node_name, tag: target})
            if not owned:
                return 1, f"no sandbox or VM of this node ({settings.node_name}) matches {target!r}"
            instance_id, user_data = owned[0].id, ""
        try:
            text = await provider.console_output(instance_id)
        except providers.ConsoleUnavailable as exc:
            return 1, f"console not available: {exc}"
        clean = scrub(text, secret_lines(user_data))
        return 0, "\n".join(tail(clean, lines)) if lines > 0 else clean.rstrip("\n")
    finally:
        await provider.close()
