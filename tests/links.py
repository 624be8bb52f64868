"""Test clean-up of links the tests made on the namespace's own network (bridges, veths)."""

from __future__ import annotations

from pyroute2 import IPRoute


def delete_link(name: str) -> None:
    """Delete the link ``name`` if it exists (idempotent)."""
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=name):
            ipr.link("del", index=index)
