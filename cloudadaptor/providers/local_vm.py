"""The init of a local pod VM: boots the real podvm components like the image would.

    python -m cloudadaptor.providers.local_vm --instance-dir DIR --netns PATH \\
        [--boot-delay SECONDS] [--agent-command CMD]

The local provider starts this as a *launcher*. The launcher enters the VM:
its network namespace (``--netns``), a new mount namespace (``/`` made
rprivate, every namespace mount inherited from the worker detached so the VM
pins none of them, ``<instance dir>/run`` bind-mounted on ``/run``) and a new
PID namespace. It forks the VM's init — PID 1 of that namespace, in its own
session — writes the init's PID to ``<instance dir>/init.pid`` and exits, so
the VM is not a child of the adaptor, as a cloud VM is not. Setup errors make
the launcher exit non-zero (and say why on the console).

The init, with stdout/stderr being the VM's console log, boots the image's
own units (``local_boot``: the order ``provision.py`` enables them in, and
each unit's ``ExecStartPre=mkdir -p``, e.g. ``/run/kata-containers`` before
the agent), logging every step with a timestamp:

1. sleep the boot delay (imitates a cloud boot);
2. ``process-user-data --source file --file /run/cloud-data/user-data``
   (writes /run/peerpod/apf.json etc.), then ``wait-for-claim`` (a warm-pool VM
   waits, without a time limit, for its pod config; other VMs go on at once);
3. the network namespace ``podns`` (``/run/netns/podns``, the VM's own), lo up;
   then the VM side of the pod network (``python -m cloudadaptor.podnetwork.vmside``:
   the VXLAN tunnel to the worker carrying the pod's interface into podns);
4. the agent (default: the development agent; ``--agent-command`` is a
   command line in which ``{socket}`` becomes the agent socket path), then
   wait for its socket;
5. ``agent-protocol-forwarder`` (only when steps 2 and 3 succeeded: a pod
   without its network must not look healthy).

It then supervises: a component that exits is logged (not restarted); orphans
are reaped. On SIGTERM/SIGINT it stops the components (SIGTERM to each
process group, SIGKILL after a grace period) and exits; the kernel then kills
whatever is left in the PID namespace, so nothing of the VM outlives its init
but the network namespace, which the provider deletes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from cloudadaptor import linuxns
from cloudadaptor.providers import local_boot

CLONE_NEWPID = 0x20000000

# Paths inside the VM (after /run is the instance's own).
USER_DATA_PATH = "/run/cloud-data/user-data"
AGENT_SOCKET = "/run/kata-containers/agent.sock"
APF_CONFIG = "/run/peerpod/apf.json"
PODNS = "podns"

# Paths in the instance directory.
RUN_SUBDIR = "run"
USER_DATA_SUBPATH = "run/cloud-data/user-data"
PID_FILE = "init.pid"
CONSOLE_LOG = "console.log"

MODULE = "cloudadaptor.providers.local_vm"
STEP_TIMEOUT = 120.0  # process-user-data, pod network
AGENT_SOCKET_TIMEOUT = 30.0
STOP_GRACE = 3.0


def default_agent_command() -> str:
    return shlex.join([sys.executable, "-m", "cloudadaptor.dev.devagent", "--socket", "{socket}"])


def agent_argv(command: str, socket_path: str = AGENT_SOCKET) -> list[str]:
    """``command`` split like a shell would, ``{socket}`` replaced in every word."""
    return [word.replace("{socket}", socket_path) for word in shlex.split(command)]


def log(message: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    print(f"{now.replace('+00:00', 'Z')} local-vm[{os.getpid()}]: {message}", flush=True)


# --------------------------------------------------------------------- launcher


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _detach_namespace_mounts() -> None:
    """Detach every nsfs mount (other VMs', pods') from this mount namespace."""
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in reversed(lines):
        fields = line.split()
        try:
            fstype = fields[fields.index("-") + 1]
        except (ValueError, IndexError):
            continue
        if fstype == "nsfs":
            try:
                linuxns.umount(_unescape(fields[4]))
            except OSError:
                pass  # locked or already gone: harmless, it only pins a namespace


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


# ------------------------------------------------------------------------- init


@dataclass
class _Component:
    name: str
    popen: subprocess.Popen
    status: int | None = None


@dataclass
class VmInit:
    """PID 1 of a local pod VM (see the module docstring). Single-threaded."""

    boot_delay: float
    agent: list[str]
    plan: list[local_boot.BootStep]
    python: str = sys.executable
    user_data_ok: bool = False
    network_ok: bool = False
    components: dict[int, _Component] = field(default_factory=dict)
    stopping: bool = False

    def run(self) -> int:
        self._wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        log(f"booting (boot delay {self.boot_delay:g}s)")
        try:
            self._boot()
            while not self.stopping:
                self._wait(1.0)
        finally:
            self._shutdown()
        return 0

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _boot(self) -> None:
        deadline = time.monotonic() + self.boot_delay
        while not self.stopping and time.monotonic() < deadline:
            self._wait(deadline - time.monotonic())
        for step in self.plan:
            if self.stopping:
                return
            for directory in step.make_dirs:  # the unit's ExecStartPre=mkdir -p
                os.makedirs(directory, exist_ok=True)
                log(f"{step.unit}: made {directory}")
            getattr(self, "_step_" + step.step)()
        log("boot complete")

    def _step_user_data(self) -> None:
        self.user_data_ok = self._run_step("process-user-data", [
            self.python, "-m", "cloudadaptor.podvm.process_user_data",
            "--source", "file", "--file", USER_DATA_PATH,
        ])

    def _step_claim(self) -> None:
        """peerpod-claim.service: a pool VM waits (no time limit) for its pod's config over mTLS; others go on."""
        self.user_data_ok = self.user_data_ok and self._run_step("wait-for-claim", [
            self.python, "-m", "cloudadaptor.podvm.claim", "--config", APF_CONFIG,
        ], timeout=None)

    def _step_podns(self) -> None:
        try:
            self._create_podns()
        except Exception as exc:  # noqa: BLE001 - logged; the agent still starts
            log(f"cannot create netns {PODNS}: {exc}")

    def _step_pod_network(self) -> None:
        self.network_ok = self.user_data_ok and self._run_step("pod-network", [
            self.python, "-m", "cloudadaptor.podnetwork.vmside", "--config", APF_CONFIG, "--podns", PODNS,
        ])

    def _step_agent(self) -> None:
        agent = self._start("agent", self.agent)
        if agent is not None:
            self._wait_socket(agent, AGENT_SOCKET, AGENT_SOCKET_TIMEOUT)

    def _step_forwarder(self) -> None:
        if self.network_ok:
            self._start("forwarder", [
                self.python, "-m", "cloudadaptor.podvm.forwarder",
                "--config", APF_CONFIG, "--kata-agent-socket", AGENT_SOCKET,
            ])
        else:
            log("forwarder not started: process-user-data or the pod network did not succeed")

    def _run_step(self, name: str, argv: list[str], timeout: float | None = STEP_TIMEOUT) -> bool:
        """Run a boot step to completion (killed after ``timeout``, None: never); True when it exits 0."""
        component = self._start(name, argv)
        if component is None:
            return False
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while component.status is None and not self.stopping and time.monotonic() < deadline:
            self._wait(min(deadline - time.monotonic(), 3600.0))
        if component.status is None:
            if not self.stopping:
                log(f"{name} still running after {timeout:g}s; killing it")
            self._signal(component, signal.SIGKILL)
            return False
        return component.status == 0

    def _create_podns(self) -> None:
        from pyroute2 import IPRoute, netns

        netns.create(PODNS)
        with IPRoute(netns=PODNS, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        log(f"created network namespace {PODNS} (/run/netns/{PODNS})")

    def _start(self, name: str, argv: list[str]) -> _Component | None:
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log(f"cannot start {name} ({shlex.join(argv)}): {exc}")
            return None
        component = _Component(name, popen)
        self.components[popen.pid] = component
        log(f"started {name} (pid {popen.pid}): {shlex.join(argv)}")
        return component

    def _wait_socket(self, component: _Component, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.stopping and component.status is None:
            if _connectable(path):
                log(f"{component.name} is serving on {path}")
                return
            if time.monotonic() >= deadline:
                log(f"{component.name} not serving on {path} after {timeout:g}s; going on")
                return
            self._wait(0.02)

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal arrives or ``timeout`` passes; reap children."""
        try:
            select.select([self._wake_r], [], [], max(timeout, 0))
        except InterruptedError:
            pass
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            component = self.components.pop(pid, None)
            if component is None:
                continue  # an orphan of a component: reaped, as an init must
            component.status = os.waitstatus_to_exitcode(status)
            component.popen.returncode = component.status
            log(f"{component.name} (pid {pid}) exited with status {component.status}")

    def _signal(self, component: _Component, sig: int) -> None:
        try:
            os.killpg(component.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _shutdown(self) -> None:
        log("shutting down")
        for component in list(self.components.values()):
            self._signal(component, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while self.components and time.monotonic() < deadline:
            self._wait(min(0.05, deadline - time.monotonic()))
        for component in list(self.components.values()):
            log(f"{component.name} (pid {component.popen.pid}) still running; killing it")
            self._signal(component, signal.SIGKILL)
        deadline = time.monotonic() + STOP_GRACE
        while self.components and time.monotonic() < deadline:
            self._wait(0.05)
        log("power off")  # the kernel kills whatever is left in the PID namespace


def _connectable(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


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
