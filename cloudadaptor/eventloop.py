"""The event loop of our long-running processes: uvloop's.

The daemon (``serve``), the pod VM's forwarder and the namespace VM's init all
relay agent calls. uvloop's socket and TLS callbacks are compiled; asyncio's
own SSL transport is pure Python. On the agent path (two relays, one each
side of the mutual-TLS hop) that is most of what a relay costs beyond the
kernel's own work (``python -m bench``, agent path, issue 16).

A loop, not the policy: pyroute2 (in worker threads) makes its own loops with
asyncio's policy, and uvloop's cannot open netlink sockets. uvloop starts
reading an accepted connection after its protocol's ``connection_made``, even
if that paused it: protocols that wait for a second connection keep what
arrives early (``ttrpc.relayproto``, ``adaptor.proxy``).
"""

from __future__ import annotations

import asyncio


def new_event_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()
