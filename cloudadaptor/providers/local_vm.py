"""The init of a local pod VM: boots the real podvm components like the image would.

    python -m cloudadaptor.providers.local_vm --instance-dir DIR --netns PATH \\
        [--boot-delay SECONDS] [--agent-command CMD]

The local provider runs this as a *launcher*: ``main(argv)`` in a fork of its
fork server (``local_forkserver``, which has imported everything a VM runs),
with the same arguments and effect as the command above. The launcher enters the VM:
its network namespace (``--netns``), a new mount namespace (``/`` made
rprivate, every namespace mount inherited from the worker detached so the VM
pins none of them, ``<instance dir>/run`` bind-mounted on ``/run``) and a new
PID namespace. It forks the VM's init — PID 1 of that namespace, in its own
session — writes the init's PID to ``<instance dir>/init.pid`` and exits, so
the VM is not a child of the adaptor, as a cloud VM is not. Setup errors make
the launcher exit non-zero (and say why on the console).

The init (``local_vminit``), with stdout/stderr being the VM's console log,
boots the image's own units (``local_boot``: the order ``provision.py``
enables them in, and each unit's ``ExecStartPre=mkdir -p``, e.g.
``/run/kata-containers`` before the agent), logging every step with a
timestamp: after the boot delay (it imitates a cloud boot),
process-user-data, the netns ``podns``, the VM side of the pod network and
the agent-protocol-forwarder run *inside the init* (one interpreter per VM);
the agent (default: the development agent; ``--agent-command`` is a command
line in which ``{socket}`` becomes the agent socket path) is its own
process. The steps' modules are imported only when they run, never by the adaptor
(which imports this module for its constants).

It then supervises: a component that exits is logged (not restarted); orphans
are reaped. On SIGTERM/SIGINT it stops the forwarder and the agent (SIGTERM to
its process group, SIGKILL after a grace period) and exits; the kernel then kills
whatever is left in the PID namespace, so nothing of the VM outlives its init
but the network namespace, which the provider deletes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import shlex
import sys
import traceback
from pathlib import Path

from cloudadaptor import linuxns
from cloudadaptor.providers import local_boot
from cloudadaptor.providers.local_vminit import AGENT_SOCKET, VmInit, log

CLONE_NEWPID = 0x20000000

# Paths in the instance directory.
RUN_SUBDIR = "run"
USER_DATA_SUBPATH = "run/cloud-data/user-data"
PID_FILE = "init.pid"
CONSOLE_LOG = "console.log"

MODULE = "cloudadaptor.providers.local_vm"


def default_agent_command() -> str:
    return shlex.join([sys.executable, "-m", "cloudadaptor.dev.devagent", "--socket", "{socket}"])


def agent_argv(command: str, socket_path: str = AGENT_SOCKET) -> list[str]:
    """``command`` split like a shell would, ``{socket}`` replaced in every word."""
    return [word.replace("{socket}", socket_path) for word in shlex.split(command)]


def agent_argv_of(argv: list[str]) -> list[str]:
    """The agent command line a launch with these arguments runs (the fork server preloads its modules)."""
    return agent_argv(_parser().parse_args(argv).agent_command)


def boot_plan_of(argv: list[str]) -> list[local_boot.BootStep]:
    """The boot plan a launch with these arguments reads (the fork server reads it first: its
    launchers then find it read, ``local_boot.load``)."""
    podvm_files = _parser().parse_args(argv).podvm_files
    return local_boot.load(Path(podvm_files) if podvm_files else None)


# --------------------------------------------------------------------- launcher


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # compiled at import (in the fork server), not in every launcher


def _unescape(text: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def _mounts() -> dict[str, tuple[str, str, str]]:
    """This mount namespace's mounts: id -> (parent id, mount point, filesystem type)."""
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    mounts = {}
    for line in lines:
        fields = line.split()
        try:
            mounts[fields[0]] = (fields[1], _unescape(fields[4]), fields[fields.index("-") + 1])
        except (ValueError, IndexError):
            continue
    return mounts


