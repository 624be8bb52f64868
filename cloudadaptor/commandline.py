"""What every subcommand shares: the problem printer, logging, the run-until-signal loop, the subcommand table.

A subcommand is a module with ``build_parser(parser)`` (adds its flags; imports
no SDK, so ``--help`` stays fast) and ``run(args) -> exit code`` (imports what
it needs). ``cloudadaptor.cli`` lists them in one ``Subcommand`` table; adding
one is a module plus a row. Exit codes: 0 done, 1 failed, 2 bad settings or
arguments (``print_problems`` says which).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable, Protocol, TextIO, TypeVar

from cloudadaptor import logcontext

if TYPE_CHECKING:
    from cloudadaptor.config import Settings

T = TypeVar("T")

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def print_problems(problems: Iterable[object], *, context: str = "", file: TextIO | None = None) -> None:
    """``configuration refused (N problems):`` then one indented line per problem, on stderr.

    ``context`` (e.g. ``"image build"``) prefixes the first line. Callers exit 2.
    """
    out = sys.stderr if file is None else file
    lines = [str(problem) for problem in problems]
    head = f"configuration refused ({len(lines)} problem{'s' if len(lines) != 1 else ''}):"
    print(f"{context}: {head}" if context else head, file=out)
    for line in lines:
        print(f"  {line}", file=out)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request's ``logcontext`` fields
    (sandbox_id, pod, instance_id), the same fields passed with ``extra=``, and the exception if any.

    Written here rather than taken from a library: it is a dozen lines over the stdlib formatter.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(logcontext.current())
        for name in logcontext.FIELDS:
            value = getattr(record, name, None)
            if value:
                entry[name] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


JsonFormatter.converter = time.gmtime  # UTC, as the trailing Z says


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Log to stderr at ``level`` (debug | info | warning | error; unknown: info) as ``fmt``
    (``text`` lines, or ``json``: one object per line). Idempotent (basicConfig)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO), handlers=[handler])
    # pyroute2 logs every netlink message at debug: too much even for debugging us.
    logging.getLogger("pyroute2").setLevel(max(logging.INFO, logging.getLogger().level))


async def run_until_signal(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """``main(stop)``, where SIGTERM or SIGINT sets ``stop``; its result.

    ``main`` decides how to wind down once ``stop`` is set. The handlers are
    removed when it returns or raises, so a later Ctrl-C behaves as usual.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        return await main(stop)
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


class Service(Protocol):
    async def start(self) -> object: ...

    async def close(self) -> None: ...


async def serve_until_signal(service: Service, *, on_stop: Callable[[], None] | None = None) -> None:
    """Start ``service``, serve until SIGTERM/SIGINT, then close it. A failing ``start`` propagates (it cleans up itself)."""

    async def serve(stop: asyncio.Event) -> None:
        await service.start()
        try:
            await stop.wait()
            if on_stop is not None:
                on_stop()
        finally:
            await service.close()

    await run_until_signal(serve)


@dataclass(frozen=True)
class Subcommand:
    """One row of the CLI's table: ``module`` provides ``build_parser(parser)`` and ``run(args) -> int``."""

    name: str
    help: str
    module: str
    build_parser: str = "build_parser"
    run: str = "run"

    def mount(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """Import the module (not its SDKs), add its parser, and make ``args.func`` its runner."""
        module = importlib.import_module(self.module)
        parser = subparsers.add_parser(self.name, help=self.help)
        getattr(module, self.build_parser)(parser)
        parser.set_defaults(func=getattr(module, self.run))
        return parser


def load_settings_or_report(command: str) -> Settings | None:
    """The common settings and the chosen provider's keys, checked as ``serve`` checks them;
    None after printing every problem (the command then exits 2)."""
    from cloudadaptor.config import ConfigError
    from cloudadaptor.providers.base import load_provider

    try:
        settings, _ = load_provider(os.environ)
    except ConfigError as exc:
        print_problems(exc.problems, context=command)
        return None
    return settings
