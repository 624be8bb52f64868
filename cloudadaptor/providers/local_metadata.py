"""The local cloud's instance metadata service: AWS IMDSv2-compatible, at 169.254.169.254:80.

    python -m cloudadaptor.providers.local_metadata --cloud-dir DIR --bridge NAME

QEMU VMs fetch their user data the way an EC2 VM does, so the image's
``process-user-data`` runs unchanged: ``PUT /latest/api/token`` (header
``X-aws-ec2-metadata-token-ttl-seconds``, 1..21600) returns a session token;
``GET /latest/user-data`` with ``X-aws-ec2-metadata-token`` returns the user
data of the instance whose address is the request's source (found in the
instance records; 404 when none). A missing or unknown token is 401, as on EC2.

One service per cloud: its socket is bound to 169.254.169.254:80 *on the
cloud's bridge* (SO_BINDTODEVICE), so several clouds in one network namespace
each serve their own VMs. The provider starts it detached (``ensure_running``)
before a QEMU VM boots; it outlives the adaptor, as the VMs do, and exits when
its bridge or directory is gone, or when the cloud has held no instance for
``IDLE_EXIT`` seconds (checked under the cloud's lock, so a create racing with
the exit finds it gone and starts a new one).
"""

from __future__ import annotations

import argparse
import fcntl
import http.server
import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

ADDRESS = "169.254.169.254"
PORT = 80
PID_FILE = "metadata.pid"
LOG_FILE = "metadata.log"
SERVING = "serving IMDSv2 on"  # the line it prints once bound: the provider waits for it
MODULE = "cloudadaptor.providers.local_metadata"
IDLE_EXIT = 30.0
TOKEN_TTL_MAX = 21600


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cloud_dir: Path, bridge: str) -> None:
        self.cloud_dir = cloud_dir
        self.bridge = bridge
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (client ip, expiry)
        super().__init__((ADDRESS, PORT), _Handler, bind_and_activate=False)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bridge.encode())
        self.server_bind()
        self.server_activate()

    def user_data(self, ip: str) -> bytes | None:
        for entry in self.cloud_dir.iterdir():
            try:
                record = json.loads((entry / "instance.json").read_text())
                if record.get("ip") == ip:
                    return (entry / "run/cloud-data/user-data").read_bytes()
            except (OSError, ValueError):
                continue
        return None


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        print(f"{time.strftime('%H:%M:%S')} {self.client_address[0]} {format % args}", flush=True)

    def _reply(self, code: int, body: bytes = b"") -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        if self.path != "/latest/api/token":
            return self._reply(404)
        try:
            ttl = int(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= TOKEN_TTL_MAX:
            return self._reply(400, b"X-aws-ec2-metadata-token-ttl-seconds must be 1..21600\n")
        token = secrets.token_urlsafe(32)
        self.server.tokens[token] = (self.client_address[0], time.monotonic() + ttl)
        self._reply(200, token.encode())

    def do_GET(self) -> None:  # noqa: N802
        held = self.server.tokens.get(self.headers.get("X-aws-ec2-metadata-token", ""))
        if held is None or held[0] != self.client_address[0] or held[1] < time.monotonic():
            return self._reply(401)
        if self.path != "/latest/user-data":
            return self._reply(404)
        data = self.server.user_data(self.client_address[0])
        self._reply(200, data) if data is not None else self._reply(404)


def _bridge_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)  # this netns (sysfs may show another's)
    except OSError:
        return False
    return True


def _watch(server: _Server) -> None:
    """Shut the server down when its cloud is gone or idle (see the module docstring)."""
    idle_since = time.monotonic()
    while True:
        time.sleep(1.0)
        if not _bridge_exists(server.bridge) or not server.cloud_dir.is_dir():
            break
        if any(p.name.startswith("i-local-") for p in server.cloud_dir.iterdir()):
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > IDLE_EXIT:
            fd = os.open(server.cloud_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until exit: no create can see us alive and then lose us
            if not any(p.name.startswith("i-local-") for p in server.cloud_dir.iterdir()):
                _remove_pid_file(server.cloud_dir)
                os._exit(0)
            os.close(fd)
            idle_since = time.monotonic()
    _remove_pid_file(server.cloud_dir)
    os._exit(0)


def _remove_pid_file(cloud_dir: Path) -> None:
    try:
        if int((cloud_dir / PID_FILE).read_text()) == os.getpid():
            (cloud_dir / PID_FILE).unlink()
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local-metadata", description="the local cloud's IMDSv2 endpoint")
    parser.add_argument("--cloud-dir", required=True, type=Path)
    parser.add_argument("--bridge", required=True)
    args = parser.parse_args(argv)
    server = _Server(args.cloud_dir, args.bridge)
    print(f"{SERVING} {ADDRESS}:{PORT} (bridge {args.bridge}) for {args.cloud_dir}", flush=True)
    threading.Thread(target=_watch, args=(server,), daemon=True).start()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
