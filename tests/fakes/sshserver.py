"""An in-process SSH server on loopback standing in for a builder VM (tests, no sshd needed).

``FakeSshHost`` is a paramiko server on 127.0.0.1 (a free port) that
authenticates by public key and then behaves like the VM would for the
image builder:

- ``exec`` requests run **for real**: ``/bin/sh -c <command>`` in a
  subprocess, its output (stdout and stderr) streamed back and its exit
  status returned. ``PATH`` starts with a directory holding a ``sudo``
  stand-in that runs the command as the same user (the VM's passwordless
  sudo), so ``sudo -n python3 provision.py ...`` runs provision.py here;
- the ``sftp`` subsystem serves the real file system.

So point the builder's commands at a temporary directory (its install root)
and never at anything that matters. ``logins``, ``commands`` and
``uploads`` record what happened; ``fail_logins`` refuses the first N
logins (a VM whose cloud-init has not installed the key yet).

    with FakeSshHost(username="ec2-user") as vm:
        ... builder with ssh endpoint ("127.0.0.1", vm.port) ...
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any

import paramiko
from paramiko import SFTPAttributes, SFTPHandle, SFTPServer, SFTPServerInterface

_FAKE_SUDO = """#!/bin/sh
# sudo on the fake builder VM: run the command as the same user.
while [ $# -gt 0 ]; do
  case "$1" in --) shift; break ;; -*) shift ;; *) break ;; esac
done
exec "$@"
"""


class FakeSshHost:
    """See the module docstring. ``authorized_keys`` None accepts any key."""

    def __init__(self, *, username: str | None = None, authorized_keys: list[paramiko.PKey] | None = None,
                 fail_logins: int = 0, host_key_source: Any = None) -> None:
        self.username = username
        self.authorized_keys = authorized_keys
        self.fail_logins = fail_logins
        self.logins: list[tuple[str, str]] = []  # (user, key fingerprint) of accepted logins
        self.refused: list[tuple[str, str]] = []
        self.commands: list[str] = []
        self.uploads: list[str] = []
        self.statuses: list[int] = []
        self.lock = threading.Lock()
        self.host_key = paramiko.ECDSAKey.generate()
        # Like cloud-init installing the host key the VM's user data carries: called
        # per connection, returns that key (None: not launched yet, serve ``host_key``).
        self.host_key_source = host_key_source
        self.served_host_keys: list[str] = []  # fingerprints, per connection
        self._dir = tempfile.mkdtemp(prefix="fakesshhost-")
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._transports: list[paramiko.Transport] = []
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        assert self._listener is not None, "start() first"
        return self._listener.getsockname()[1]

    @property
    def endpoint(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def start(self) -> FakeSshHost:
        bin_dir = os.path.join(self._dir, "bin")
        os.makedirs(bin_dir)
        with open(os.path.join(bin_dir, "sudo"), "w") as f:
            f.write(_FAKE_SUDO)
        os.chmod(os.path.join(bin_dir, "sudo"), 0o755)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._spawn(self._accept_loop, "fake-ssh-accept")
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        for transport in list(self._transports):
            transport.close()
        for thread in self._threads:
            thread.join(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> FakeSshHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ internals

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._spawn(self._serve, "fake-ssh-conn", conn)

    def _serve(self, conn: socket.socket) -> None:
        transport = paramiko.Transport(conn)
        self._transports.append(transport)
        key = (self.host_key_source() if self.host_key_source else None) or self.host_key
        self.served_host_keys.append(key.fingerprint)
        transport.add_server_key(key)
        transport.set_subsystem_handler("sftp", SFTPServer, _RealFileSystem, self)
        try:
            transport.start_server(server=_Server(self))
        except (paramiko.SSHException, EOFError, OSError):
            transport.close()
            return
        channels = []  # paramiko holds channels weakly: one collected is closed under the client
        while transport.is_active() and not self._stopping.is_set():
            channel = transport.accept(timeout=0.2)  # served by the exec/subsystem handlers
            if channel is not None:
                channels.append(channel)
        transport.close()

    def authorize(self, username: str, key: paramiko.PKey) -> bool:
        with self.lock:
            record = (username, key.fingerprint)
            ok = (self.username is None or username == self.username) and (
                self.authorized_keys is None or any(key == k for k in self.authorized_keys))
            if ok and self.fail_logins > 0:
                self.fail_logins -= 1
                ok = False
            (self.logins if ok else self.refused).append(record)
            return ok

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.path.join(self._dir, "bin") + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        env["HOME"] = self._dir
        return env

    def execute(self, channel: paramiko.Channel, command: str) -> None:
        """Run ``command`` with /bin/sh, streaming its output to ``channel``; then its exit status."""
        with self.lock:
            self.commands.append(command)
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=self._dir, env=self.environment(),
                                start_new_session=True)
        assert proc.stdout is not None
        self._spawn(self._hang_up, "fake-ssh-hangup", channel, proc)
        try:
            while chunk := proc.stdout.read1(4096):
                channel.sendall(chunk)
        except (OSError, EOFError):  # the client went away (Ctrl-C): _hang_up stops the command
            pass
        status = proc.wait()
        status = status if status >= 0 else 128 - status  # killed by a signal: as a shell reports it
        with self.lock:
            self.statuses.append(status)
        # Exit status and EOF, but no close: the exec request's success reply may still be on its
        # way (paramiko sends it after check_channel_exec_request returns), and a close arriving
        # before it fails the client's exec_command. The client closes the channel when done.
        try:
            channel.send_exit_status(status)
            channel.shutdown_write()
        except (OSError, EOFError):
            pass


    def _hang_up(self, channel: paramiko.Channel, proc: subprocess.Popen) -> None:
        """Kill the command once its channel closes or the host stops (sshd's SIGHUP)."""
        while proc.poll() is None:
            if channel.closed or self._stopping.is_set():
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole command, like sshd's hang-up
                except ProcessLookupError:
                    pass
                return
            time.sleep(0.02)


class _Server(paramiko.ServerInterface):
    def __init__(self, host: FakeSshHost) -> None:
        self.host = host

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL if self.host.authorize(username, key) else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.host._spawn(self.host.execute, "fake-ssh-exec", channel, command.decode("utf-8", "replace"))
        return True


class _Handle(SFTPHandle):
    def stat(self) -> Any:
        try:
            return SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))
        except OSError as exc:
            return SFTPServer.convert_errno(exc.errno)

    def chattr(self, attr: SFTPAttributes) -> int:
        try:
            SFTPServer.set_file_attr(self.filename, attr)
            return paramiko.SFTP_OK
        except OSError as exc:
            return SFTPServer.convert_errno(exc.errno)


