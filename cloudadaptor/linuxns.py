"""Thin libc wrappers for Linux namespaces and mounts (Python 3.11 has no os.setns).

Used by the local provider's VM init and the private test namespace; all
network configuration itself goes through pyroute2.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000

MS_RDONLY = 0x1
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
# Every network namespace's loopback device has this index (the kernel's LOOPBACK_IFINDEX,
# include/net/net_namespace.h): bringing lo up needs no lookup request.
LOOPBACK_IFINDEX = 1

# dlopen(NULL): the C library this interpreter already runs on. ctypes.util.find_library
# forks /sbin/ldconfig, in every process that imports this (each container's nsexec too).
_libc = ctypes.CDLL(None, use_errno=True)


def libc() -> ctypes.CDLL:
    """The loaded C library (for pyroute2's ``libc=`` arguments, which would otherwise look it up)."""
    return _libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(path: str, nstype: int = 0) -> None:
    """Move the calling thread into the namespace at ``path`` (e.g. /run/netns/x)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns {path}")
    finally:
        os.close(fd)


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def umount(target: str, flags: int = MNT_DETACH) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def netns_path(name_or_path: str) -> str:
    """``/run/netns/<name>`` for a bare name, the path itself otherwise."""
    return name_or_path if "/" in name_or_path else f"/run/netns/{name_or_path}"
