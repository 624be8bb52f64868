"""Working in another network namespace without forking: a short thread enters it.

pyroute2 0.9's ``IPRoute(netns=...)`` and ``netns.create(name)`` fork a helper
process each (tens of ms of CPU, issue 16), once per pod on the worker and in
every local VM's init. The network namespace is per thread (setns(2) and
unshare(CLONE_NEWNET) move only the calling thread), and a socket keeps the
netns it was made in, so a thread that enters (or creates) the namespace,
does its one thing and ends replaces the fork; the caller's thread never
leaves its own netns. Used by the local provider, the pod network (worker
and VM side) and the development tools. Blocking; raises ``OSError``.

An interface's index by name is asked with ``if_nametoindex(3)`` (an ioctl on
a socket of the thread's netns, about 2 µs) rather than a netlink RTM_GETLINK,
whose full reply pyroute2 takes about 0.4 ms of CPU to decode: several per
pod (issue 16). The thread that opens a netns looks them up on its way
(``iproute_and``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import threading
from typing import Awaitable, Callable, Iterable, Iterator, TypeVar

from pyroute2 import AsyncIPRoute, IPRoute
from pyroute2 import netns as pyroute2_netns

from cloudadaptor import linuxns

T = TypeVar("T")
NETLINK_ROUTE = 0
_NETLINK_BUFFER = 1 << 20  # the buffer sizes IPRoute gives the sockets it makes itself
_NSFS_MAGIC_PATH = "/proc/self/ns/net"


def in_netns(path: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` here when ``path`` is None, else in a short-lived thread that entered the netns at ``path``."""
    if path is None:
        return fn()
    return _in_thread(lambda: linuxns.setns(path, linuxns.CLONE_NEWNET), fn, "netns-enter")


def netlink_socket_in(path: str | None, protocol: int = NETLINK_ROUTE) -> socket.socket:
    """A netlink socket of ``protocol`` bound to the netns at ``path`` (None: this thread's)."""
    return in_netns(path, lambda: _netlink_socket(protocol))


@contextlib.contextmanager
def iproute_in(path: str | None) -> Iterator[IPRoute]:
    """An ``IPRoute`` working in the netns at ``path`` (None: this thread's own); never creates one."""
    if path is None:
        with IPRoute() as ipr:
            yield ipr
        return
    with iproute_and(path, lambda: None) as (ipr, _):
        yield ipr


def index_of(name: str) -> int | None:
    """The index of interface ``name`` in this thread's netns; None when there is none (ENODEV).
    Raises ``OSError`` for any other failure (``socket.if_nametoindex`` would hide which)."""
    ctypes.set_errno(0)
    index = int(linuxns.libc().if_nametoindex(name.encode()))
    if index:
        return index
    err = ctypes.get_errno()
    if err == errno.ENODEV:
        return None
    raise OSError(err, f"if_nametoindex {name}: {os.strerror(err)}")


def indices(names: Iterable[str]) -> dict[str, int | None]:
    """``index_of`` each of ``names`` (this thread's netns)."""
    return {name: index_of(name) for name in names}


def indices_in(path: str | None, names: Iterable[str]) -> dict[str, int | None]:
    """``indices(names)`` in the netns at ``path`` (None: this thread's), one thread for all."""
    return in_netns(path, lambda: indices(names))


def socket_and(path: str, probe: Callable[[], T]) -> tuple[socket.socket, T]:
    """A NETLINK_ROUTE socket bound to the netns at ``path`` and what ``probe()`` returns there
    (e.g. ``indices``), from one thread entering the netns once. The caller closes the socket."""

    def open_and_probe() -> tuple[socket.socket, T]:
        sock = _netlink_socket(NETLINK_ROUTE)
        try:
            return sock, probe()
        except BaseException:
            sock.close()
            raise

    return in_netns(path, open_and_probe)


@contextlib.contextmanager
def iproute_and(path: str, probe: Callable[[], T]) -> Iterator[tuple[IPRoute, T]]:
    """``iproute_in(path)`` and what ``probe()`` returns there (``socket_and``)."""
    sock, found = socket_and(path, probe)
    with iproute_over(sock) as ipr:
        yield ipr, found


@contextlib.contextmanager
def iproute_over(sock: socket.socket) -> Iterator[IPRoute]:
    """An ``IPRoute`` over ``sock``; the socket is closed with it (IPRoute does not own a socket it is given)."""
    try:
        ipr = IPRoute(use_socket=sock)
    except BaseException:
        sock.close()
        raise
    try:
        with ipr:
            yield ipr
    finally:
        sock.close()


def run_async(sock: socket.socket | None, work: Callable[[AsyncIPRoute], Awaitable[T]]) -> T:
    """``await work(ipr)`` on an ``AsyncIPRoute`` over ``sock`` (None: a socket of its own in this
    thread's netns), in an event loop of its own. ``sock`` is closed when this returns (asyncio's
    transport closes the socket object it wraps; closing it again is harmless).

    pyroute2's synchronous ``IPRoute`` runs its loop once per request and once per
    message of a dump; several requests and dumps in one coroutine cost about a fifth
    less CPU (issue 16). Blocking; call from a worker thread."""
    async def run() -> T:
        async with (AsyncIPRoute() if sock is None else AsyncIPRoute(use_socket=sock)) as ipr:
            return await work(ipr)

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


def create_netns(name: str) -> str:
    """Create the named netns ``/run/netns/<name>`` (what ``ip netns add`` does); its path.

    A thread unshares a new netns and pyroute2 bind-mounts ``/proc/thread-self/ns/net``
    onto the name (``netns.attach``, which does not fork, unlike ``netns.create``). Our loaded
    libc is passed: pyroute2 would otherwise fork ``ldconfig -p`` to find one, once per process.
    ``FileExistsError`` when the name exists; a half-made name is removed on failure.
    """
    path = linuxns.netns_path(name)

    def bind() -> None:
        try:
            pyroute2_netns.attach(path, "thread-self", libc=linuxns.libc())
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                _drop_unmounted(path)
            raise

    _in_thread(lambda: linuxns.unshare(linuxns.CLONE_NEWNET), bind, "netns-create")
    return path


def remove_netns(name: str) -> None:
    """Unmount and delete the named netns (pyroute2's ``netns.remove``, which does not fork).
    ``FileNotFoundError`` when it does not exist."""
    pyroute2_netns.remove(linuxns.netns_path(name), libc=linuxns.libc())


def _in_thread(enter: Callable[[], None], fn: Callable[[], T], name: str) -> T:
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            enter()
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _netlink_socket(protocol: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _NETLINK_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _NETLINK_BUFFER)
    except BaseException:
        sock.close()
        raise
    return sock


def _drop_unmounted(path: str) -> None:
    """Remove the mount point file a failed create left, unless a namespace is mounted on it."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_dev != os.stat(_NSFS_MAGIC_PATH).st_dev:
            os.unlink(path)
