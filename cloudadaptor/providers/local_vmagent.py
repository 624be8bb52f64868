"""The namespace VM's agent forked from its init, not exec'd, when it is a module of this Python.

An agent command ``<this interpreter> -m MODULE ARGS...`` (the default, the
development agent) would start a second interpreter per VM and import
MODULE's dependencies again. Instead the init forks an ``AgentZygote``
before its event loop starts (while it is still one thread, so the fork is
clean; no loop or thread is carried into it). The zygote waits on a pipe;
at the agent's step the init tells it to go, and it becomes the agent: a new
session, ``/dev/null`` as stdin, ``sys.argv`` as the command gives it, and
MODULE run as ``__main__`` (``runpy``), as ``python -m`` would. Any other
agent command (a real kata-agent) is exec'd as before. The fork server
(``local_forkserver``) imports MODULE once, so each VM's agent starts with
its modules loaded.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import runpy
import sys
import traceback


def module_of(argv: list[str]) -> str | None:
    """MODULE when ``argv`` is ``<this interpreter> -m MODULE ...``; else None."""
    if len(argv) < 3 or argv[1] != "-m":
        return None
    with contextlib.suppress(OSError):
        if os.path.samefile(argv[0], sys.executable):
            return argv[2]
    return None


def preload(argv: list[str]) -> None:
    """Import the agent's module when it will be forked (an import error is the agent's to report)."""
    module = module_of(argv)
    if module is not None and module not in sys.modules:
        with contextlib.suppress(Exception):
            importlib.import_module(module)


class AgentZygote:
    """A fork of the init waiting to become the agent (see the module docstring)."""

    def __init__(self, argv: list[str]) -> None:
        module = module_of(argv)
        if module is None:
            raise ValueError(f"not a Python module command: {argv}")
        read_end, self._go = os.pipe()
        gc.freeze()  # as the fork server does: the agent's collections leave the init's pages shared
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self._go)
            _wait_and_run(read_end, module, argv[3:])  # never returns
        os.close(read_end)

    def start(self) -> int:
        """Let the agent run; its pid."""
        self.discard(b"g")
        return self.pid

    def discard(self, message: bytes = b"") -> None:
        """Without ``message``: the agent is not wanted, the zygote exits. Idempotent."""
        if self._go < 0:
            return
        with contextlib.suppress(OSError):
            if message:
                os.write(self._go, message)
        os.close(self._go)
        self._go = -1


def _wait_and_run(read_end: int, module: str, args: list[str]) -> None:
    code: int = 0
    try:
        go = os.read(read_end, 1)
        os.close(read_end)
        if go != b"g":
            os._exit(0)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.argv = [module, *args]
        sys.modules.pop(module, None)  # run afresh as __main__; its imports stay loaded
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the console must say why the agent died
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
