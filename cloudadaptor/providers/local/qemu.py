"""QEMU VMs of the local cloud (``LOCAL_VM=qemu``), blocking: image, tap, process, QMP, metadata service.

A VM is a daemonized ``qemu-system-x86_64`` booting the image ``image build
local`` made (kernel, initrd and root disk of ``LOCAL_QEMU_IMAGE``, default:
the cache's ``current``) through a copy-on-write overlay
``<instance dir>/disk.qcow2``, so VMs never change the image. Its NIC is a
persistent tap ``lc-<12 hex>`` (the name a namespace VM's veth has, so the
same removal finds it) on the cloud bridge; its address comes from the
kernel's ``ip=`` (systemd-networkd in the image), its user data from the
cloud's metadata service (``providers/local_metadata.py``) at 169.254.169.254. Serial
console: ``<instance dir>/console.log``; QMP: ``qmp.sock``; PID: ``qemu.pid``.
QEMU is not a child of the adaptor (``-daemonize``) and survives its restart.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import IPRoute

from cloudadaptor.imagebuild import localcache
from cloudadaptor.providers import local_metadata as metadata
from cloudadaptor.providers.base import ProviderError
from cloudadaptor.providers.local.config import LocalConfig

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
PACKAGES = {QEMU: "qemu-system-x86", QEMU_IMG: "qemu-utils"}
PID_FILE, QMP_SOCKET, OVERLAY = "qemu.pid", "qmp.sock", "disk.qcow2"
START_TIMEOUT = 30.0
QUIT_TIMEOUT = 5.0
KVM_PROBE_TIMEOUT = 5.0
_accel_cache: dict[str, str] = {}


def binary(name: str) -> str:
    """The path of a QEMU tool; ProviderError naming the Debian package when it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    if path is not None:
        return path
    raise ProviderError(f"{name} not found: install the Debian package {PACKAGES[name]} (apt-get install -y {PACKAGES[name]})")


def image_for(cfg: LocalConfig) -> localcache.LocalImage:
    """The image to boot; ProviderError with the exact build command when there is none."""
    if cfg.qemu_image is not None:
        image = localcache.read_image(cfg.qemu_image)
        where = str(cfg.qemu_image)
    else:
        cache = localcache.default_cache_dir(dict(os.environ))
        image = localcache.current(cache)
        where = f"{cache}/{localcache.CURRENT}"
    if image is None:
        raise ProviderError(f"no pod VM image at {where}: build it with `cloud-api-adaptor image build local`")
    return image


def accelerator(cfg: LocalConfig, image: localcache.LocalImage) -> str:
    """``kvm`` or ``tcg``: LOCAL_QEMU_ACCEL, or for ``auto`` a short probe (cached per process):
    KVM counts only when a guest kernel really runs under it (here /dev/kvm exists but guests hang)."""
    if cfg.qemu_accel != "auto":
        return cfg.qemu_accel
    if "auto" not in _accel_cache:
        _accel_cache["auto"] = _probe_kvm(image)
        log.info("local QEMU VMs use %s (KVM probe %s)", _accel_cache["auto"].upper(),
                 "succeeded" if _accel_cache["auto"] == "kvm" else "failed: falling back to TCG")
    return _accel_cache["auto"]


