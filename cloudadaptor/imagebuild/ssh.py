"""SSH to the builder VM with paramiko: wait until it answers, upload over SFTP, run with streamed output.

The builder VM is new, so the build gives it its host key (``buildkeys``,
through cloud-init) and accepts only that key: any other is refused before
logging in (a man in the middle never sees the login or the uploads).
Authentication is by the build's private key only (no agent, no key files
from ``~/.ssh``).
"""

from __future__ import annotations

import logging
import shlex
import socket
import time
from pathlib import Path
from typing import Callable

import paramiko
from paramiko.ssh_exception import NoValidConnectionsError

from cloudadaptor.imagebuild.common import BuildError, SshAccess
from cloudadaptor.retry import Backoff, RetryTimeout, retry_call

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 10.0
KEEPALIVE = 30


class SshUnavailable(BuildError):
    """SSH on the builder VM did not become usable in time."""


class _RecordHostKey(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        log.warning("builder VM %s host key %s %s accepted unverified (no host key was pinned)", hostname,
                    key.get_name(), key.fingerprint)


def _attempt(access: SshAccess, timeout: float) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    if isinstance(access.host_key, paramiko.PKey):
        # known_hosts names a non-22 port as "[host]:port"; paramiko looks the key up under that name.
        name = access.host if access.port == 22 else f"[{access.host}]:{access.port}"
        client.get_host_keys().add(name, access.host_key.get_name(), access.host_key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        client.set_missing_host_key_policy(_RecordHostKey())
    try:
        client.connect(
            access.host, port=access.port, username=access.username, pkey=access.key,
            timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
            allow_agent=False, look_for_keys=False,
        )
    except BaseException:
        client.close()
        raise
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(KEEPALIVE)
    return client


def wait_for_ssh(access: SshAccess, *, timeout: float, interval: float,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> RemoteHost:
    """Connect and log in, retrying refused connections, timeouts and failed logins (cloud-init may
    not have installed the key yet) every ``interval`` seconds until ``timeout`` seconds have passed;
    then ``SshUnavailable`` naming the endpoint and the last error. Blocks."""
    deadline = clock() + timeout

    def once() -> RemoteHost:
        return RemoteHost(_attempt(access, max(min(CONNECT_TIMEOUT, deadline - clock()), 0.5)))

    def note(exc: BaseException, pause: float) -> None:
        log.debug("SSH %s:%d attempt failed: %s", access.host, access.port, _describe(exc))

    try:
        return retry_call(once, timeout=timeout, clock=clock, sleep=sleep, on_retry=note,
                          backoff=Backoff(initial=interval, factor=1.0, maximum=interval, jitter=0.0),
                          retryable=lambda exc: isinstance(exc, (OSError, EOFError, paramiko.SSHException)))
    except RetryTimeout as exc:
        last = _describe(exc.last_error) if exc.last_error is not None else "no attempt made"
        hint = ("Something else answers at that address (a man in the middle?): nothing was sent to it."
                if isinstance(exc.last_error, paramiko.BadHostKeyException) else
                "Check that the builder VM's security group / NSG allows 22/tcp from where this runs and that the "
                "subnet is reachable from here.")
        raise SshUnavailable(
            f"SSH on the builder VM ({access.username}@{access.host}:{access.port}) did not answer within "
            f"{timeout:g}s ({exc.attempts} attempts; last error: {last}). {hint}"
        ) from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, NoValidConnectionsError) and exc.errors:
        exc = next(iter(exc.errors.values()))  # the socket error behind "Unable to connect"
    if isinstance(exc, paramiko.BadHostKeyException):
        return (f"the host key offered ({exc.key.get_name()} {exc.key.fingerprint}) is not the one this build gave "
                f"the VM ({exc.expected_key.fingerprint}): refused")
    if isinstance(exc, paramiko.AuthenticationException):
        return f"authentication failed ({exc})"
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class RemoteHost:
    """A logged-in SSH session to the builder VM. ``close()`` when done."""

    def __init__(self, client: paramiko.SSHClient) -> None:
        self.client = client

    def close(self) -> None:
        self.client.close()

    def run(self, command: str, on_line: Callable[[str], None], *, timeout: float) -> int:
        """Run ``command`` (a shell command line), passing each output line (stdout and stderr merged)
        to ``on_line`` as it arrives; its exit status. BuildError when it runs longer than ``timeout``
        or the connection drops before an exit status came. Blocks; an exception from ``on_line`` (Ctrl-C) closes the channel."""
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise BuildError("the SSH connection to the builder VM is closed")
        channel = transport.open_session()
        try:
            channel.set_combine_stderr(True)
            channel.settimeout(min(1.0, max(timeout / 5, 0.05)))  # how often the time limit is checked
            channel.exec_command(command)
            self._stream(channel, on_line, time.monotonic() + timeout, command)
            status = channel.recv_exit_status()
        finally:
            channel.close()
        if status == -1:  # paramiko: the channel closed without an exit status
            raise BuildError(f"the SSH connection dropped while running: {command}")
        return status

    @staticmethod
    def _stream(channel: paramiko.Channel, on_line: Callable[[str], None], deadline: float, command: str) -> None:
        pending = b""
        while True:
            try:
                chunk = channel.recv(32768)
            except socket.timeout:
                if time.monotonic() > deadline:
                    raise BuildError(f"remote command still running after its time limit: {command}") from None
                continue
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                on_line(line.decode("utf-8", "replace"))
        if pending:
            on_line(pending.decode("utf-8", "replace"))

    def output(self, command: str, *, timeout: float = 60.0) -> str:
        """The output of a short command; BuildError when it exits non-zero."""
        lines: list[str] = []
        status = self.run(command, lines.append, timeout=timeout)
        if status != 0:
            raise BuildError(f"{command} exited with status {status}: {' '.join(lines)[-300:]}")
        return "\n".join(lines).strip()

    def upload(self, files: dict[str, Path]) -> None:
        """Copy local files to the remote paths (keys) over SFTP, creating parent directories."""
        with self.client.open_sftp() as sftp:
            made: set[str] = set()
            for remote, local in files.items():
                self._mkdirs(sftp, remote.rsplit("/", 1)[0], made)
                sftp.put(str(local), remote)
                sftp.chmod(remote, local.stat().st_mode & 0o777)

    @staticmethod
    def _mkdirs(sftp: paramiko.SFTPClient, directory: str, made: set[str]) -> None:
        parts = directory.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            path = "/" + "/".join(parts[:depth])
            if path in made:
                continue
            try:
                sftp.stat(path)
            except FileNotFoundError:
                sftp.mkdir(path, 0o755)
            made.add(path)


def quote(argv: list[str]) -> str:
    return shlex.join(argv)
