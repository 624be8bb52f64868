"""The local provider's fork server: one pre-imported interpreter forks every namespace VM's launcher.

    python -m cloudadaptor.providers.local_forkserver --fd N

A namespace VM used to start with ``python -m cloudadaptor.providers.local_vm``:
a fresh interpreter importing the VM-side steps (process-user-data, pyroute2,
the forwarder, TLS, protobuf) for every VM, which on a small worker made 30
VMs started at once cost about 15 one-VM boots (issue 16). The fork server
imports all of that once (and, before each launch, reads the image's boot plan,
``local_boot.load``, which is read again only when its files change); each
launch is a ``fork()`` of it running ``local_vm.main`` with the same
arguments, so the VM's launcher, init and namespaces are exactly what the
exec'd command made.

Protocol, on a ``SOCK_SEQPACKET`` socketpair (fd ``N``) from the daemon: one
message per launch, JSON ``{"argv": [...local_vm arguments...]}`` with two
fds attached: the VM's console (the launcher's stdout and stderr) and a
reply socket, on which the launcher writes its exit status (a decimal line)
before it exits. End of file on fd ``N`` (the daemon closed it, or died)
ends the server; VMs it launched are not its children (their launchers
exit), so nothing of theirs depends on it.

The server is single-threaded and runs no event loop, so a fork of it is a
clean process: the child starts a new session, takes the console as
stdout/stderr and ``/dev/null`` as stdin, closes the server's socket and
restores the default SIGCHLD (the server ignores it, so the kernel reaps its
launchers). The reply fd is closed in the VM's init (forked by the launcher),
so no fd of the daemon's lives on in a VM.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback

MODULE = "cloudadaptor.providers.local_forkserver"
MAX_REQUEST = 1 << 16  # one launch's JSON: a few paths and the agent command
START_TIMEOUT = 30.0


class ForkServerError(OSError):
    """The fork server could not take a launch request (it is restarted on the next one)."""


class ForkServer:
    """The daemon's handle on its fork server: started on the first launch, stopped by ``close``.

    Thread-safe: launches come from the provider's executor threads.
    """

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env  # the VMs' environment (the server's own, inherited by every VM)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server now (it imports the VM side while the daemon goes on); idempotent."""
        with self._lock:
            self._ensure()

    def launch(self, argv: list[str], console_fd: int, timeout: float) -> int:
        """Run ``local_vm.main(argv)`` in a fork with ``console_fd`` as its output; its exit status.

        Raises ``TimeoutError`` when the launcher does not answer within ``timeout``
        seconds, ``ForkServerError`` when the server cannot be reached (twice).
        """
        request = json.dumps({"argv": argv}).encode()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours:
            try:
                self._send(request, [console_fd, theirs.fileno()])
            finally:
                theirs.close()
            ours.settimeout(timeout)
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = ours.recv(64)
                if not chunk:
                    break
                reply += chunk
        try:
            return int(reply)
        except ValueError:
            return 1  # the launcher died before it could answer; the console says why

    def _send(self, request: bytes, fds: list[int]) -> None:
        for attempt in (1, 2):
            with self._lock:
                sock = self._ensure()
                try:
                    socket.send_fds(sock, [request], fds)
                    return
                except OSError as exc:
                    self._stop_locked()
                    if attempt == 2:
                        raise ForkServerError(f"local VM fork server unreachable: {exc}") from None

    def _ensure(self) -> socket.socket:
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        self._stop_locked()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", MODULE, "--fd", str(theirs.fileno())], pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True, cwd="/", env=self.env,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        return ours

    def close(self) -> None:
        """Stop the server (end of file, then SIGKILL after a grace period); idempotent."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        sock, proc, self._sock, self._proc = self._sock, self._proc, None, None
        if sock is not None:
            sock.close()
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ----------------------------------------------------------------------- server


def serve(fd: int) -> int:
    """Answer launch requests on ``fd`` until end of file; 0."""
    from cloudadaptor.providers import local_vm, local_vmagent, local_vmpreload

    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the launchers
    local_vmpreload.preload()
    while True:
        message, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 2)
        if not message:
            return 0
        try:
            argv = [str(word) for word in json.loads(message)["argv"]]
            if len(fds) != 2:
                raise ValueError(f"expected 2 fds (console, reply), got {len(fds)}")
        except (ValueError, KeyError, TypeError) as exc:
            print(f"local VM fork server: bad request refused: {exc}", file=sys.stderr, flush=True)
            for received in fds:
                os.close(received)
            continue
        with contextlib.suppress(Exception, SystemExit):  # bad arguments are the launcher's to report
            local_vmagent.preload(local_vm.agent_argv_of(argv))
        with contextlib.suppress(Exception, SystemExit):  # so is a boot plan that cannot be read
            local_vm.boot_plan_of(argv)
        sys.stdout.flush()
        sys.stderr.flush()
        # Everything loaded so far moves to the collector's permanent generation: a fork's collections
        # then never write to these objects' pages, which the fork would have to copy (CPU and memory).
        gc.freeze()
        if os.fork() == 0:
            _launcher(sock, fds[0], fds[1], argv)  # never returns
        for received in fds:
            os.close(received)


def _launcher(sock: socket.socket, console: int, reply: int, argv: list[str]) -> None:
    """In the fork: become what ``python -m local_vm argv`` was, run it, answer its status, exit."""
    code = 1
    try:
        sock.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(console, 1)
        os.dup2(console, 2)
        os.close(console)
        _close_in_child(reply)
        from cloudadaptor.providers import local_vm

        code = local_vm.main(argv)
    except SystemExit as exc:  # argparse's refusal: 2, as the command's would be
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the console must say why the launch failed
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.write(reply, f"{code}\n".encode())
        os._exit(code)


def _close_in_child(fd: int) -> None:
    """Close ``fd`` in the next process this one forks (the VM's init), once: the daemon's reply
    socket must not live on in a VM. Once only: later forks of the init must not close a reused number."""
    pending = [fd]

    def close() -> None:
        while pending:
            with contextlib.suppress(OSError):
                os.close(pending.pop())

    os.register_at_fork(after_in_child=close)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local_forkserver", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the daemon's SOCK_SEQPACKET socket")
    args = parser.parse_args(argv)
    return serve(args.fd)


if __name__ == "__main__":
    sys.exit(main())

