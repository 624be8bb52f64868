"""process-user-data: runs once in the pod VM at boot and writes the allow-listed files.

It fetches the user data from the cloud's metadata service (AWS IMDSv2, Azure
IMDS) or from a file (local provider), parses it as ``#cloud-config`` and
writes only ``userdata.ALLOWED_PATHS`` under ``--root``, each atomically
(temp file + rename) with the mode the user data gives (0600 by default for
apf.json, auth.json and initdata). Any other path is logged as refused and skipped.

When the user data carries ``/run/peerpod/initdata`` it is decoded
(``cloudadaptor.initdata``) and its ``aa.toml``, ``cdh.toml`` and
``policy.rego`` entries are written next to it (0600), with
``initdata.digest`` (0644): the hex digest of the TOML document with its
``algorithm``, as the Go adaptor writes it. Without initdata none of these
files is written. Initdata that cannot be decoded fails the run (exit 1)
before any of its files is written.

Fetching retries with backoff until ``--deadline``; then it prints one line
naming the source and the last failure and exits 1. User data that arrives
but cannot be parsed fails at once (retrying would not change it).

    cloud-api-adaptor process-user-data [--source auto|aws|azure|file] [--file PATH]
        [--imds-url URL] [--deadline 5m] [--root /]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import logging
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

from cloudadaptor import initdata, userdata
from cloudadaptor.files import write_atomic
from cloudadaptor.config import parse_duration
from cloudadaptor.retry import Backoff, RetryTimeout, retry_call

log = logging.getLogger(__name__)

DEFAULT_IMDS_URL = "http://169.254.169.254"
AWS_TOKEN_TTL = "21600"
AZURE_USER_DATA_QUERY = "/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
REQUEST_TIMEOUT = 5.0
FIRST_DELAY = 0.2
MAX_DELAY = 5.0
SOURCES = ("auto", "aws", "azure", "file")

# Metadata services are link-local: never go through an http(s)_proxy.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class FetchError(Exception):
    """One attempt to read the user data failed (retried until the deadline)."""


def _request(req: urllib.request.Request, timeout: float) -> bytes:
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        raise FetchError(f"HTTP {exc.code} {exc.reason} from {req.full_url}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"{req.full_url}: {reason}") from None


def fetch_aws(base_url: str, timeout: float) -> bytes:
    """IMDSv2: PUT a session token, then GET the user data with it."""
    base = base_url.rstrip("/")
    token_req = urllib.request.Request(
        f"{base}/latest/api/token", method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": AWS_TOKEN_TTL},
    )
    token = _request(token_req, timeout).decode("ascii", "replace").strip()
    data_req = urllib.request.Request(
        f"{base}/latest/user-data", headers={"X-aws-ec2-metadata-token": token}
    )
    return _request(data_req, timeout)


def fetch_azure(base_url: str, timeout: float) -> bytes:
    """Azure IMDS: the userData property, base64 encoded."""
    req = urllib.request.Request(
        base_url.rstrip("/") + AZURE_USER_DATA_QUERY, headers={"Metadata": "true"}
    )
    body = _request(req, timeout).strip()
    if not body:
        raise FetchError(f"no user data set on this VM ({req.full_url} returned nothing)")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise FetchError(f"{req.full_url}: userData is not base64") from None


def fetch_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FetchError(f"{path}: {exc.strerror or exc}") from None


def _fetcher(args: argparse.Namespace) -> tuple[str, Callable[[float], bytes]]:
    """(description of the source, one attempt given a timeout)."""
    url = args.imds_url
    if args.source == "file":
        return f"file {args.file}", lambda timeout: fetch_file(args.file)
    if args.source == "aws":
        return f"aws IMDS at {url}", lambda timeout: fetch_aws(url, timeout)
    if args.source == "azure":
        return f"azure IMDS at {url}", lambda timeout: fetch_azure(url, timeout)

    def auto(timeout: float) -> bytes:
        failures = []
        for name, fetch in (("aws", fetch_aws), ("azure", fetch_azure)):
            try:
                return fetch(url, timeout)
            except FetchError as exc:
                failures.append(f"{name}: {exc}")
        raise FetchError("; ".join(failures))

    return f"aws or azure IMDS at {url}", auto


def fetch_with_retries(
    source: str, attempt: Callable[[float], bytes], deadline_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> bytes:
    """Call ``attempt`` (given its request timeout) with backoff until it succeeds or ``deadline_s`` passes.

    Raises ``FetchError`` with a one-line message naming the source and the
    last failure. Blocks.
    """
    end = time.monotonic() + deadline_s

    def once() -> bytes:
        return attempt(max(0.1, min(REQUEST_TIMEOUT, end - time.monotonic())))

    def note(exc: BaseException, pause: float) -> None:
        log.info("user data not available yet from %s (%s); retrying", source, exc)

    try:
        return retry_call(once, timeout=deadline_s, sleep=sleep, on_retry=note,
                          backoff=Backoff(initial=FIRST_DELAY, factor=2.0, maximum=MAX_DELAY, jitter=0.0),
                          retryable=lambda exc: isinstance(exc, FetchError))
    except RetryTimeout as exc:
        raise FetchError(
            f"no user data from {source} after {exc.attempts} attempts within "
            f"{deadline_s:g}s; last error: {exc.last_error}"
        ) from None


def _mode(entry: userdata.WriteFile) -> int:
    perms = entry.permissions or userdata.DEFAULT_PERMISSIONS.get(entry.path, "0644")
    try:
        mode = int(perms, 8)
    except ValueError:
        log.warning("%s: ignoring bad permissions %r", entry.path, perms)
        mode = int(userdata.DEFAULT_PERMISSIONS.get(entry.path, "0644"), 8)
    return mode & 0o7777


def write_files(entries: Sequence[userdata.WriteFile], root: Path) -> list[Path]:
    """Write the allow-listed entries under ``root``; others are logged and skipped."""
    written = []
    for entry in entries:
        if entry.path not in userdata.ALLOWED_PATHS:
            log.warning("refused to write %s: not an allow-listed path", entry.path)
            continue
        target = root / entry.path.lstrip("/")
        write_atomic(target, entry.content.encode("utf-8"), _mode(entry))
        log.info("wrote %s", target)
        written.append(target)
    return written


DIGEST_NAME = "initdata.digest"
DATA_MODE, DIGEST_MODE = 0o600, 0o644


def initdata_files(entries: Sequence[userdata.WriteFile]) -> dict[str, tuple[bytes, int]]:
    """{path: (content, mode)} unpacked from the user data's initdata; empty without one.

    Pure (nothing written), so bad initdata fails the run before any file is:
    raises ``initdata.InitDataError`` naming the part."""
    given = [entry for entry in entries if entry.path == userdata.INITDATA_PATH]
    if not given:
        return {}
    doc = initdata.decode(given[-1].content, userdata.INITDATA_PATH)  # a later entry wins, as in write_files
    directory = userdata.INITDATA_PATH.rsplit("/", 1)[0]
    files = {f"{directory}/{name}": (doc.data[name].encode("utf-8"), DATA_MODE)
             for name in initdata.DATA_FILES if name in doc.data}
    ignored = sorted(set(doc.data) - set(initdata.DATA_FILES))
    if ignored:
        log.warning("initdata entries not unpacked (only %s are): %s", ", ".join(initdata.DATA_FILES), ", ".join(ignored))
    files[f"{directory}/{DIGEST_NAME}"] = (doc.digest_hex().encode("ascii"), DIGEST_MODE)
    log.info("initdata (%s) unpacks to %s", doc.algorithm, ", ".join(sorted(files)))
    return files


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--source", choices=SOURCES, default="auto",
                        help="where the user data comes from (auto: aws, then azure)")
    parser.add_argument("--file", help="user data file (--source file)")
    parser.add_argument("--imds-url", default=DEFAULT_IMDS_URL,
                        help="metadata service base URL (default %(default)s)")
    parser.add_argument("--deadline", default="5m",
                        help="give up after this long, Go duration (default %(default)s)")
    parser.add_argument("--root", default="/", help="write files under this directory")
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"process-user-data: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace, sleep: Callable[[float], None] = time.sleep) -> int:
    """Fetch, parse and write; 0 on success, 1 on failure, 2 on bad options.

    ``sleep`` waits between fetch attempts (the namespace VM's init, which
    calls this in-process, passes one that a shutdown interrupts)."""
    try:
        deadline = parse_duration(args.deadline)
    except ValueError as exc:
        return _fail(f"--deadline {args.deadline!r}: {exc}", 2)
    if args.source == "file" and not args.file:
        return _fail("--source file needs --file PATH", 2)
    source, attempt = _fetcher(args)
    try:
        raw = fetch_with_retries(source, attempt, deadline, sleep)
    except FetchError as exc:
        return _fail(str(exc))
    try:
        receive(raw, source, Path(args.root))
    except ReceiveError as exc:
        return _fail(str(exc))
    return 0


class ReceiveError(Exception):
    """The pod config cannot be used (not UTF-8, not cloud-config, bad initdata) or written; one line."""


def receive(raw: bytes, source: str, root: Path) -> list[userdata.WriteFile]:
    """"Receive pod config": parse user data, unpack its initdata, write the allow-listed files under ``root``.

    The one step both deliveries end in: user data at boot (``run``) and a warm-pool claim
    (``podvm/claim.py``). Nothing is written when parsing fails. Raises ``ReceiveError``.
    """
    try:
        entries = userdata.parse_entries(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ReceiveError(f"user data from {source} is not UTF-8 text") from None
    except userdata.UserDataError as exc:
        raise ReceiveError(f"user data from {source}: {exc}") from None
    try:
        unpacked = initdata_files(entries)
    except initdata.InitDataError as exc:
        raise ReceiveError(str(exc)) from None
    try:
        write_files(entries, root)
        for path, (content, mode) in unpacked.items():
            write_atomic(root / path.lstrip("/"), content, mode)
            log.info("wrote %s", path)
    except OSError as exc:
        raise ReceiveError(f"cannot write user data files: {exc}") from None
    if userdata.APF_CONFIG_PATH not in {entry.path for entry in entries}:
        log.warning("user data carried no %s", userdata.APF_CONFIG_PATH)
    return list(entries)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argparse.ArgumentParser(
        prog="process-user-data", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
