"""``image build local``: a bootable pod VM disk for the local provider's QEMU mode, on this machine.

Steps (``STEPS``): gather the inputs and compute the cache key (a hit ends
the build) → a Debian tree with ``mmdebstrap`` against the archive apt is
configured with → our components and units with **the same**
``images/podvm/provision.py install --root`` the cloud builds run → the
Python dependencies with ``pip install --target /opt/peerpod/deps`` → the
local additions (systemd-networkd takes eth0's address from the kernel's
``ip=``, as a cloud image takes it from DHCP) → ``mkfs.ext4 -d`` makes the
disk, kernel and initrd are copied from ``/boot`` → the directory is renamed
to its key and ``current`` points at it.

Everything happens in ``<cache>/.build-*``; on failure, Ctrl-C or SIGTERM the
child processes are stopped, any mount left under the build directory is
detached and the directory removed (the clean-up stack), so the cache never
holds a half image. Needs root (mmdebstrap's root mode keeps file owners).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cloudadaptor import __version__, linuxns
from cloudadaptor.imagebuild import inputs, localcache
from cloudadaptor.imagebuild import wheel as wheels
from cloudadaptor.imagebuild.cleanup import CleanupStack
from cloudadaptor.imagebuild.common import BuildError
from cloudadaptor.imagebuild.progress import Progress

STEPS = ("inputs and cache key", "Debian tree (mmdebstrap)", "pod VM components (provision.py install)",
         "Python dependencies (pip --target)", "local additions (networkd)", "disk image (mkfs.ext4 -d)", "publish")
TOOLS = {"mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs"}
GUEST_PYTHON = "/usr/bin/python3"
STOP_GRACE = 10.0
KEEP_IMAGES = 3
# unit -> the target whose .wants/ enables it (what `systemctl enable` would link)
NETWORK_UNITS = (("systemd-networkd.service", "multi-user.target"), ("systemd-networkd.socket", "sockets.target"),
                 ("systemd-network-generator.service", "sysinit.target"),
                 ("systemd-networkd-wait-online.service", "network-online.target"))


@dataclass(frozen=True)
class LocalBuildOptions:
    cache: Path
    payload: str | None = None
    wheel: Path | None = None
    podvm_files: Path | None = None
    rebuild: bool = False


@dataclass(frozen=True)
class LocalBuildResult:
    image: localcache.LocalImage
    cached: bool


def check_tools() -> None:
    missing = [f"{tool} (Debian package {package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise BuildError(f"missing {', '.join(missing)}: apt-get install -y {' '.join(sorted(set(TOOLS.values())))}")
    if os.geteuid() != 0:
        raise BuildError("image build local needs root (mmdebstrap must keep the files' owners)")


def build_local(options: LocalBuildOptions, progress: Progress) -> LocalBuildResult:
    """Build (or find in the cache) the local image; BuildError says what failed (nothing half-built is left)."""
    options.cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".inputs-", dir=options.cache) as scratch:
        progress.step(STEPS[0])
        podvm_dir = inputs.find_podvm_dir(options.podvm_files)
        provision = inputs.load_provision(podvm_dir)
        if options.payload:
            payload = inputs.fetch_payload(options.payload, Path(scratch))
            inputs.check_payload(payload, options.payload, provision)
        else:
            payload = localcache.devagent_payload(Path(scratch) / "devagent-payload.tar")
        try:
            wheel = wheels.find_wheel(options.wheel, Path(scratch))
        except ValueError as exc:
            raise BuildError(f"--wheel: {exc}") from None
        key = localcache.input_key(wheel, podvm_dir, payload)
        progress.info(f"key {key} (wheel {wheel.name}, payload {options.payload or 'development agent'})")
        found = localcache.read_image(options.cache / key)
        if found is not None and not options.rebuild:
            localcache.set_current(options.cache, key)
            progress.finish(f"cache hit: {found.directory}")
            return LocalBuildResult(found, cached=True)
        check_tools()
        work = options.cache / f"{localcache.BUILD_PREFIX}{key}-{secrets.token_hex(3)}"
        with CleanupStack(progress.info) as stack:
            stack.push(f"build directory {work}", lambda: remove_tree(work))
            image = _build(work, key, podvm_dir, wheel, payload, options, progress)
        progress.finish(f"built {image.directory}")
        return LocalBuildResult(image, cached=False)


def _build(work: Path, key: str, podvm_dir: Path, wheel: Path, payload: Path, options: LocalBuildOptions,
           progress: Progress) -> localcache.LocalImage:
    started = time.monotonic()
    tree = work / "tree"
    work.mkdir()
    progress.step(STEPS[1])
    run(["mmdebstrap", "--variant=apt", "--include=" + ",".join(localcache.DEBIAN_PACKAGES),
         localcache.DEBIAN_SUITE, str(tree)], progress, "mmdebstrap")
    progress.step(STEPS[2])
    run([sys.executable, str(podvm_dir / "provision.py"), "install", "--root", str(tree), "--wheel", str(wheel),
         "--payload", str(payload), "--payload-source", options.payload or "development agent (default)",
         "--python", GUEST_PYTHON, "--os-packages", "", "--cloud", "local"], progress, "provision.py install")
    progress.step(STEPS[3])
    run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
         "--target", str(tree / "opt/peerpod/deps"), "-r", str(podvm_dir / "requirements.txt"),
         *_pip_platform(tree)], progress, "pip install --target")
    # Byte-compile our code and its dependencies now: every VM boots from a fresh overlay, and
    # compiling at each start costs tens of seconds under TCG.
    run(["chroot", str(tree), GUEST_PYTHON, "-m", "compileall", "-q", "-j", "0", "/opt/peerpod"], progress,
        "compileall")
    progress.step(STEPS[4])
    add_local_parts(tree)
    progress.step(STEPS[5])
    release = make_disk(tree, work, progress)
    progress.step(STEPS[6])
    info = {"key": key, "built_by": "cloud-api-adaptor image build local", "builder_version": __version__,
            "wheel": wheel.name, "agent_payload": options.payload or "development agent (default)",
            "kernel_release": release, "debian": f"{localcache.DEBIAN_SUITE}: {' '.join(localcache.DEBIAN_PACKAGES)}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started, 1),
            "disk_bytes": (work / localcache.DISK).stat().st_size}
    (work / localcache.INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    remove_tree(tree)
    target = options.cache / key
    if target.exists():
        remove_tree(target)  # --rebuild
    os.rename(work, target)
    localcache.set_current(options.cache, key)
    for old in _older_images(options.cache, key):
        progress.info(f"removing old image {old.key}")
        remove_tree(old.directory)
    image = localcache.read_image(target)
    assert image is not None
    return image


def _older_images(cache: Path, newest: str) -> list[localcache.LocalImage]:
    """Images beyond the KEEP_IMAGES most recently built (each is ~800 MB; a code change makes a new one)."""
    images = sorted(localcache.list_images(cache), key=lambda i: i.directory.stat().st_mtime, reverse=True)
    keep = {newest} | {i.key for i in images[:KEEP_IMAGES]}
    return [i for i in images if i.key not in keep]


def _pip_platform(tree: Path) -> list[str]:
    """pip flags for the guest's Python when it is not ours (binary wheels of its version only)."""
    guest = sorted(p.name for p in (tree / "usr/bin").glob("python3.*") if p.name[8:].isdigit())
    ours = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not guest or ours in guest:
        return []
    return ["--only-binary=:all:", "--python-version", guest[-1].removeprefix("python"),
            "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64"]