class _RealFileSystem(SFTPServerInterface):
    """SFTP on the real file system (absolute paths as given)."""

    def __init__(self, server: Any, host: FakeSshHost, *args: Any, **kwargs: Any) -> None:
        super().__init__(server, *args, **kwargs)
        self.host = host

    @staticmethod
    def _call(fn: Any, *args: Any) -> Any:
        try:
            fn(*args)
        except OSError as exc:
            return SFTPServer.convert_errno(exc.errno)
        return paramiko.SFTP_OK

    def list_folder(self, path: str) -> Any:
        try:
            return [SFTPAttributes.from_stat(os.lstat(os.path.join(path, name)), name) for name in os.listdir(path)]
        except OSError as exc:
            return SFTPServer.convert_errno(exc.errno)

    def stat(self, path: str) -> Any:
        try:
            return SFTPAttributes.from_stat(os.stat(path))
        except OSError as exc:
            return SFTPServer.convert_errno(exc.errno)

    def lstat(self, path: str) -> Any:
        try:
            return SFTPAttributes.from_stat(os.lstat(path))
        except OSError as exc:
            return SFTPServer.convert_errno(exc.errno)

    def open(self, path: str, flags: int, attr: SFTPAttributes) -> Any:
        try:
            fd = os.open(path, flags | getattr(os, "O_BINARY", 0), (attr.st_mode or 0o666) & 0o7777)
        except OSError as exc:
            return SFTPServer.convert_errno(exc.errno)
        if flags & os.O_WRONLY:
            mode = "ab" if flags & os.O_APPEND else "wb"
            with self.host.lock:
                self.host.uploads.append(path)
        elif flags & os.O_RDWR:
            mode = "a+b" if flags & os.O_APPEND else "r+b"
        else:
            mode = "rb"
        handle = _Handle(flags)
        handle.filename = path
        handle.readfile = handle.writefile = os.fdopen(fd, mode)
        return handle

    def remove(self, path: str) -> int:
        return self._call(os.remove, path)

    def rename(self, oldpath: str, newpath: str) -> int:
        return self._call(os.rename, oldpath, newpath)

    def mkdir(self, path: str, attr: SFTPAttributes) -> int:
        return self._call(os.mkdir, path, (attr.st_mode or 0o755) & 0o7777)

    def rmdir(self, path: str) -> int:
        return self._call(os.rmdir, path)

    def chattr(self, path: str, attr: SFTPAttributes) -> int:
        return self._call(SFTPServer.set_file_attr, path, attr)
