"""The pieces every subcommand shares: problem printer, logging, run-until-signal."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal

from cloudadaptor.commandline import print_problems, run_until_signal, serve_until_signal, setup_logging


def test_print_problems_counts_and_indents_each_problem():
    out = io.StringIO()
    print_problems(["VXLAN_PORT: expected 1-65535", "PROXY_TIMEOUT: too long"], file=out)
    assert out.getvalue() == "configuration refused (2 problems):\n  VXLAN_PORT: expected 1-65535\n  PROXY_TIMEOUT: too long\n"
    out = io.StringIO()
    print_problems(["AZURE_NSG_ID is not set"], context="azure open-ports", file=out)
    assert out.getvalue().startswith("azure open-ports: configuration refused (1 problem):\n")


def test_setup_logging_keeps_pyroute2_quiet_even_at_debug(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    pyroute2 = logging.getLogger("pyroute2")
    monkeypatch.setattr(pyroute2, "level", logging.NOTSET)
    setup_logging("debug")
    assert root.level == logging.DEBUG
    assert pyroute2.level == logging.INFO, "pyroute2 logs every netlink message at debug"


async def test_run_until_signal_hands_main_a_stop_event_that_sigterm_sets():
    async def main(stop: asyncio.Event) -> str:
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)
        return "stopped"

    assert await run_until_signal(main) == "stopped"
    loop = asyncio.get_running_loop()
    assert not loop.remove_signal_handler(signal.SIGTERM), "the handler is removed afterwards"
    assert not loop.remove_signal_handler(signal.SIGINT)


async def test_serve_until_signal_closes_the_service_after_sigint():
    events: list[str] = []

    class Service:
        async def start(self) -> None:
            events.append("start")
            asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGINT)

        async def close(self) -> None:
            events.append("close")

    await asyncio.wait_for(serve_until_signal(Service(), on_stop=lambda: events.append("stop")), 5)
    assert events == ["start", "stop", "close"]
