"""Run a command in a private user + network + mount namespace (docs/ARCHITECTURE.md, "How we test").

Inside, an ordinary user is root of fresh namespaces: it can create network
namespaces, veth pairs, bridges, VXLAN devices and tc filters, while the
machine's own network is never touched. ``/run`` is a private tmpfs so
``/run/netns`` and ``/run/peerpod`` start empty and vanish with the namespace.

    python -m cloudadaptor.dev.privatens -- COMMAND [ARGS...]
"""

from __future__ import annotations

import os
import shutil
import sys

from cloudadaptor import linuxns

MARK = "CLOUDADAPTOR_PRIVATE_NS"


def inside() -> bool:
    """True in a namespace made by this module (the mark is inherited by children)."""
    return os.environ.get(MARK) == str(_netns_inode())


def _netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def exec_inside(command: list[str]) -> None:
    """Replace this process with ``command`` run in a fresh private namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise SystemExit("unshare (util-linux) is required to create the private namespace")
    os.execv(
        unshare,
        [
            unshare, "--user", "--map-root-user", "--net", "--mount", "--propagation", "private",
            sys.executable, "-m", "cloudadaptor.dev.privatens", "--inner", "--", *command,
        ],
    )


def _setup_inner() -> None:
    linuxns.mount("tmpfs", "/run", "tmpfs", 0, "mode=0755")
    os.makedirs("/run/netns", exist_ok=True)
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    os.environ[MARK] = str(_netns_inode())


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    inner = bool(args) and args[0] == "--inner"
    if inner:
        args = args[1:]
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    if inner:
        _setup_inner()
        os.execvp(args[0], args)
    exec_inside(args)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
