"""`cloud-api-adaptor diagnose` and `cloud-api-adaptor console`: what an operator attaches to a support case.

``diagnose`` writes one ``tar.gz`` (``cloud-api-adaptor-diagnose-<node>-<UTC
time>.tar.gz`` in the current directory, or ``--output``) holding:

- ``versions.txt``: ours, Python's, the SDKs'.
- ``config.txt``: ``config check`` (secrets masked).
- ``sandboxes.json``: the state store's rows, without user data (it holds the
  VM's TLS key) and without the init-data annotation.
- ``vms.json``: the provider's VMs tagged for this node beside the store's,
  with the difference: ``orphans`` (in the cloud, no record) and ``missing``
  (recorded, not in the cloud).
- ``network.txt``: the ``ppvx*`` tunnel devices and each sandbox's tc filters.
- ``log.txt``: the last ``--log-lines`` lines of the daemon's log file.
- ``consoles.txt``: console tails of VMs whose sandbox failed or is starting.
- ``metrics.txt``: a scrape of the running daemon's ``/metrics``.

Every text is passed through ``console.scrub`` with the secrets this node
knows (the configured secret keys' values, the TLS keys in the user data), so
nothing secret leaves in the bundle. A part that cannot be gathered says why
in its own file; the bundle is written anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import io
import json
import os
import platform
import tarfile
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

from cloudadaptor import __version__
from cloudadaptor.adaptor.console import console_tail, scrub, secret_lines
from cloudadaptor.adaptor.store import Sandbox, SandboxState, SandboxStore
from cloudadaptor.adaptor.validation import ANN_INITDATA
from cloudadaptor.config import Settings
from cloudadaptor.providers import base as providers

DEFAULT_LOG_LINES = 2000
SDKS = ("boto3", "botocore", "azure-core", "azure-mgmt-core", "azure-identity", "kubernetes_asyncio", "pyroute2", "prometheus-client")


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", help="where to write the tar.gz (default: ./cloud-api-adaptor-diagnose-<node>-<time>.tar.gz)")
    parser.add_argument("--log-lines", type=int, default=DEFAULT_LOG_LINES, help="log lines to include (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from cloudadaptor.commandline import load_settings_or_report

    settings = load_settings_or_report("diagnose")
    if settings is None:
        return 2
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    output = Path(args.output or f"cloud-api-adaptor-diagnose-{settings.node_name}-{stamp}.tar.gz")
    parts = asyncio.run(gather(settings, dict(os.environ), args.log_lines))
    write_bundle(output, parts)
    print(f"wrote {output} ({', '.join(sorted(parts))})")
    return 0


def known_secrets(settings: Settings, env: dict[str, str], sandboxes: list[Sandbox]) -> set[str]:
    """Every value the bundle must not contain: secret keys' values and the VMs' key material."""
    from cloudadaptor.config import COMMON_SECRET_KEYS, common_keys

    names = set(COMMON_SECRET_KEYS) | {k.name for k in common_keys() if k.secret}
    try:
        names |= {k.name for k in providers.load_provider_class(settings.cloud_provider).config_type.keys() if k.secret}
    except Exception:  # an unloadable provider is reported by config check
        pass
    found = {env[name].strip() for name in names if env.get(name, "").strip()}
    for sandbox in sandboxes:
        found |= secret_lines(sandbox.user_data)
    return {s for s in found if len(s) >= 4}


async def gather(settings: Settings, env: dict[str, str], log_lines: int) -> dict[str, str]:
    """Every part of the bundle as text (already scrubbed), by file name."""
    store_path = settings.state_dir / "state.db"
    sandboxes: list[Sandbox] = []
    parts: dict[str, str] = {}
    if store_path.exists():
        store = SandboxStore(store_path)
        try:
            sandboxes = store.all()
        finally:
            store.close()
    else:
        parts["sandboxes.json"] = f"no state store at {store_path}\n"
    parts["versions.txt"] = _versions()
    parts["config.txt"] = _config(env)
    parts.setdefault("sandboxes.json", json.dumps([_row(s) for s in sandboxes], indent=2) + "\n")
    vms, consoles = await _cloud(settings, sandboxes)
    parts["vms.json"], parts["consoles.txt"] = vms, consoles
    parts["network.txt"] = await asyncio.to_thread(_network, sandboxes)
    parts["log.txt"] = _log_tail(settings.log_file, log_lines)
    parts["metrics.txt"] = await asyncio.to_thread(_scrape, settings)
    secrets = known_secrets(settings, env, sandboxes)
    return {name: scrub(text, secrets) for name, text in parts.items()}


def write_bundle(output: Path, parts: dict[str, str]) -> None:
    """The tar.gz, under one top directory named after the file, mode 0600."""
    top = output.name.removesuffix(".tar.gz")
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, text in sorted(parts.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode = len(data), 0o600
            info.mtime = int(_dt.datetime.now(_dt.timezone.utc).timestamp())
            tar.addfile(info, io.BytesIO(data))


def _versions() -> str:
    lines = [f"cloud-api-adaptor {__version__}", f"python {platform.python_version()}", f"platform {platform.platform()}"]
    for name in SDKS:
        try:
            lines.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{name} not installed")
    return "\n".join(lines) + "\n"


def _config(env: dict[str, str]) -> str:
    from cloudadaptor.config import check

    rows, problems = check(env)
    width = max((len(key) for key, _, _ in rows), default=10)
    text = "".join(f"{key:<{width}}  {value}  ({source})\n" for key, value, source in rows)
    return text + "".join(f"problem: {p}\n" for p in problems) + ("configuration OK\n" if not problems else "")


def _row(sandbox: Sandbox) -> dict[str, Any]:
    annotations = {k: ("<omitted>" if k == ANN_INITDATA else v) for k, v in sandbox.annotations.items()}
    return {
        "id": sandbox.id, "pod": f"{sandbox.pod_namespace}/{sandbox.pod_name}", "state": sandbox.state.value,
        "instance_id": sandbox.instance_id, "vm_name": sandbox.vm_name, "vm_ips": list(sandbox.vm_ips),
        "vni": sandbox.vni, "error": sandbox.error, "netns_path": sandbox.netns_path,
        "created_at": sandbox.created_at, "updated_at": sandbox.updated_at, "annotations": annotations,
    }


async def _cloud(settings: Settings, sandboxes: list[Sandbox]) -> tuple[str, str]:
    """(vms.json, consoles.txt): the provider's view of this node beside the store's."""
    try:
        provider = providers.create_provider(settings)
    except Exception as exc:
        return json.dumps({"error": f"provider not usable: {exc}"}) + "\n", f"provider not usable: {exc}\n"
    try:
        try:
            owned = await provider.list_owned({providers.TAG_OWNER: providers.OWNER_VALUE,
                                               providers.TAG_NODE: settings.node_name})
        except Exception as exc:
            owned, listing_error = [], f"listing VMs failed: {exc}"
        else:
            listing_error = ""
        recorded = {s.instance_id: s.id for s in sandboxes if s.instance_id}
        known_ids = {s.id for s in sandboxes}
        cloud = [{"id": i.id, "name": i.name, "ips": list(i.ips), "sandbox_id": i.tags.get(providers.TAG_SANDBOX, ""),
                  "pod": i.tags.get(providers.TAG_POD, "")} for i in owned]
        report = {
            "node": settings.node_name, "provider": settings.cloud_provider, "error": listing_error,
            "cloud": cloud, "store": [{"sandbox_id": sid, "instance_id": iid} for iid, sid in recorded.items()],
            "orphans": [vm for vm in cloud if vm["sandbox_id"] not in known_ids],
            "missing": [] if listing_error else
            [{"sandbox_id": sid, "instance_id": iid} for iid, sid in recorded.items() if iid not in {i.id for i in owned}],
        }
        consoles = []
        for sandbox in sandboxes:
            if sandbox.instance_id and sandbox.state in (SandboxState.FAILED, SandboxState.STARTING):
                tail_text = await console_tail(provider, sandbox.instance_id, sandbox.user_data)
                consoles.append(f"== sandbox {sandbox.id} ({sandbox.state.value}): {sandbox.error}\n{tail_text}\n")
        failed_without_vm = [s for s in sandboxes if s.state is SandboxState.FAILED and not s.instance_id]
        consoles += [f"== sandbox {s.id} (failed, VM deleted): {s.error}\n" for s in failed_without_vm]
        return json.dumps(report, indent=2) + "\n", "".join(consoles) or "no failed or starting VMs\n"
    finally:
        await provider.close()


def _network(sandboxes: list[Sandbox]) -> str:
    """The worker's tunnel devices and, per sandbox, the tc filters on its pod interface."""
    try:
        from pyroute2 import IPRoute

        from cloudadaptor.podnetwork import tunnel
        from cloudadaptor.podnetwork.api import DEVICE_PREFIX
        from cloudadaptor.podnetwork.netns import open_netns
    except ImportError as exc:
        return f"network tools unavailable: {exc}\n"
    lines = []
    try:
        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = link.get("IFLA_IFNAME") or ""
                if name.startswith(DEVICE_PREFIX):
                    lines.append(f"device {name} index {link['index']} state {link.get('IFLA_OPERSTATE')} mtu {link.get('IFLA_MTU')}")
    except Exception as exc:
        lines.append(f"listing tunnel devices failed: {exc}")
    for sandbox in sandboxes:
        if not sandbox.pod_network:
            continue
        name = sandbox.pod_network.pod.name
        try:
            with open_netns(sandbox.netns_path) as ipr:
                index = ipr.link_lookup(ifname=name)
                filters = tunnel.ingress_filters(ipr, index[0]) if index else []
            lines.append(f"sandbox {sandbox.id} {sandbox.netns_path} {name}: {len(filters)} tc filter(s) {filters}")
        except Exception as exc:
            lines.append(f"sandbox {sandbox.id} {sandbox.netns_path}: cannot inspect ({exc})")
    return "\n".join(lines) + "\n" if lines else "no tunnel devices\n"


def _log_tail(path: Path, lines: int) -> str:
    texts = []
    for candidate in (path.with_name(path.name + ".1"), path):
        try:
            texts.append(candidate.read_text(errors="replace"))
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"log file {candidate} unreadable: {exc}\n"
    if not texts:
        return f"no log file at {path} (written by `serve`)\n"
    return "\n".join("".join(texts).splitlines()[-lines:]) + "\n"


def _scrape(settings: Settings) -> str:
    host = "127.0.0.1" if settings.probe_address in ("0.0.0.0", "::") else settings.probe_address
    url = f"http://{host}:{settings.probe_port}/metrics" if ":" not in host else f"http://[{host}]:{settings.probe_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own endpoint
            return str(response.read().decode(errors="replace"))
    except OSError as exc:
        return f"metrics not scraped from {url}: {exc}\n"
