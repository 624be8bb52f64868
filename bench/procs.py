"""Child processes of the benchmark: started, waited for, measured and always stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


PROFILE_DIR_ENV = "BENCH_PROFILE_DIR"  # set by ``--profile DIR``: children run under py-spy


def python(*args: str, env: dict[str, str] | None = None, log: Path | None = None,
           profile_as: str = "") -> subprocess.Popen[bytes]:
    """``sys.executable args...`` with stdout/stderr to ``log`` (or discarded).

    With ``profile_as`` and ``--profile DIR`` the child runs under ``py-spy record``
    (the ``bench`` extra), writing ``DIR/<profile_as>.txt`` (collapsed stacks) when it stops.
    """
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    command = [sys.executable, *args]
    profile_dir = os.environ.get(PROFILE_DIR_ENV)
    if profile_as and profile_dir:
        spy = Path(sys.executable).with_name("py-spy")
        command = [str(spy), "record", "--format", "raw", "--rate", "500", "--nonblocking",
                   "-o", f"{profile_dir}/{profile_as}.txt", "--", *command]
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; idempotent."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM if not _is_spy(proc) else signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running(*procs: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in reversed(procs):
            stop(proc)


def wait_for_path(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:g}s")
        time.sleep(0.02)


def wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listened on {host}:{port} within {timeout:g}s")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _is_spy(proc: subprocess.Popen[bytes]) -> bool:
    """py-spy writes its profile when interrupted (SIGINT), and passes the signal on."""
    return isinstance(proc.args, list) and str(proc.args[0]).endswith("py-spy")


def target_pid(proc: subprocess.Popen[bytes]) -> int:
    """The measured process: ``proc`` itself, or the Python child py-spy runs (``--profile``)."""
    if not _is_spy(proc):
        return proc.pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise RuntimeError("py-spy did not start its child")