def _probe_kvm(image: localcache.LocalImage) -> str:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    argv = [binary(QEMU), "-accel", "kvm", "-m", "256", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-serial", "stdio", "-kernel", str(image.kernel), "-append", "console=ttyS0 panic=-1"]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=KVM_PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return "tcg"  # subprocess.run killed it
    return "kvm" if b"Kernel panic" in done.stdout else "tcg"


def mac_address(instance_id: str) -> str:
    digest = hashlib.sha256(instance_id.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def kernel_command_line(cfg: LocalConfig, ip: str) -> str:
    netmask = str(cfg.cidr.netmask)
    return (f"root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1 systemd.journald.forward_to_console=1 "
            f"ip={ip}::{cfg.gateway}:{netmask}:podvm:eth0:off")


def ensure_metadata(cfg: LocalConfig) -> None:
    """The metadata address on the bridge and the cloud's metadata service running (call under the cloud lock)."""
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=cfg.bridge)[0]
        have = {a.get("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
        if metadata.ADDRESS not in have:
            ipr.addr("add", index=index, address=metadata.ADDRESS, prefixlen=32)
    pid_file = cfg.cloud_dir / metadata.PID_FILE
    with contextlib.suppress(OSError, ValueError):
        if _cmdline_has(int(pid_file.read_text()), metadata.MODULE, str(cfg.cloud_dir)):
            return
    log_file = cfg.cloud_dir / metadata.LOG_FILE
    with open(log_file, "ab") as out:
        logged = out.tell()
        child = subprocess.Popen([sys.executable, "-m", metadata.MODULE, "--cloud-dir", str(cfg.cloud_dir),
                                  "--bridge", cfg.bridge], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
    pid_file.write_text(f"{child.pid}\n")
    _wait_serving(child, log_file, logged)


def _wait_serving(child: subprocess.Popen[bytes], log_file: Path, logged: int) -> None:
    """Return once the metadata service says it serves; ProviderError with its last output when it exits
    or stays silent: a guest without it would only fail PROXY_TIMEOUT later, with no word of why."""
    deadline = time.monotonic() + START_TIMEOUT
    output = b""
    with open(log_file, "rb") as written:
        written.seek(logged)
        while time.monotonic() < deadline:
            output += written.read()  # only what the service wrote since
            if metadata.SERVING.encode() in output:
                return
            if child.poll() is not None:
                output += written.read()  # its last words, written before it exited
                tail = " | ".join(output.decode(errors="replace").strip().splitlines()[-3:]) or "no output"
                raise ProviderError(f"the local metadata service ({metadata.MODULE}) exited with status "
                                    f"{child.returncode} at start: {tail} (log {log_file})")
            time.sleep(0.02)
    child.kill()
    child.wait()
    raise ProviderError(f"the local metadata service ({metadata.MODULE}) did not start serving within "
                        f"{START_TIMEOUT:.0f}s (log {log_file})")


def create_tap(cfg: LocalConfig, name: str) -> None:
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap")
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise ProviderError(f"cannot create tap {name} (is /dev/net/tun usable?): {exc}") from exc
        index = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=index, master=ipr.link_lookup(ifname=cfg.bridge)[0], state="up")


def launch(cfg: LocalConfig, instance_id: str, directory: Path, ip: str, tap: str) -> int:
    """Overlay, tap and a daemonized QEMU booting the image; its PID. ProviderError when QEMU does not start."""
    qemu = binary(QEMU)
    image = image_for(cfg)
    accel = accelerator(cfg, image)
    subprocess.run([binary(QEMU_IMG), "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.disk),
                    str(directory / OVERLAY)], check=True, capture_output=True, timeout=START_TIMEOUT)
    create_tap(cfg, tap)
    argv = [qemu, "-name", instance_id, "-accel", accel, "-machine", "q35", "-cpu", "max" if accel == "tcg" else "host",
            "-m", str(cfg.qemu_memory), "-smp", str(cfg.qemu_cpus), "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", kernel_command_line(cfg, ip),
            "-drive", f"file={directory / OVERLAY},if=virtio,format=qcow2",
            "-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={mac_address(instance_id)}",
            "-device", "virtio-rng-pci",
            "-serial", f"file:{directory / 'console.log'}",
            "-qmp", f"unix:{directory / QMP_SOCKET},server=on,wait=off",
            "-pidfile", str(directory / PID_FILE), "-daemonize"]
    (directory / "qemu.json").write_text(json.dumps({"accel": accel, "image": str(image.directory),
                                                     "argv": argv}, indent=2) + "\n")
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, cwd="/", timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ProviderError(f"QEMU for {instance_id} did not start within {START_TIMEOUT:g}s") from None
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise ProviderError(f"QEMU for {instance_id} failed to start (exit {done.returncode}): {message[0]}")
    log.info("local VM %s: QEMU (%s) booting %s", instance_id, accel.upper(), image.key)
    return int((directory / PID_FILE).read_text())


def stop(instance_id: str, directory: Path, console_tail: str) -> None:
    """QMP ``quit``, then SIGKILL after QUIT_TIMEOUT; nothing when QEMU does not run. Logs the
    console tail when the guest had already died (a panic, a wrong root). ProviderError if it survives."""
    try:
        pid = int((directory / PID_FILE).read_text())
    except (OSError, ValueError):
        pid = 0  # QEMU removes its pid file when it exits
    if not pid or not _cmdline_has(pid, QEMU, str(directory)):
        if (directory / OVERLAY).exists():
            log.warning("local VM %s had stopped by itself; console: %s", instance_id, console_tail)
        return
    log.info("local VM %s: stopping QEMU (pid %d); console: %s", instance_id, pid, console_tail)
    with contextlib.suppress(OSError, ValueError):
        _qmp_quit(directory / QMP_SOCKET)
    for sig in (None, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + QUIT_TIMEOUT
        while _cmdline_has(pid, QEMU, str(directory)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _cmdline_has(pid, QEMU, str(directory)):
            return
    raise ProviderError(f"local VM {instance_id} (QEMU pid {pid}) survived SIGKILL")


def _qmp_quit(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(str(path))
        reader = sock.makefile("rb")
        reader.readline()  # greeting
        for command in ("qmp_capabilities", "quit"):
            sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
            reader.readline()


def _cmdline_has(pid: int, *words: str) -> bool:
    """Whether ``pid`` runs (not a zombie) with every one of ``words`` in its command line."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace")
    except (OSError, IndexError):
        return False
    return all(word in args for word in words)
