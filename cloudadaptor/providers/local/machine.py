"""The local cloud's plumbing, blocking (pyroute2 and processes): the bridge, a
VM's netns and veth, its init process, and their removal.

Everything is named after the instance id, so removal finds it even when
``instance.json`` is lost.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute, IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cloudadaptor import linuxns, netnsocket
from cloudadaptor.providers import local_vm
from cloudadaptor.providers.local_forkserver import ForkServer
from cloudadaptor.providers.base import ProviderError
from cloudadaptor.providers.local.config import LocalConfig

ID_PREFIX = "i-local-"
ID_PATTERN = re.compile(r"i-local-[0-9a-f]{12}")
VM_IFNAME = "eth0"
LAUNCH_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0  # SIGTERM, then SIGKILL
KILL_TIMEOUT = 5.0


def host_veth_name(instance_id: str) -> str:
    """The bridge-side veth of an instance: ``lc-<12 hex>`` (15 chars)."""
    return "lc-" + instance_id[len(ID_PREFIX):]


def netns_name(instance_id: str) -> str:
    return instance_id


def ensure_bridge(cfg: LocalConfig) -> int:
    """The bridge's index; created with the gateway address and up if missing."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=cfg.bridge)
        if not found:
            _tolerate(errno.EEXIST, ipr.link, "add", ifname=cfg.bridge, kind="bridge")
            found = ipr.link_lookup(ifname=cfg.bridge)
        index = found[0]
        linkinfo = ipr.get_links(index)[0].get("IFLA_LINKINFO")
        kind = linkinfo.get("IFLA_INFO_KIND") if linkinfo is not None else None
        if kind != "bridge":
            raise ProviderError(f"{cfg.bridge} exists and is not a bridge (kind {kind!r})")
        have = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)}
        if (str(cfg.gateway), cfg.cidr.prefixlen) not in have:
            _tolerate(errno.EEXIST, ipr.addr, "add", index=index, address=str(cfg.gateway),
                      prefixlen=cfg.cidr.prefixlen)
        ipr.link("set", index=index, state="up")
        return int(index)


def wire(cfg: LocalConfig, instance_id: str, ip: str) -> None:
    """The VM's netns, veth to the bridge, address and default route.

    Few netlink requests (issue 16: this runs for every pod): interfaces are found by name
    without one (``netnsocket.index_of``, where pyroute2 takes ~0.4 ms of CPU per lookup), the
    bridge re-made only when it vanished since ``ensure_bridge``; the veth is created enslaved
    and up in one request; the thread entering the VM's netns finds its end there; the requests
    run on pyroute2's ``AsyncIPRoute`` in one event loop (``netnsocket.run_async``)."""
    name = netns_name(instance_id)
    path = netnsocket.create_netns(name)
    bridge = netnsocket.index_of(cfg.bridge) or ensure_bridge(cfg)
    netnsocket.run_async(None, lambda ipr: ipr.link("add", ifname=host_veth_name(instance_id), kind="veth",
                                                    master=bridge, state="up",
                                                    peer={"ifname": VM_IFNAME, "net_ns_fd": name}))
    sock, index = netnsocket.socket_and(path, lambda: netnsocket.index_of(VM_IFNAME))
    try:
        if index is None:
            raise ProviderError(f"the veth end {VM_IFNAME} of local VM {instance_id} vanished from its netns")
        netnsocket.run_async(sock, lambda ipr: _configure_vm_end(ipr, index, ip, cfg))
    finally:
        sock.close()


async def _configure_vm_end(ipr: AsyncIPRoute, index: int, ip: str, cfg: LocalConfig) -> None:
    """In the VM's netns: lo up, the veth end's address, up, and the default route via the gateway."""
    await ipr.link("set", index=linuxns.LOOPBACK_IFINDEX, state="up")
    await ipr.addr("add", index=index, address=ip, prefixlen=cfg.cidr.prefixlen)
    await ipr.link("set", index=index, state="up")
    await ipr.route("add", dst="0.0.0.0/0", gateway=str(cfg.gateway))


