"""The build's inputs, gathered and checked locally before any cloud resource exists.

- ``images/podvm`` (provision.py, requirements.txt, files/): ``--podvm-files``,
  else next to the source tree (a checkout, an editable install), else where
  the builder's container image puts it (``SHIPPED_PODVM``).
- The payload archive with the kata-agent (``--agent-payload`` /
  ``PODVM_AGENT_PAYLOAD``): a local path or an https URL (plain http is
  refused: the agent runs as root in every pod VM), downloaded with a size
  bound. A download needs the archive's expected sha256
  (``--agent-payload-sha256`` / ``PODVM_AGENT_PAYLOAD_SHA256``), checked
  before the archive is opened; a local file is checked when one is given.
  Then provision.py's own ``find_agent`` checks it, so the builder and the VM
  agree on what a valid payload is.
- Our wheel (``wheel.find_wheel``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import ModuleType

from cloudadaptor.imagebuild import wheel as wheels
from cloudadaptor.imagebuild.common import BuildError, BuildInputs, source_label

SHIPPED_PODVM = Path("/usr/share/cloud-api-adaptor/images/podvm")
SOURCE_PODVM = Path(__file__).resolve().parents[2] / "images" / "podvm"
MAX_PAYLOAD_BYTES = 2 << 30
DOWNLOAD_TIMEOUT = 60.0


def find_podvm_dir(requested: Path | None) -> Path:
    """The directory holding provision.py; BuildError naming the places looked at."""
    candidates = [requested] if requested is not None else [SOURCE_PODVM, SHIPPED_PODVM]
    for candidate in candidates:
        if (candidate / "provision.py").is_file() and (candidate / "files").is_dir():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise BuildError(f"pod VM files (provision.py, files/) not found in {looked}; pass --podvm-files DIR")


def load_provision(podvm_dir: Path) -> ModuleType:
    """provision.py as a module (its checks are the ones the VM runs)."""
    spec = importlib.util.spec_from_file_location("podvm_provision", podvm_dir / "provision.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHA256_KEY = "PODVM_AGENT_PAYLOAD_SHA256"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_sha256(text: str) -> str:
    """A sha256 as 64 hex digits (``sha256:`` prefix allowed); ValueError saying what is expected."""
    digest = text.strip().lower().removeprefix("sha256:")
    if not _SHA256.fullmatch(digest):
        raise ValueError(f"{SHA256_KEY}: expected the payload archive's sha256 as 64 hex digits")
    return digest


def fetch_payload(source: str, workdir: Path, *, timeout: float = DOWNLOAD_TIMEOUT, expect_sha256: str | None = None) -> Path:
    """The payload archive as a local file: ``source`` itself, or downloaded from an https URL.

    BuildError when the file is missing, the URL is not https, a download has
    no ``expect_sha256``, the download fails or exceeds ``MAX_PAYLOAD_BYTES``.
    (The digest itself is checked by ``verify_sha256``.)
    """
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    label = source_label(source)
    if scheme in ("", "file"):
        path = Path(source[len("file://"):] if scheme == "file" else source)
        if not path.is_file():
            raise BuildError(f"agent payload {source}: no such file (expected a tar archive holding usr/bin/kata-agent)")
        return path
    if scheme != "https":
        raise BuildError(f"agent payload {label}: only https URLs or local paths are accepted (the agent runs as root "
                         "in every pod VM; a download must be authenticated)")
    if expect_sha256 is None:
        raise BuildError(f"agent payload {label}: a download needs the archive's expected sha256: set {SHA256_KEY} "
                         "or pass --agent-payload-sha256")
    name = Path(urllib.parse.urlsplit(source).path).name or "payload.tar"
    target = workdir / name
    try:
        with urllib.request.urlopen(source, timeout=timeout) as response, target.open("wb") as out:
            copied = 0
            while chunk := response.read(1 << 20):
                copied += len(chunk)
                if copied > MAX_PAYLOAD_BYTES:
                    raise BuildError(f"agent payload {label}: larger than {MAX_PAYLOAD_BYTES >> 20} MiB")
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        raise BuildError(f"agent payload {label}: download failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise BuildError(f"agent payload {label}: download failed: {reason}") from None
    return target


def verify_sha256(path: Path, source: str, expected: str | None) -> None:
    """BuildError unless the file's sha256 is ``expected`` (None: nothing to check)."""
    if expected is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise BuildError(f"agent payload {source_label(source)}: sha256 is {digest.hexdigest()}, "
                         f"not {expected} ({SHA256_KEY}); refusing it")


def check_payload(path: Path, source: str, provision: ModuleType) -> str:
    """The kata-agent's sha256 in the payload archive; BuildError saying what is wrong with it."""
    source = source_label(source)
    try:
        with tarfile.open(path, "r:*") as archive:
            member = provision.find_agent(archive)
            stream = archive.extractfile(member)
            assert stream is not None
            digest = hashlib.sha256()
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    except provision.StepError as exc:
        raise BuildError(f"agent payload {source}: {str(exc).removeprefix('payload: ')}") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BuildError(f"agent payload {source} is not a readable tar archive: {exc}") from None
    return digest.hexdigest()


def gather(payload_source: str | None, wheel: Path | None, podvm_files: Path | None, workdir: Path,
           payload_sha256: str | None = None) -> BuildInputs:
    """Everything to upload, checked; BuildError for the first problem (nothing in the cloud yet)."""
    if not payload_source:
        raise BuildError("no agent payload: pass --agent-payload PATH|URL or set PODVM_AGENT_PAYLOAD "
                         "(a tar archive holding the kata-agent binary, e.g. usr/bin/kata-agent)")
    podvm_dir = find_podvm_dir(podvm_files)
    provision = load_provision(podvm_dir)
    payload = fetch_payload(payload_source, workdir, expect_sha256=payload_sha256)
    verify_sha256(payload, payload_source, payload_sha256)
    agent_sha256 = check_payload(payload, payload_source, provision)
    try:
        wheel_path = wheels.find_wheel(wheel, workdir)
        version = wheels.wheel_version(wheel_path)
    except ValueError as exc:
        raise BuildError(f"--wheel: {exc}") from None
    return BuildInputs(podvm_dir, wheel_path, version, payload, payload_source, agent_sha256)

