"""wait-for-claim: a warm-pool VM's "receive pod config" step.

Runs after ``process-user-data`` and ``netns@podns`` (nothing in it is the pod's, so a
pool VM has it before its claim), before the pod network. On a VM booted
for a pod (``apf.json`` names a pod network) it exits 0 at once: the pod
config came as user data. On a pool VM (``apf.json`` holds TLS material but
no pod) it listens on the agent port with mutual TLS (client certificates
must chain to the CA in ``apf.json``: only the adaptor gets in) and accepts
exactly one ttrpc call ``wire.CLAIM_SERVICE/CLAIM_METHOD`` whose payload is
the pod's user data, the same ``#cloud-config`` a cold VM gets at boot. It
checks that the payload carries a pod (``apf.json`` with TLS and a pod
network), writes it with ``process_user_data.receive`` (the code the boot
path uses), answers, stops listening and exits 0; the pod network, agent
and forwarder steps then run as on any VM. A payload that is not a pod config
is refused (INVALID_ARGUMENT) and the VM stays unclaimed; a second claim is
FAILED_PRECONDITION.

    cloud-api-adaptor wait-for-claim [--config apf.json] [--root /] [--host 0.0.0.0] [--port N]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
from pathlib import Path

from cloudadaptor import userdata
from cloudadaptor.commandline import setup_logging
from cloudadaptor.podconfig import ForwarderConfig
from cloudadaptor.podvm.process_user_data import ReceiveError, receive
from cloudadaptor.tls import server_context
from cloudadaptor.ttrpc.errors import Code, TtrpcError
from cloudadaptor.ttrpc.server import CallContext, Server
from cloudadaptor.userdata import APF_CONFIG_PATH
from cloudadaptor.wire import CLAIM_METHOD, CLAIM_SERVICE

log = logging.getLogger("cloudadaptor.podvm.claim")

ANSWER_GRACE = 0.05  # seconds between answering the claim and closing the listener: the reply is on the wire


def is_pool_vm(config: ForwarderConfig) -> bool:
    """A pool VM's apf.json: TLS material to be reached with, no pod yet."""
    return config.tls is not None and config.network is None and not config.sandbox_id


class ClaimReceiver:
    """Serves the one claim; ``claimed`` is set once the pod config is written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.claimed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._done = False

    async def handle(self, payload: bytes, ctx: CallContext) -> bytes:
        async with self._lock:  # exactly one claim: a second waits, then is refused
            if self._done:
                raise TtrpcError(Code.FAILED_PRECONDITION, "this pool VM is already claimed")
            check_pod_config(payload)
            try:
                receive(payload, "the claim", self.root)
            except ReceiveError as exc:
                raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from None
            self._done = True
        log.info("claimed: pod config written under %s", self.root)
        asyncio.get_running_loop().call_later(ANSWER_GRACE, self.claimed.set)
        return b""


def check_pod_config(payload: bytes) -> None:
    """Refuse (INVALID_ARGUMENT) a payload that is not a pod's user data: apf.json with TLS and a pod network."""
    try:
        entries = userdata.parse_entries(payload.decode("utf-8"))
        apf = [e for e in entries if e.path == APF_CONFIG_PATH]
        if not apf:
            raise ValueError(f"no {APF_CONFIG_PATH}")
        config = ForwarderConfig.from_json(apf[-1].content)
    except (UnicodeDecodeError, ValueError, userdata.UserDataError) as exc:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"claim refused: not a pod config: {exc}") from None
    if config.tls is None or config.network is None:
        raise TtrpcError(Code.INVALID_ARGUMENT, "claim refused: the pod config has no TLS material or no pod network")


async def wait_for_claim(config: ForwarderConfig, root: Path, host: str, port: int,
                         listening: asyncio.Future[int] | None = None) -> None:
    """Listen (mTLS) until one claim is written; returns after closing the listener.
    ``listening`` gets the bound port once connections are accepted."""
    assert config.tls is not None
    receiver = ClaimReceiver(root)
    server = Server(max_connections=16)
    server.register(CLAIM_SERVICE, CLAIM_METHOD, receiver.handle)
    bound = await server.serve_tcp(host, port, ssl=server_context(config.tls, config.tls_min_version))
    log.info("pool VM waiting for a claim on %s:%d (mTLS)", host, bound)
    if listening is not None:
        listening.set_result(bound)
    try:
        await receiver.claimed.wait()
    finally:
        await server.close()


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", default=APF_CONFIG_PATH, help=f"apf.json (default {APF_CONFIG_PATH})")
    parser.add_argument("--root", default="/", help="write the claimed pod config under this directory")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: listen_port from the config)")
    parser.add_argument("--log-level", default="info", help="debug | info | warning | error (default info)")
    return parser


def run(args: argparse.Namespace) -> int:
    """0 when the VM has its pod config (at boot, or claimed); 2 on bad configuration; 1 when it cannot listen."""
    setup_logging(args.log_level)
    try:
        config = ForwarderConfig.from_json(Path(args.config).read_bytes())
    except (OSError, ValueError) as exc:
        log.error("configuration refused: %s: %s", args.config, exc)
        return 2
    if not is_pool_vm(config):
        log.info("%s names a pod: configured at boot, no claim to wait for", args.config)
        return 0
    port = config.listen_port if args.port is None else args.port
    try:
        asyncio.run(wait_for_claim(config, Path(args.root), args.host, port))
    except ssl.SSLError as exc:
        log.error("configuration refused: %s: TLS material: %s", args.config, exc)
        return 2
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", args.host, port, exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argparse.ArgumentParser(prog="wait-for-claim", description=(__doc__ or "").splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
