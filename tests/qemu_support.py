"""What the QEMU-mode tests share: the pod VM images of this checkout, the leftover check,
a truncated image, and the CI rule (a missing QEMU or image fails under CI=true, never skips).

The images are the ones ``make podvm-image`` builds outside the private namespace
(mmdebstrap needs the machine's real root): the default one (development agent)
and one whose kata-agent is the third-party agent (``fakes/thirdpartypayload.py``).
A test finds each by its cache key, computed from the same inputs, so it never
boots an image of other code. The fixtures are registered in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from cloudadaptor.imagebuild import inputs, localcache
from cloudadaptor.imagebuild.wheel import build_wheel
from cloudadaptor.providers.base import ProviderError
from cloudadaptor.providers.local import qemu
from fakes import thirdpartypayload


def unavailable(reason: str) -> None:
    """Skip, or fail under CI=true (where skipping would hide the test)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"QEMU e2e cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def podvm_wheel() -> Iterator[Path]:
    """This checkout's wheel (one build per session; every image key covers it)."""
    with tempfile.TemporaryDirectory() as scratch:
        yield build_wheel(Path(scratch))


def cached_image(wheel: Path, payload: Path, build_command: str) -> localcache.LocalImage:
    """The cached image of this checkout with ``payload``; skip/fail naming ``build_command`` when absent."""
    try:
        qemu.binary(qemu.QEMU)
        qemu.binary(qemu.QEMU_IMG)
    except ProviderError as exc:
        unavailable(str(exc))
    key = localcache.input_key(wheel, inputs.find_podvm_dir(None), payload)
    cache = localcache.default_cache_dir(dict(os.environ))
    image = localcache.read_image(cache / key)
    if image is None:
        unavailable(f"no image {key} in {cache}: run `{build_command}` (make podvm-image does, before the tests)")
    assert image is not None
    return image


@pytest.fixture(scope="session")
def qemu_image(podvm_wheel: Path) -> localcache.LocalImage:
    """The default image (development agent as kata-agent) built from exactly this checkout."""
    with tempfile.TemporaryDirectory() as scratch:
        payload = localcache.devagent_payload(Path(scratch) / "payload.tar")
        return cached_image(podvm_wheel, payload, "cloud-api-adaptor image build local")


@pytest.fixture(scope="session")
def thirdparty_qemu_image(podvm_wheel: Path) -> localcache.LocalImage:
    """The image whose kata-agent is ``fakes/thirdpartyagent.py`` (not our development agent)."""
    with tempfile.TemporaryDirectory() as scratch:
        payload = thirdpartypayload.write(Path(scratch) / "thirdparty-payload.tar")
        return cached_image(podvm_wheel, payload, "python tests/fakes/thirdpartypayload.py P.tar && "
                                                  "cloud-api-adaptor image build local --agent-payload P.tar")


def truncated_copy(image: localcache.LocalImage, target: Path) -> Path:
    """An image directory with ``image``'s kernel and initrd and the first MiB of its disk
    (no file system: the guest kernel panics when it mounts the root)."""
    target.mkdir()
    for name in (localcache.KERNEL, localcache.INITRD):
        shutil.copyfile(image.directory / name, target / name)
    with open(image.disk, "rb") as src, open(target / localcache.DISK, "wb") as dst:
        dst.write(src.read(1 << 20))
    (target / localcache.INFO).write_text(json.dumps({"key": "truncated"}))
    return target


def leftovers(cloud_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """(``lc-`` taps/veths, instance directories, QEMU processes) of the local cloud at ``cloud_dir``."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = [link.get("IFLA_IFNAME") for link in ipr.get_links() if link.get("IFLA_IFNAME").startswith("lc-")]
    instances = [p.name for p in cloud_dir.iterdir() if p.name.startswith("i-local-")] if cloud_dir.exists() else []
    return links, instances, qemu_processes(cloud_dir)


def qemu_processes(cloud_dir: Path) -> list[str]:
    """PIDs of QEMU processes booting a VM of the local cloud at ``cloud_dir``."""
    processes = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and str(cloud_dir).encode() in cmdline:
            processes.append(pid)
    return processes