def _detach_namespace_mounts() -> None:
    """Detach every nsfs mount (other VMs', pods') from this mount namespace.

    Each unmount waits for an RCU grace period, so one per netns made every VM's launch
    slower the more pods the worker had (issue 16). A directory holding nothing but nsfs
    mounts on its own mount (``/run/netns``: ``ip netns`` and pyroute2 bind-mount it on
    itself) is therefore detached with all of them at once; detaching it hides nothing else.
    Any other nsfs mount is detached on its own."""
    mounts = _mounts()
    children: dict[str, list[str]] = {}
    for mount_id, (parent, _, _) in mounts.items():
        children.setdefault(parent, []).append(mount_id)
    detached: set[str] = set()
    for mount_id, kids in children.items():
        if mount_id not in mounts or mounts[mount_id][2] == "nsfs" or len(kids) < 2:
            continue
        point = mounts[mount_id][1]
        if any(mounts[kid][2] != "nsfs" for kid in kids) or not _holds_only(point, [mounts[k][1] for k in kids]):
            continue
        with contextlib.suppress(OSError):  # locked or gone: its mounts are detached one by one below
            linuxns.umount(point)
            detached.update(kids)
    for mount_id in reversed(list(mounts)):
        _, point, fstype = mounts[mount_id]
        if fstype == "nsfs" and mount_id not in detached:
            try:
                linuxns.umount(point)
            except OSError:
                pass  # locked or already gone: harmless, it only pins a namespace


def _holds_only(directory: str, mount_points: list[str]) -> bool:
    """Every entry of ``directory`` is one of ``mount_points``."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return False
    return {os.path.join(directory, entry) for entry in entries} <= set(mount_points)


def enter_vm(instance_dir: str, netns: str) -> None:
    """Join the VM's netns and give this process its own mount + PID namespaces."""
    run_dir = os.path.join(instance_dir, RUN_SUBDIR)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} does not exist")
    linuxns.setns(netns, linuxns.CLONE_NEWNET)
    linuxns.unshare(linuxns.CLONE_NEWNS | CLONE_NEWPID)
    linuxns.mount("none", "/", None, linuxns.MS_REC | linuxns.MS_PRIVATE)
    _detach_namespace_mounts()
    linuxns.mount(run_dir, "/run", None, linuxns.MS_BIND | linuxns.MS_REC)


def _launch(args: argparse.Namespace) -> int:
    instance_dir = os.path.abspath(args.instance_dir)
    try:
        plan = local_boot.load(Path(args.podvm_files) if args.podvm_files else None)
    except local_boot.BootPlanError as exc:
        log(f"cannot boot the image's units: {exc}")
        return 1
    dir_fd = os.open(instance_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        enter_vm(instance_dir, args.netns)
    except OSError as exc:
        log(f"cannot enter the VM: {exc}")
        return 1
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # PID 1 of the VM
        os.close(ready_r)
        os.close(dir_fd)
        code = 1
        try:
            os.setsid()
            os.close(ready_w)
            code = VmInit(args.boot_delay, agent_argv(args.agent_command), plan).run()
        except BaseException:  # noqa: BLE001 - the console must say why the VM died
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(ready_w)
    os.read(ready_r, 1)  # EOF once the init has its own session
    os.close(ready_r)
    tmp = PID_FILE + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid}\n")
    os.rename(tmp, PID_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.close(dir_fd)
    return 0


@functools.cache  # built once, in the fork server (which parses each launch's arguments too), not per launch
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="local_vm", description="init of a local pod VM")
    parser.add_argument("--instance-dir", required=True)
    parser.add_argument("--netns", required=True, help="the VM's network namespace path")
    parser.add_argument("--boot-delay", type=float, default=0.0, help="seconds")
    parser.add_argument("--agent-command", default=default_agent_command(),
                        help="agent command line; {socket} becomes the agent socket path")
    parser.add_argument("--podvm-files", help="the images/podvm directory whose units give the boot order "
                        "(default: the checkout's, else the shipped copy)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return _launch(_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
