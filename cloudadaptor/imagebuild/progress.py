"""The build's progress display: step k/n, elapsed time, the tail of the remote output.

On a terminal (``live``) a status block is redrawn in place: the current
step with its elapsed time, the provisioning script's own step
(``==> [k/n] ...`` lines) and the last few lines of remote output. Anywhere
else (a Job's log) every line is printed once, remote lines indented with
``|``, so the log reads top to bottom. UI only: the builders call
``step``/``info``/``remote`` and never format output themselves.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections import deque
from typing import Callable, Sequence, TextIO

TAIL_LINES = 3
KEEP_LINES = 40  # remote lines kept for error messages
REMOTE_STEP = re.compile(r"^==> \[(\d+)/(\d+)\] (.*)$")


def clock_text(seconds: float) -> str:
    """``mm:ss`` (``h:mm:ss`` from an hour)."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Shows the build's steps (names given up front) on ``out``; see the module docstring."""

    def __init__(self, steps: Sequence[str], out: TextIO | None = None, *, live: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, tail_lines: int = TAIL_LINES) -> None:
        self.steps = list(steps)
        self.out = out if out is not None else sys.stderr
        self.live = bool(live if live is not None else getattr(self.out, "isatty", lambda: False)())
        self.clock = clock
        self.started = clock()
        self.current = 0
        self.step_started = self.started
        self.durations: dict[str, float] = {}
        self.remote_step = ""
        self._tail_lines = tail_lines
        self._kept: deque[str] = deque(maxlen=KEEP_LINES)
        self._drawn = 0

    # ------------------------------------------------------------ events

    def step(self, name: str) -> None:
        """Start the step called ``name`` (one of ``steps``)."""
        self._close_step()
        self.current = self.steps.index(name) + 1
        self.step_started = self.clock()
        self.remote_step = ""
        self._kept.clear()
        self._emit(f"[{self.current}/{len(self.steps)}] {name}  (elapsed {clock_text(self.step_started - self.started)})")

    def info(self, text: str) -> None:
        """A line of the builder's own (an id, an address)."""
        self._emit(f"      {text}")

    def remote(self, line: str) -> None:
        """One line of remote output."""
        line = line.rstrip()
        match = REMOTE_STEP.match(line)
        if match:
            self.remote_step = f"{match.group(1)}/{match.group(2)} {match.group(3)}"
        self._kept.append(line)
        if self.live:
            self._redraw()
        else:
            self._write(f"      | {line}\n")

    def finish(self, text: str) -> None:
        """The build is over (either way): the last line with the total time."""
        self._close_step()
        self._emit(f"{text}  (total {clock_text(self.clock() - self.started)})")

    def tail(self, count: int = 20) -> list[str]:
        """The last ``count`` remote lines of the current step (for error messages)."""
        return list(self._kept)[-count:]

    # ------------------------------------------------------------ drawing

    def _close_step(self) -> None:
        if self.current:
            self.durations[self.steps[self.current - 1]] = self.clock() - self.step_started
        if self.live:
            self._clear()

    def _emit(self, line: str) -> None:
        if self.live:
            self._clear()
        self._write(line + "\n")

    def _status(self) -> list[str]:
        elapsed = clock_text(self.clock() - self.step_started)
        head = f"[{self.current}/{len(self.steps)}] {self.steps[self.current - 1]}  {elapsed}"
        if self.remote_step:
            head += f"  remote step {self.remote_step}"
        return [head] + [f"      | {line}" for line in list(self._kept)[-self._tail_lines:]]

    def _redraw(self) -> None:
        width = max(shutil.get_terminal_size((100, 20)).columns - 1, 20)
        lines = [line[:width] for line in self._status()]
        self._clear()
        self._write("".join(line + "\n" for line in lines))
        self._drawn = len(lines)

    def _clear(self) -> None:
        if self._drawn:
            self._write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
