"""The worker half of the agent path alone: one ``AgentProxy`` as the daemon runs it (on its loop).

    python -m bench.proxyproc SOCKET HOST PORT SERVER_NAME CERT KEY CA

Serves SOCKET until SIGTERM, piping each connection over mutual TLS to HOST:PORT.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from cloudadaptor.adaptor.proxy import AgentEndpoint, AgentProxy
from cloudadaptor.eventloop import new_event_loop
from cloudadaptor.tls import client_context


async def _serve(argv: list[str]) -> None:
    socket_path, host, port, server_name, cert, key, ca = argv
    context = client_context(Path(cert).read_text(), Path(key).read_text(), Path(ca).read_text())
    proxy = AgentProxy(socket_path, AgentEndpoint(host, int(port), context, server_name))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await proxy.start()
    try:
        await stop.wait()
    finally:
        await proxy.close()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=new_event_loop) as runner:  # the daemon's loop (``serve``)
        runner.run(_serve(sys.argv[1:]))
