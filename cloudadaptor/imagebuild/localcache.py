"""The local pod VM image cache: layout, the input key, the default agent payload.

A local image is a directory ``<cache>/<key>/`` holding ``disk.img`` (a raw
ext4 root file system), ``vmlinuz`` and ``initrd.img`` (from its ``/boot``)
and ``image.json`` (what it was built from, when, how long it took). The key
is the first 16 hex digits of a sha256 over every input: our wheel, every file
of ``images/podvm``, the agent payload, the Debian suite and package list, and
the local additions (``LOCAL_RECIPE_VERSION``); same inputs, same key, so a
second build is a cache hit. ``<cache>/current`` links to the newest build;
the local provider boots that unless told otherwise. Builds happen in
``<cache>/.build-<key>-<random>/`` and are renamed into place only when
complete, so an interrupted build never leaves a half image under a key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

DEBIAN_SUITE = "bookworm"
# A kernel, systemd (networkd configures eth0 from the kernel's ip= line), python3 for our
# components, iproute2 for netns@.service, udev for the virtio devices.
DEBIAN_PACKAGES = ("systemd-sysv", "udev", "linux-image-cloud-amd64", "python3", "iproute2", "ca-certificates")
LOCAL_RECIPE_VERSION = "2"  # bump when localbuild's additions to the tree change
DISK, KERNEL, INITRD, INFO = "disk.img", "vmlinuz", "initrd.img", "image.json"
CURRENT = "current"
BUILD_PREFIX = ".build-"
KEY_LENGTH = 16


def default_cache_dir(env: dict[str, str] | os._Environ[str]) -> Path:
    """``$LOCAL_IMAGE_CACHE``, else ``$XDG_CACHE_HOME/cloud-api-adaptor/podvm``, else ``~/.cache/...``."""
    if env.get("LOCAL_IMAGE_CACHE"):
        return Path(env["LOCAL_IMAGE_CACHE"])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "cloud-api-adaptor" / "podvm"


# The development agent as a kata-agent: reads server_addr from the agent config
# (as the real one does) and serves it. PYTHONPATH so the processes it starts
# (nsexec into podns) find our package too.
DEVAGENT_LAUNCHER = b'''#!/usr/bin/python3 -s
# kata-agent of a local pod VM image built without --agent-payload: the development
# agent (cloudadaptor.dev.devagent) serving the socket of server_addr in --config.
import os, sys, tomllib
PATHS = ["/opt/peerpod/lib", "/opt/peerpod/deps"]
sys.path[:0] = PATHS
os.environ["PYTHONPATH"] = ":".join(PATHS)
args = sys.argv[1:]
config = args[args.index("--config") + 1] if "--config" in args else "/etc/agent-config.toml"
with open(config, "rb") as f:
    address = tomllib.load(f)["server_addr"]
from cloudadaptor.dev.devagent import main
sys.exit(main(["--socket", address.removeprefix("unix://")]))
'''


def devagent_payload(target: Path) -> Path:
    """Write the default payload archive (``usr/local/bin/kata-agent`` = the launcher above),
    byte-for-byte the same every time so the cache key is stable."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        member = tarfile.TarInfo("usr/local/bin/kata-agent")
        member.size, member.mode, member.mtime = len(DEVAGENT_LAUNCHER), 0o755, 0
        archive.addfile(member, io.BytesIO(DEVAGENT_LAUNCHER))
    target.write_bytes(buffer.getvalue())
    return target


def input_key(wheel: Path, podvm_dir: Path, payload: Path) -> str:
    """The cache key of a build (see the module docstring)."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    add("wheel", wheel.read_bytes())
    for path in sorted(p for p in podvm_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        add("podvm/" + path.relative_to(podvm_dir).as_posix(), path.read_bytes())
    add("payload", payload.read_bytes())
    add("debian", f"{DEBIAN_SUITE} {' '.join(DEBIAN_PACKAGES)}".encode())
    add("recipe", LOCAL_RECIPE_VERSION.encode())
    return digest.hexdigest()[:KEY_LENGTH]


@dataclass(frozen=True)
class LocalImage:
    """A complete image in the cache."""

    key: str
    directory: Path
    info: dict[str, object]

    @property
    def disk(self) -> Path:
        return self.directory / DISK

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD


def read_image(directory: Path) -> LocalImage | None:
    """The image in ``directory`` when it is complete (all files and a readable image.json), else None."""
    try:
        info = json.loads((directory / INFO).read_text())
    except (OSError, ValueError):
        return None
    if not all((directory / name).is_file() for name in (DISK, KERNEL, INITRD)):
        return None
    return LocalImage(directory.resolve().name, directory.resolve(), info)


def list_images(cache: Path) -> list[LocalImage]:
    if not cache.is_dir():
        return []
    found = [read_image(p) for p in sorted(cache.iterdir()) if p.is_dir() and not p.is_symlink()
             and not p.name.startswith(".")]
    return [image for image in found if image is not None]


def current(cache: Path) -> LocalImage | None:
    """The image ``<cache>/current`` points at, if complete."""
    link = cache / CURRENT
    return read_image(link) if link.is_symlink() else None


def set_current(cache: Path, key: str) -> None:
    tmp = cache / f".{CURRENT}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(key, tmp)
    os.replace(tmp, cache / CURRENT)