def add_local_parts(tree: Path) -> None:
    """What a local VM needs beyond the cloud image: eth0 from ``ip=`` via networkd, a hostname."""
    for unit, target in NETWORK_UNITS:
        link = tree / "etc/systemd/system" / f"{target}.wants" / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            os.symlink(f"/lib/systemd/system/{unit}", link)
    (tree / "etc/hostname").write_text("podvm\n")
    (tree / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")


def make_disk(tree: Path, work: Path, progress: Progress) -> str:
    """disk.img from the tree, vmlinuz and initrd.img from its /boot; the kernel release."""
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise BuildError(f"no kernel in {tree}/boot (is linux-image-cloud-amd64 in the package list?)")
    release = kernels[-1].name.removeprefix("vmlinuz-")
    shutil.copyfile(kernels[-1], work / localcache.KERNEL)
    shutil.copyfile(tree / "boot" / f"initrd.img-{release}", work / localcache.INITRD)
    used = sum(p.lstat().st_size for p in tree.rglob("*"))
    size_mib = int(used * 1.3) // (1 << 20) + 256
    disk = work / localcache.DISK
    with open(disk, "wb") as f:
        f.truncate(size_mib << 20)
    run(["mkfs.ext4", "-q", "-F", "-L", "podvm-root", "-d", str(tree), str(disk)], progress, "mkfs.ext4")
    progress.info(f"kernel {release}, disk {size_mib} MiB")
    return release


def run(argv: list[str], progress: Progress, what: str) -> None:
    """Run ``argv`` in its own process group, its output going to ``progress``; on any
    exception (Ctrl-C, SIGTERM) the group gets SIGTERM, then SIGKILL, before it propagates."""
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True, text=True, errors="replace")
    try:
        assert child.stdout is not None
        for line in child.stdout:
            progress.remote(line)
        status = child.wait()
    except BaseException:
        stop_group(child)
        raise
    if status != 0:
        tail = " | ".join(progress.tail(5))
        raise BuildError(f"{what} exited with status {status}: {tail}")


def stop_group(child: subprocess.Popen[str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            pass
        try:
            child.wait(timeout=STOP_GRACE)
            return
        except subprocess.TimeoutExpired:
            continue


def remove_tree(path: Path) -> None:
    """Detach any mount under ``path`` (a killed mmdebstrap may leave /proc, /dev), then delete it."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        linuxns.umount(point)
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        raise OSError(f"cannot remove {path}")
