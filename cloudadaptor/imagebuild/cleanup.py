"""The cleanup stack: every temporary cloud resource is removed on success, failure and Ctrl-C.

A build pushes the undo of each resource *before* it asks the cloud for it
(undos find their resource by name or tag, so a reply lost on the way still
gets cleaned up) and runs the stack in ``finally``. Undos run last-in
first-out, each one even when an earlier one failed; their errors are
collected and raised together as ``CleanupError`` — never swallowed.

While the stack runs, SIGINT and SIGTERM are held back (a second Ctrl-C
would otherwise abandon half the clean-up) and re-delivered as
``KeyboardInterrupt`` / ``Terminated`` once it is done. ``interruptible()``
turns SIGTERM (what Kubernetes sends at a Job's deadline) into ``Terminated``
so the same path runs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Callable, Iterator

log = logging.getLogger(__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a Job's deadline, ``kubectl delete``): handled like Ctrl-C."""


@dataclass(frozen=True)
class CleanupFailure:
    what: str
    error: str


class CleanupError(Exception):
    """Some undos failed: ``failures`` lists them; ``cause`` is the error that ended the build, if any."""

    def __init__(self, failures: list[CleanupFailure], cause: BaseException | None = None) -> None:
        self.failures = failures
        self.cause = cause
        lines = [f"clean-up failed for {len(failures)} temporary resource(s); remove them by hand:"]
        lines += [f"  {f.what}: {f.error}" for f in failures]
        if cause is not None:
            lines.insert(0, f"the build failed ({describe_cause(cause)}), then")
        super().__init__("\n".join(lines))


def describe_cause(exc: BaseException) -> str:
    if isinstance(exc, Terminated):
        return "terminated by SIGTERM"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return str(exc) or type(exc).__name__


@dataclass
class _Undo:
    what: str
    fn: Callable[[], None]
    on_success: bool


class CleanupStack:
    """Undos of temporary resources, run in reverse order by ``run`` (or on leaving ``with``).

    ``push(what, fn)``: ``fn`` must be idempotent (deleting what is gone is
    success). ``on_success=False`` marks an undo that only runs when the
    build failed (a half-made image).
    """

    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self._undos: list[_Undo] = []
        self._report = report or (lambda text: log.info("%s", text))
        self.held: list[int] = []  # signals that arrived while undos ran

    def push(self, what: str, fn: Callable[[], None], *, on_success: bool = True) -> None:
        self._undos.append(_Undo(what, fn, on_success))

    def __len__(self) -> int:
        return len(self._undos)

    def run(self, succeeded: bool) -> list[CleanupFailure]:
        """Run every undo (newest first) once; returns the failures.

        SIGINT/SIGTERM arriving meanwhile are recorded in ``held`` (not raised).
        """
        failures: list[CleanupFailure] = []
        with _signals_held(self.held):
            while self._undos:
                undo = self._undos.pop()
                if succeeded and not undo.on_success:
                    continue
                self._report(f"removing {undo.what}")
                try:
                    undo.fn()
                except Exception as exc:  # noqa: BLE001 - collected and reported, not swallowed
                    log.debug("undo of %s failed", undo.what, exc_info=True)
                    failures.append(CleanupFailure(undo.what, str(exc) or type(exc).__name__))
        return failures

    def __enter__(self) -> CleanupStack:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        failures = self.run(succeeded=exc is None)
        if failures:
            raise CleanupError(failures, exc or _interrupt(self.held)) from exc
        if exc is None and self.held:
            raise _interrupt(self.held) or KeyboardInterrupt()


def _interrupt(held: list[int]) -> KeyboardInterrupt | None:
    """The exception a held signal stands for (the first one), None when none came."""
    if not held:
        return None
    return Terminated() if held[0] == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def _signals_held(arrived: list[int]) -> Iterator[None]:
    """Hold SIGINT/SIGTERM back until the block is done, appending each to ``arrived``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def hold(signum: int, frame: object) -> None:
        arrived.append(signum)
        log.warning("cleaning up temporary resources first; please wait")

    for sig in previous:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread (like Ctrl-C raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
