"""``python -m cloudadaptor.podnetwork.sweep [VNI ...]``: delete this netns's tunnel devices and peer
filters whose VNI is not listed (a crash's leftovers); one line per thing deleted on stdout.

The daemon runs this once at start in a child, so that it does not load pyroute2
before its first pod (``vxlan.VxlanPodNetwork.sweep``). Exit status 1 with the reason
on stderr when the sweep fails.
"""

from __future__ import annotations

import sys

from pyroute2.netlink.exceptions import NetlinkError

from cloudadaptor.podnetwork.api import PodNetworkError
from cloudadaptor.podnetwork.tunnel import sweep_worker_devices


def main(argv: list[str]) -> int:
    try:
        known = frozenset(int(vni) for vni in argv)
        actions = sweep_worker_devices(known)
    except (ValueError, OSError, NetlinkError, PodNetworkError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for line in actions:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
