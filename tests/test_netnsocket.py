"""netnsocket: named netns created and entered by short threads, never by a forked helper."""

from __future__ import annotations

import os
import threading
from typing import Iterator

import pytest
from pyroute2 import IPRoute

from cloudadaptor import linuxns, netnsocket


@pytest.fixture
def forks() -> Iterator[list[int]]:
    """The PIDs this process forks (os.fork and multiprocessing run the at-fork hooks) while a test runs."""
    seen: list[int] = []
    recording = threading.Event()
    recording.set()
    os.register_at_fork(before=lambda: seen.append(os.getpid()) if recording.is_set() else None)
    yield seen
    recording.clear()  # hooks cannot be unregistered


def _inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_create_enter_remove_without_fork(private_ns: None, forks: list[int]) -> None:
    name = f"nsock-{os.getpid()}"
    own = _inode("/proc/thread-self/ns/net")
    path = netnsocket.create_netns(name)
    try:
        assert path == linuxns.netns_path(name)
        assert _inode(path) != own  # a new netns, mounted on the name
        assert _inode("/proc/thread-self/ns/net") == own  # the caller never moved
        with netnsocket.iproute_in(path) as ipr:
            ipr.link("add", ifname="nsock0", kind="veth", peer="nsock1")
            assert sorted(link.get("IFLA_IFNAME") for link in ipr.get_links()) == ["lo", "nsock0", "nsock1"]
        with IPRoute() as ipr:
            assert not ipr.link_lookup(ifname="nsock0")  # made in the other netns, not here
        assert netnsocket.in_netns(path, lambda: _inode("/proc/thread-self/ns/net")) == _inode(path)
        with pytest.raises(FileExistsError):
            netnsocket.create_netns(name)
        assert os.path.exists(path)  # the failed second create left the first alone
    finally:
        netnsocket.remove_netns(name)
    assert not os.path.exists(path)
    with pytest.raises(FileNotFoundError):
        netnsocket.remove_netns(name)
    assert forks == []


def test_errors_reach_the_caller(private_ns: None, tmp_path) -> None:
    not_a_netns = tmp_path / "plain-file"
    not_a_netns.write_text("")
    with pytest.raises(OSError):
        netnsocket.netlink_socket_in(str(not_a_netns))
    with pytest.raises(ZeroDivisionError):
        netnsocket.in_netns("/proc/self/ns/net", lambda: 1 // 0)


async def _link_names(ipr) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted([link.get("IFLA_IFNAME") async for link in await ipr.get_links()])


def test_interfaces_found_by_the_thread_that_enters(private_ns: None) -> None:
    name = f"nsidx-{os.getpid()}"
    path = netnsocket.create_netns(name)
    try:
        with netnsocket.iproute_in(path) as ipr:
            ipr.link("add", ifname="nsidx0", kind="veth", peer="nsidx1")
            expected = ipr.link_lookup(ifname="nsidx0")[0]
        found = netnsocket.indices_in(path, ("nsidx0", "lo", "absent0"))
        assert found == {"nsidx0": expected, "lo": linuxns.LOOPBACK_IFINDEX, "absent0": None}
        assert netnsocket.index_of("nsidx0") is None, "looked up in the caller's own netns, which has none"
        sock, index = netnsocket.socket_and(path, lambda: netnsocket.index_of("nsidx1"))
        try:
            assert index is not None and index != expected
            assert netnsocket.run_async(sock, _link_names) == ["lo", "nsidx0", "nsidx1"]
            assert sock.fileno() == -1, "the socket object itself is closed: no stale fd number to close later"
        finally:
            sock.close()
        assert "nsidx0" not in netnsocket.run_async(None, _link_names), "None: a socket of the caller's netns"
    finally:
        netnsocket.remove_netns(name)


def test_a_failing_probe_leaves_no_socket_open(private_ns: None) -> None:
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ZeroDivisionError):
        netnsocket.socket_and("/proc/self/ns/net", lambda: 1 // 0)
    assert len(os.listdir("/proc/self/fd")) == before