def launch(cfg: LocalConfig, instance_id: str, directory: Path, forks: ForkServer) -> int:
    """Start the VM's init (a fork of ``forks`` running ``local_vm``'s launcher); returns its PID once
    it runs in its own namespaces. ProviderError (with the console's last lines) when it does not start."""
    argv = [
        "--instance-dir", str(directory),
        "--netns", linuxns.netns_path(netns_name(instance_id)),
        "--boot-delay", repr(cfg.boot_delay),
    ]
    if cfg.agent_command:
        argv += ["--agent-command", cfg.agent_command]
    with open(directory / local_vm.CONSOLE_LOG, "ab") as console:
        try:
            code = forks.launch(argv, console.fileno(), LAUNCH_TIMEOUT)
        except TimeoutError:
            raise ProviderError(f"local VM {instance_id} did not start within {LAUNCH_TIMEOUT:g}s") from None
        except OSError as exc:
            raise ProviderError(f"local VM {instance_id} could not be launched: {exc}") from None
    if code != 0:
        raise ProviderError(f"local VM {instance_id} failed to start (exit {code}): {console_tail(directory)}")
    return int((directory / local_vm.PID_FILE).read_text())


def console_tail(directory: Path, lines: int = 5) -> str:
    try:
        text = (directory / local_vm.CONSOLE_LOG).read_text(errors="replace")
    except OSError:
        return "<no console log>"
    return " | ".join(text.strip().splitlines()[-lines:]) or "<empty console log>"


def stop_vm(instance_id: str, directory: Path) -> None:
    """SIGTERM the VM's init, SIGKILL after 5 s; nothing when it does not run.
    ProviderError when it survives SIGKILL."""
    try:
        pid = int((directory / local_vm.PID_FILE).read_text())
    except (OSError, ValueError):
        return  # never launched (or already deleted)
    if not _is_vm_init(pid, directory):
        return
    for sig, timeout in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, KILL_TIMEOUT)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not alive(pid):
            return  # init gone: the kernel has ended its PID namespace
    raise ProviderError(f"local VM {instance_id} (pid {pid}) survived SIGKILL")


def unwire(instance_id: str) -> list[str]:
    """Delete the VM's veth and netns if they exist; the problems met."""
    problems: list[str] = []
    try:
        with IPRoute() as ipr:  # deleted by name: one request, ENODEV when it is gone already
            _tolerate(errno.ENODEV, ipr.link, "del", ifname=host_veth_name(instance_id))
    except (OSError, NetlinkError) as exc:
        problems.append(f"cannot delete veth {host_veth_name(instance_id)}: {exc}")
    try:
        netnsocket.remove_netns(netns_name(instance_id))
    except FileNotFoundError:
        pass
    except OSError as exc:
        problems.append(f"cannot delete netns {netns_name(instance_id)}: {exc}")
    return problems


# ----------------------------------------------------------------------- helpers


def _tolerate(code: int, fn: Any, *args: Any, **kwargs: Any) -> None:
    """Call a pyroute2 method, ignoring the netlink error ``code`` (EEXIST, ENODEV...)."""
    try:
        fn(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code != code:
            raise


def vm_environment() -> dict[str, str]:
    """What a VM inherits from the worker: enough to run Python, none of the
    adaptor's configuration or credentials (a cloud VM sees none of them)."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep or k.startswith("PYTHON")}


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie is dead: its PID namespace is already gone)."""
    return _proc_state(pid) not in (None, "Z", "X")


def _is_vm_init(pid: int, directory: Path) -> bool:
    """Whether ``pid`` is the running init of the VM in ``directory`` (not a reused PID): its ``/run``
    is the bind mount of ``<directory>/run`` (the directory's name is the unique instance id). A fork
    server's VM has the server's command line, so that cannot tell; an init exec'd by an older
    daemon (``local_vm`` with the directory among its arguments) is recognised too."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        if local_vm.MODULE.encode() in args and str(directory).encode() in args:
            return True
        with open(f"/proc/{pid}/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return False
    suffix = f"/{directory.name}/{local_vm.RUN_SUBDIR}"
    return any(len(m) > 4 and m[4] == "/run" and _unescape(m[3]).endswith(suffix) for m in mounts)


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)
