"""PID 1 of a namespace VM: boots the image's units in one interpreter.

``local_vm``'s launcher forks this init inside the VM's namespaces. It runs
the plan ``local_boot`` reads from the image's units, in that order, with
each unit's ``ExecStartPre=mkdir -p`` first. Our own VM-side steps run *in
this process* (each unit's main function, as its command would call it): a
VM then costs one interpreter, not one per unit, which is what lets many
VMs boot at once on a small worker. Only the agent (the kata-agent stand-in:
``LOCAL_AGENT_COMMAND`` or the development agent) is a separate process.

- ``user_data``: ``process_user_data.run`` (``--source file``); interrupted
  by SIGTERM between its retries;
- ``podns``: the netns ``podns`` with lo up (``netns@podns.service``); its
  netlink socket is kept for the pod network step;
- ``claim``: a warm-pool VM waits for its pod's config (``wait-for-claim``),
  loading the later steps' modules meanwhile;
- ``pod_network``: ``vmside.run`` (only after process-user-data succeeded),
  with that socket and apf.json as the claim step read it (no second parse);
- ``agent``: started in its own session, then wait for its socket;
- ``forwarder``: ``AgentProtocolForwarder`` served in this init's event loop
  (uvloop's, as the standalone forwarder's) only when process-user-data and
  the pod network succeeded: a pod without its network must not look healthy.

Blocking steps (files, netlink) run in one worker thread, in order, so signals
are handled meanwhile (one thread: pyroute2's ``IPRoute`` belongs to the thread that made it). Steps enter namespaces by threads (``netnsocket``), not
pyroute2's forked helpers; should a step's library still fork, the init reaps
only its own components while a step runs, and every other child (orphans) after.
Every step's lines go to the console (stdout/stderr) with its status.
On SIGTERM/SIGINT: the forwarder closes, the agent gets SIGTERM (SIGKILL
after a grace period), then the init exits and the kernel ends the PID
namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import os
import shlex
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from cloudadaptor import eventloop
from cloudadaptor.providers import local_boot, local_vmagent, local_vmpreload

# Paths inside the VM (its /run is the instance's own).
USER_DATA_PATH = "/run/cloud-data/user-data"
AGENT_SOCKET = "/run/kata-containers/agent.sock"
APF_CONFIG = "/run/peerpod/apf.json"
PODNS = "podns"

STEP_TIMEOUT = 120.0  # process-user-data's deadline
AGENT_SOCKET_TIMEOUT = 30.0
STOP_GRACE = 3.0


def log(message: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    print(f"{now.replace('+00:00', 'Z')} local-vm[{os.getpid()}]: {message}", flush=True)


class _Stopped(Exception):
    """SIGTERM arrived while a blocking step waited (raised from its sleep)."""


@dataclass
class _Component:
    name: str
    pid: int
    popen: subprocess.Popen | None = None  # None for a forked agent (local_vmagent)
    status: int | None = None


@dataclass
class VmInit:
    """PID 1 of a namespace VM (see the module docstring)."""

    boot_delay: float
    agent: list[str]
    plan: list[local_boot.BootStep]
    user_data_ok: bool = False
    network_ok: bool = False
    components: dict[int, _Component] = field(default_factory=dict)
    forwarder: Any = None
    zygote: local_vmagent.AgentZygote | None = None
    apf: Any = None  # apf.json as read (ForwarderConfig), until a claim rewrites it
    _in_step: bool = False
    _worker: ThreadPoolExecutor | None = None  # the blocking steps' one thread (made in the loop)
    _podns: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # owns _podns_ipr
    _podns_ipr: Any = None  # the podns step's IPRoute in podns, until the pod network step ends
    _halt: threading.Event = field(default_factory=threading.Event)  # seen by blocking steps' threads

    @property
    def stopping(self) -> bool:
        return self._halt.is_set()

    def run(self) -> int:
        from cloudadaptor.commandline import setup_logging

        setup_logging("info")  # the in-process steps log with `logging`, to the console
        if local_vmagent.module_of(self.agent) is not None:
            self.zygote = local_vmagent.AgentZygote(self.agent)  # before the loop: one thread, a clean fork
        with asyncio.Runner(loop_factory=eventloop.new_event_loop) as runner:  # the standalone forwarder's loop
            runner.run(self._main())
        return 0

    async def _main(self) -> None:
        os.register_at_fork(after_in_child=_plain_signals)
        # One thread runs every blocking step, in order: pyroute2's IPRoute belongs to the thread that
        # made it, so the podns socket made by the podns step serves the pod network step too.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vm-step")
        loop = asyncio.get_running_loop()
        self._stop, self._exits = asyncio.Event(), asyncio.Event()  # _exits: a component exited
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop)
        _on_sigchld(loop, self._reap)
        log(f"booting (boot delay {self.boot_delay:g}s)")
        try:
            await self._boot()
            await self._stop.wait()
        finally:
            await self._shutdown()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the loop closes next; the kernel ends the rest

    def _on_stop(self) -> None:
        self._halt.set()
        self._stop.set()

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` unless a stop comes first."""
        await self._pause_until(self._stop, seconds)

    @staticmethod
    async def _pause_until(event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), max(seconds, 0))

    async def _boot(self) -> None:
        await self._pause(self.boot_delay)
        for step in self.plan:
            if self.stopping:
                return
            for directory in step.make_dirs:  # the unit's ExecStartPre=mkdir -p
                os.makedirs(directory, exist_ok=True)
                log(f"{step.unit}: made {directory}")
            await getattr(self, "_step_" + step.step)()
        log("boot complete")

    async def _blocking(self, name: str, fn: Callable[..., int], *args: Any) -> bool:
        """Run a step's main function in a worker thread; True when it returns 0."""
        log(f"started {name} (in the init)")
        self._in_step = True
        try:
            status = await self._in_worker(fn, *args)
        except _Stopped:
            log(f"{name} stopped by shutdown")
            return False
        except Exception as exc:  # noqa: BLE001 - a failed step is logged; the VM keeps booting
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            return False
        finally:
            self._in_step = False
            self._reap()
        log(f"{name} exited with status {status}")
        return status == 0

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the steps' thread (see ``_main``)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, functools.partial(fn, *args))

    def _interruptible_sleep(self, seconds: float) -> None:
        if self._halt.wait(seconds):
            raise _Stopped()

    async def _step_user_data(self) -> None:
        from cloudadaptor.podvm import process_user_data

        args = argparse.Namespace(source="file", file=USER_DATA_PATH, imds_url=process_user_data.DEFAULT_IMDS_URL,
                                  deadline=f"{STEP_TIMEOUT:g}s", root="/")
        self.user_data_ok = await self._blocking(
            "process-user-data", process_user_data.run, args, self._interruptible_sleep)

    async def _step_claim(self) -> None:
        """peerpod-claim.service: a pool VM waits (no time limit, until shutdown) for its pod's
        config over mTLS, in the init's own loop; a VM booted for a pod goes on at once."""
        if not self.user_data_ok:
            return
        from pathlib import Path

        from cloudadaptor.podconfig import ForwarderConfig
        from cloudadaptor.podvm import claim

        try:
            config = ForwarderConfig.from_json(Path(APF_CONFIG).read_bytes())
        except (OSError, ValueError) as exc:
            log(f"wait-for-claim: {APF_CONFIG}: {exc}")
            self.user_data_ok = False
            return
        if not claim.is_pool_vm(config):
            self.apf = config  # the later steps use it as read here, not read and parsed twice more
            return
        log("wait-for-claim: a pool VM; waiting for its pod's config (mTLS)")
        # What runs after the claim loads now, while the VM is idle, not on a claimed pod's clock.
        preload = asyncio.ensure_future(self._in_worker(local_vmpreload.import_after_claim))
        waiting = asyncio.ensure_future(claim.wait_for_claim(config, Path("/"), "0.0.0.0", config.listen_port))
        stopped = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        with contextlib.suppress(Exception):  # an import error is the later steps' to report
            await preload
        if not waiting.done():
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            self.user_data_ok = False
            return
        try:
            waiting.result()
            log("wait-for-claim: claimed")
        except Exception as exc:  # noqa: BLE001 - the console says why; no pod network, no forwarder
            log(f"wait-for-claim failed: {type(exc).__name__}: {exc}")
            self.user_data_ok = False

    async def _step_podns(self) -> None:
        self._in_step = True
        try:
            await self._in_worker(self._create_podns)
        except Exception as exc:  # noqa: BLE001 - logged; the agent still starts
            log(f"cannot create netns {PODNS}: {exc}")
        finally:
            self._in_step = False
            self._reap()

    async def _step_pod_network(self) -> None:
        if not self.user_data_ok:
            log("pod-network not started: process-user-data did not succeed")
            return
        self.network_ok = await self._blocking("pod-network", self._pod_network)
        await self._in_worker(self._close_podns)

    def _pod_network(self) -> int:
        """vmside's command, with the podns step's socket and apf.json as read (in the steps' thread)."""
        from cloudadaptor.podnetwork import vmside

        args = argparse.Namespace(config=APF_CONFIG, podns=PODNS)
        return vmside.run(args, podns_ipr=self._podns_ipr, config=self.apf)

    def _close_podns(self) -> None:
        self._podns_ipr = None
        self._podns.close()

    def _create_podns(self) -> None:
        """netns@podns.service; its socket is kept for the pod network step (closed after it, or at shutdown)."""
        from cloudadaptor.podnetwork import vmside

        self._podns_ipr = self._podns.enter_context(vmside.create_podns(PODNS))
        log(f"created network namespace {PODNS} (/run/netns/{PODNS})")

    async def _step_agent(self) -> None:
        agent = self._start("agent", self.agent)
        if agent is not None:
            # The forwarder's modules load while the agent's own interpreter starts (on another CPU).
            preload = asyncio.create_task(self._in_worker(local_vmpreload.import_forwarder))
            await self._wait_socket(agent, AGENT_SOCKET, AGENT_SOCKET_TIMEOUT)
            with contextlib.suppress(Exception):  # an import error is the forwarder step's to report
                await preload

    async def _step_forwarder(self) -> None:
        if not self.network_ok:
            log("forwarder not started: process-user-data or the pod network did not succeed")
            return
        try:
            self.forwarder = await _start_forwarder(self.apf)
        except Exception as exc:  # noqa: BLE001 - the console says why; the VM stays up without it
            log(f"forwarder failed: {type(exc).__name__}: {exc}")
            return
        log(f"started forwarder (in the init) on port {self.forwarder.port}, kata-agent at {AGENT_SOCKET}")

    def _start(self, name: str, argv: list[str]) -> _Component | None:
        if self.zygote is not None:
            component = _Component(name, self.zygote.start())
            how = "forked from the init"
        else:
            try:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                log(f"cannot start {name} ({shlex.join(argv)}): {exc}")
                return None
            component, how = _Component(name, popen.pid, popen), "exec'd"
        self.components[component.pid] = component
        log(f"started {name} (pid {component.pid}, {how}): {shlex.join(argv)}")
        return component

    async def _wait_socket(self, component: _Component, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.stopping and component.status is None:
            if local_vmagent.connectable(path):
                log(f"{component.name} is serving on {path}")
                return
            if time.monotonic() >= deadline:
                log(f"{component.name} not serving on {path} after {timeout:g}s; going on")
                return
            await self._pause(0.01)

    def _reap(self) -> None:
        """Collect exited children: only components while a step's thread may own forked helpers."""
        pids = list(self.components) if self._in_step else [-1]
        for wanted in pids:
            while True:
                try:
                    pid, status = os.waitpid(wanted, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                self._exited(pid, status)
                if wanted != -1:
                    break

    def _exited(self, pid: int, status: int) -> None:
        component = self.components.pop(pid, None)
        if component is None:
            return  # an orphan of a component: reaped, as an init must
        component.status = os.waitstatus_to_exitcode(status)
        self._exits.set()
        if component.popen is not None:
            component.popen.returncode = component.status  # reaped here: Popen must not wait for it
        log(f"{component.name} (pid {pid}) exited with status {component.status}")

    async def _shutdown(self) -> None:
        log("shutting down")
        if self.zygote is not None:
            self.zygote.discard()  # when the agent's step never came
        if self.forwarder is not None:
            await self.forwarder.close()
            log("forwarder stopped")
        if self._worker is not None:  # a step still running is interrupted (_halt) or ends with the init
            self._worker.submit(self._close_podns)  # a pool VM stopped while waiting for its claim
            self._worker.shutdown(wait=False)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for component in list(self.components.values()):
                if sig == signal.SIGKILL:
                    log(f"{component.name} (pid {component.pid}) still running; killing it")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(component.pid, sig)
            deadline = time.monotonic() + STOP_GRACE
            while self.components and time.monotonic() < deadline:  # woken by SIGCHLD (_reap), not a 20 ms poll
                self._exits.clear()
                await self._pause_until(self._exits, min(0.1, deadline - time.monotonic()))
                self._reap()
        log("power off")  # the kernel kills whatever is left in the PID namespace


def _on_sigchld(loop: asyncio.AbstractEventLoop, reap: Callable[[], None]) -> None:
    """Schedule ``reap`` on each SIGCHLD. uvloop refuses ``add_signal_handler(SIGCHLD)`` (libuv's, for
    subprocesses the init never spawns), so a plain handler: the loop wakes on the wakeup fd it set up
    and runs it in the main thread; ``call_soon_threadsafe`` is safe there. System calls restart."""
    def handler(_signum: int, _frame: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the init is exiting
            loop.call_soon_threadsafe(reap)

    signal.signal(signal.SIGCHLD, handler)
    signal.siginterrupt(signal.SIGCHLD, False)


def _plain_signals() -> None:
    """In a child forked by a step (pyroute2's netns helpers): default signal handling.

    Inherited, the loop's handlers would write a SIGTERM the helper gets (pyroute2 ends
    them with it) into the init's wakeup socket, and the init would shut down."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)


async def _start_forwarder(config: Any = None) -> Any:
    """The agent-protocol-forwarder as its unit starts it (``config``: apf.json as read, None: read it), listening."""
    from pathlib import Path

    from cloudadaptor.podconfig import ForwarderConfig
    from cloudadaptor.podvm.certrenewal import ServerCertificate
    from cloudadaptor.podvm.forwarder import AgentProtocolForwarder

    if config is None:
        config = ForwarderConfig.from_json(Path(APF_CONFIG).read_bytes())
    certificate = ServerCertificate.from_config(config, Path(APF_CONFIG))
    if certificate is None:
        log(f"TLS is disabled in {APF_CONFIG}: the kata-agent is reachable without authentication")
    forwarder = AgentProtocolForwarder(kata_agent_socket=AGENT_SOCKET, certificate=certificate, port=config.listen_port)
    await forwarder.start()
    return forwarder

