"""The development agent's container processes: spawn, reap, signal, read.

Each process starts as ``cloudadaptor.dev.nsexec`` starts it (a command: its
step run in the forked child; a pause process: the module itself) in its own
session (so a signal reaches its whole process group) and, when the container
names one, in its network namespace. Nothing else is isolated.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from cloudadaptor.dev import nsexec
from cloudadaptor.dev.nsexec import DEFAULT_PATH
from cloudadaptor.ttrpc.errors import Code, TtrpcError

log = logging.getLogger("cloudadaptor.devagent")

DRAIN_AFTER_EXIT = 0.5  # seconds


class BlockedCalls:
    """How many calls wait at each blocking point ("wait" for an exit, "start" for
    StartContainer), so a test can act once a call really waits instead of sleeping."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def at(self, point: str) -> AsyncIterator[None]:
        self.counts[point] += 1
        async with self._changed:
            self._changed.notify_all()
        try:
            yield
        finally:
            self.counts[point] -= 1

    async def until(self, point: str, calls: int = 1) -> None:
        """Block until at least ``calls`` calls wait at ``point``."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.counts[point] >= calls)


@dataclass(eq=False)
class Process:
    """One container process (the init or an exec) and its pipes."""

    container_id: str
    exec_id: str
    args: list[str]
    env: list[str]
    cwd: str
    netns: str | None
    proc: asyncio.subprocess.Process | None = None
    status: int | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    removed: bool = False
    stdout_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stderr_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stdin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def find_executable(args: list[str], env: list[str]) -> None:
    """Raise INTERNAL (runc's wording) when ``args[0]`` cannot be executed."""
    name = args[0]
    if "/" in name:
        if os.path.isfile(name) and os.access(name, os.X_OK):
            return
    else:
        path = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
        if shutil.which(name, path=path):
            return
    raise TtrpcError(Code.INTERNAL, f'exec: "{name}": executable file not found in $PATH')


async def spawn(process: Process) -> None:
    """Start ``process`` as ``cloudadaptor.dev.nsexec`` would, in its own session (and netns);
    INTERNAL when the command cannot be found or started. Sets ``started``; ``exited`` is set when it is reaped.

    A command runs nsexec's step (``enter_and_exec``) in the forked child itself: a fork, not a
    Python start-up per container (issue 16). A pause process runs ``nsexec --pause``."""
    env = process.env
    entries = list(env) if env else ["PATH=" + DEFAULT_PATH]
    cwd = process.cwd if process.cwd and os.path.isdir(process.cwd) else "/"
    argv = [sys.executable, "-m", "cloudadaptor.dev.nsexec", "--cwd", cwd]
    if process.netns:
        argv += ["--net", process.netns]
    argv += [*(f"--env={e}" for e in entries), "--pause"]
    in_child: Callable[[], None] | None = None
    if process.args:
        find_executable(process.args, env)
        argv = list(process.args)  # what the child becomes; enter_and_exec execs it after setns and chdir
        in_child = functools.partial(_enter_and_exec, process.netns, cwd, nsexec.build_env(entries), argv)
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _Protocol(process, loop),
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            preexec_fn=in_child,
        )
    except OSError as exc:
        raise TtrpcError(Code.INTERNAL, f"cannot start {process.args}: {exc}") from None
    process.proc = asyncio.subprocess.Process(transport, protocol, loop)
    process.started.set()
    log.info("started %s/%s pid %d: %s", process.container_id, process.exec_id,
             process.proc.pid, process.args or "<pause>")


def _enter_and_exec(net: str | None, cwd: str, env: dict[str, str], command: list[str]) -> None:
    """In the forked child (stdio already on the pipes, its own session): only stdio is
    inherited, as after nsexec's exec; then nsexec's step, which never returns."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    nsexec.enter_and_exec(net, cwd, env, command)


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Marks the process exited as soon as it is reaped. (asyncio's own
    ``Process.wait()`` also waits for the pipes to close, which a background
    child holding stdout would delay forever; kata reports the exit at once.)"""

    def __init__(self, process: Process, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=2**16, loop=loop)
        self._process = process

    def process_exited(self) -> None:
        returncode = self._transport.get_returncode() if self._transport is not None else None
        super().process_exited()  # may drop the transport: read the code first
        process = self._process
        process.status = exit_status(returncode if returncode is not None else -signal.SIGKILL)
        process.exited.set()
        log.info("%s/%s exited with status %d", process.container_id, process.exec_id, process.status)


def signal_group(process: Process, sig: int, even_if_exited: bool = False) -> None:
    """Signal the process's group (it leads its own session); an exited process is fine.

    ``even_if_exited`` also reaches what is left of the group after its leader
    exited (background children): used when removing a container.
    """
    if process.proc is None or (process.exited.is_set() and not even_if_exited):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.proc.pid, sig)


async def read_or_drain(stream: asyncio.StreamReader | None, size: int, exited: asyncio.Event) -> bytes:
    """Read up to ``size`` bytes; b"" at end of stream, or when nothing more came
    within DRAIN_AFTER_EXIT of the process exiting."""
    if stream is None:
        return b""
    read = asyncio.ensure_future(stream.read(size))
    exit_wait = asyncio.ensure_future(exited.wait())
    try:
        await asyncio.wait({read, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not read.done():
            await asyncio.wait({read}, timeout=DRAIN_AFTER_EXIT)
        if read.done():
            return read.result()
        return b""
    finally:
        for task in (read, exit_wait):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
