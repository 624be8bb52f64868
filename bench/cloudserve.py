"""``serve`` for a cloud provider against the tests' local cloud endpoints (memory figures).

    python -m bench.cloudserve azure     (environment: the keys ``bench.memory`` sets)

The daemon is the product's ``Daemon`` with the provider built from the same
keys; only Azure's credential differs (a static token the local ARM endpoint
accepts), because the fake has no identity service. Serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.commandline import run_until_signal, setup_logging
from cloudadaptor.config import load_settings
from cloudadaptor.eventloop import new_event_loop


async def _serve(provider_name: str) -> None:
    settings = load_settings(dict(os.environ))
    provider = None
    if provider_name == "azure":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from fakes.armserver import fast_provider  # the tests' own fake-cloud helpers

        provider = fast_provider(dict(os.environ))
    daemon = Daemon(settings, provider=provider)

    async def main(stop: asyncio.Event) -> None:
        await daemon.start()
        try:
            await stop.wait()
        finally:
            await daemon.close()

    await run_until_signal(main)


if __name__ == "__main__":
    setup_logging("info")
    with asyncio.Runner(loop_factory=new_event_loop) as runner:  # serve's loop, so the figure is serve's
        runner.run(_serve(sys.argv[1]))
