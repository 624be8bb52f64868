"""The namespace VM's agent forked from its init, not exec'd, when it is a module of this Python.

An agent command ``<this interpreter> -m MODULE ARGS...`` (the default, the
development agent) would start a second interpreter per VM and import
MODULE's dependencies again. Instead the init forks an ``AgentZygote``
before its event loop starts (while it is still one thread, so the fork is
clean; no loop or thread is carried into it). The zygote waits on a pipe;
at the agent's step the init tells it to go, and it becomes the agent: a new
session, ``/dev/null`` as stdin, ``sys.argv`` as the command gives it, and
MODULE run as ``__main__``, as ``python -m`` would. Any other
agent command (a real kata-agent) is exec'd as before. The fork server
(``local_forkserver``) imports MODULE once and compiles its code once, so
each VM's agent starts with its modules loaded and runs that code
(``runpy`` would compile the source again in every agent where no bytecode
file is written).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import os
import runpy
import socket
import sys
import traceback
import types
from importlib.abc import InspectLoader
from importlib.machinery import ModuleSpec
from types import CodeType


def connectable(path: str) -> bool:
    """Whether the unix socket at ``path`` accepts a connection (the agent serves)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def module_of(argv: list[str]) -> str | None:
    """MODULE when ``argv`` is ``<this interpreter> -m MODULE ...``; else None."""
    if len(argv) < 3 or argv[1] != "-m":
        return None
    with contextlib.suppress(OSError):
        if os.path.samefile(argv[0], sys.executable):
            return argv[2]
    return None


# MODULE -> (its spec, its compiled code), made by ``preload`` in the fork server: without bytecode files
# (PYTHONDONTWRITEBYTECODE, a read-only install) runpy compiled MODULE's source again in every agent (~5 ms).
_COMPILED: dict[str, tuple[ModuleSpec, CodeType]] = {}


def preload(argv: list[str]) -> None:
    """Import the agent's module when it will be forked, and compile it once to run as ``__main__``
    (an import error is the agent's to report)."""
    module = module_of(argv)
    if module is None or module in _COMPILED:
        return
    with contextlib.suppress(Exception):
        if module not in sys.modules:
            importlib.import_module(module)
        spec = importlib.util.find_spec(module)
        code = spec.loader.get_code(module) if spec is not None and isinstance(spec.loader, InspectLoader) else None
        if spec is not None and code is not None:
            _COMPILED[module] = (spec, code)


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
        compiled = _COMPILED.get(module)
        if compiled is None:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            _run_as_main(*compiled)
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


def _run_as_main(spec: ModuleSpec, code: CodeType) -> None:
    """What ``runpy.run_module(name, run_name="__main__", alter_sys=True)`` does, with the code
    ``preload`` compiled: a fresh ``__main__`` module with the module's file, spec and loader,
    ``sys.argv[0]`` its file. (This process exits after it: nothing is restored.)"""
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=spec.origin, __cached__=spec.cached, __doc__=None, __loader__=spec.loader,
                         __package__=spec.parent, __spec__=spec)
    sys.modules["__main__"] = main
    sys.argv[0] = spec.origin or sys.argv[0]
    exec(code, main.__dict__)  # noqa: S102 - the module's own compiled code, as runpy runs it
