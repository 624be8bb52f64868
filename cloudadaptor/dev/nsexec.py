"""Run a command inside a network namespace: setns, then exec (test/dev helper).

    python -m cloudadaptor.dev.nsexec [--net PATH] [--cwd DIR] [--env K=V ...] -- CMD [ARGS...]
    python -m cloudadaptor.dev.nsexec [--net PATH] --pause

The development agent starts every container process through this helper, so
the process lives in the container's network namespace and nothing else is
isolated. ``--env`` replaces the environment entirely (the OCI process
environment); without any ``--env`` the current one is kept. A ``PATH`` is
added when the given environment has none, as runc does for lookups.
``--pause`` sleeps until a signal ends it (the sandbox's pause container).

Exit status: the command's own (this process is replaced by it), 127 when
the command cannot be found or executed, 126 when setns/chdir fails.

``enter_and_exec`` is the same step without the interpreter: the development
agent runs it in the forked child of its ``subprocess`` spawn (``preexec_fn``),
so a container command costs a fork, not a Python start-up (issue 16); only
``--pause`` (which has no command to become) still runs this module.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from cloudadaptor import linuxns

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsexec", description="exec a command in a network namespace")
    parser.add_argument("--net", help="network namespace path (e.g. /run/netns/podns)")
    parser.add_argument("--cwd", help="working directory for the command")
    parser.add_argument("--env", action="append", default=None, metavar="K=V",
                        help="environment entry (repeatable); replaces the environment")
    parser.add_argument("--pause", action="store_true", help="sleep until signalled instead of a command")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    return parser


def build_env(entries: list[str] | None) -> dict[str, str]:
    """The command's environment: ``entries`` ("K=V") when given, else ours; PATH ensured."""
    if entries is None:
        env = dict(os.environ)
    else:
        env = {}
        for entry in entries:
            key, _, value = entry.partition("=")
            if key:
                env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def _pause() -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    while True:
        signal.pause()


def _enter(net: str | None, cwd: str | None) -> str | None:
    """setns, then chdir; what failed (the message), or None."""
    try:
        if net:
            linuxns.setns(net, linuxns.CLONE_NEWNET)
        if cwd:
            os.chdir(cwd)
    except OSError as exc:
        return f"nsexec: {exc}"
    return None


def _exec(command: list[str], env: dict[str, str]) -> str:
    """Become ``command``; the message when that failed."""
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        return f"nsexec: exec {command[0]!r}: {exc.strerror or exc}"
    return "nsexec: exec returned"  # not reached


def enter_and_exec(net: str | None, cwd: str | None, env: dict[str, str], command: list[str]) -> None:
    """What ``nsexec --net NET --cwd CWD --env ... -- COMMAND`` does, in this (forked, single-threaded)
    process: never returns; a failure is written to stderr and ends it with 126 or 127, as the command's."""
    failed = _enter(net, cwd)
    code = 126
    if failed is None:
        failed, code = _exec(command, env), 127
    with contextlib.suppress(OSError):
        os.write(2, f"{failed}\n".encode())
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command and not args.pause:
        print("nsexec: no command given", file=sys.stderr)
        return 2
    failed = _enter(args.net, args.cwd)
    if failed is not None:
        print(failed, file=sys.stderr)
        return 126
    if args.pause:
        return _pause()
    print(_exec(command, build_env(args.env)), file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main())
