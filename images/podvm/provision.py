#!/usr/bin/env python3
"""Provision a peer pod VM image: install the pod VM components under a root directory.

    python3 provision.py install --root / --wheel cloudadaptor-X-py3-none-any.whl \\
        --payload podvm-payload.tar.gz [--python /usr/bin/python3.11] [--cloud aws|azure]
    python3 provision.py seal --root / --cloud aws|azure --user ec2-user [--remove DIR]

Runs with the base image's own python3 (RHEL 9: Python 3.9; standard library
only). ``install`` is idempotent: running it twice gives the same tree. It
installs, under ``--root`` (default ``/``):

- the kata-agent, taken from the operator's payload archive (a tar, optionally
  gzip/bzip2/xz compressed, holding ``usr/bin/kata-agent``,
  ``usr/local/bin/kata-agent`` or ``opt/kata/bin/kata-agent``), as
  ``/usr/local/bin/kata-agent``;
- our pod VM components from our wheel, unpacked into ``/opt/peerpod/lib``,
  started through ``/usr/local/bin/cloud-api-adaptor``;
- the configuration and systemd units in ``files/`` next to this script, and
  the units enabled (the ``multi-user.target.wants`` links ``systemctl enable``
  would make). Boot order: process-user-data -> netns@podns -> peerpod-claim
  (warm-pool VMs wait there for their pod) -> peerpod-network -> kata-agent ->
  agent-protocol-forwarder.

Steps that change the machine itself rather than the tree (dnf packages,
Python dependencies from the package index, SELinux labels, cloud-init and
waagent clean-up) run only when the root is ``/``: with another root (a test,
an inspection) they are reported as skipped.

``seal`` prepares the installed VM for capture: removes the build files,
the SSH host keys, the build user's authorized keys and the machine id (each
VM made from the image gets its own), then, on ``/``, cleans cloud-init and on
Azure deprovisions with waagent (which removes the build user: run it last).

Progress lines are ``==> [k/n] title``; the exit status is 0 on success, 1
when a step failed (its message on stderr), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
FILES_DIR = os.path.join(HERE, "files")
REQUIREMENTS = os.path.join(HERE, "requirements.txt")

AGENT_CANDIDATES = ("usr/bin/kata-agent", "usr/local/bin/kata-agent", "opt/kata/bin/kata-agent")
AGENT_TARGET = "usr/local/bin/kata-agent"
LAUNCHER = "usr/local/bin/cloud-api-adaptor"
LIB_DIR = "opt/peerpod/lib"
DEPS_DIR = "opt/peerpod/deps"
IMAGE_INFO = "etc/peerpod/image-info.json"
UNIT_DIR = "etc/systemd/system"
WANTS_DIR = "etc/systemd/system/multi-user.target.wants"
# unit to enable -> the unit file it is an instance of
ENABLED_UNITS = (
    ("process-user-data.service", "process-user-data.service"),
    ("netns@podns.service", "netns@.service"),
    ("peerpod-claim.service", "peerpod-claim.service"),
    ("peerpod-network.service", "peerpod-network.service"),
    ("kata-agent.service", "kata-agent.service"),
    ("agent-protocol-forwarder.service", "agent-protocol-forwarder.service"),
)
DEFAULT_PYTHON = "/usr/bin/python3.11"
DEFAULT_OS_PACKAGES = "python3.11 python3.11-pip iproute"
PACKAGE_NAME = "cloudadaptor"


class StepError(Exception):
    """A step failed; the message says what and why (one line)."""


# ----------------------------------------------------------------- helpers


def log(text: str) -> None:
    print(text, flush=True)


def under(root: str, relative: str) -> str:
    """``relative`` (an absolute path inside the VM, or relative to its root) under ``root``."""
    return os.path.join(root, relative.lstrip("/"))


def ensure_dir(path: str, mode: int = 0o755) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        return
    try:
        os.makedirs(path, mode)
    except OSError as exc:
        raise StepError("cannot create directory %s: %s" % (path, exc.strerror or exc))
    os.chmod(path, mode)


def write_file(path: str, data: bytes, mode: int) -> bool:
    """Make ``path`` hold ``data`` with ``mode`` (atomically); False when it already did."""
    try:
        with open(path, "rb") as current:
            same = current.read() == data
        if same and (os.stat(path).st_mode & 0o7777) == mode and not os.path.islink(path):
            return False
    except OSError:
        pass
    ensure_dir(os.path.dirname(path))
    fd, tmp = tempfile.mkstemp(prefix=".provision-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise StepError("cannot write %s: %s" % (path, exc.strerror or exc))
    return True


def ensure_symlink(path: str, target: str) -> None:
    if os.path.islink(path) and os.readlink(path) == target:
        return
    ensure_dir(os.path.dirname(path))
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)


def run(argv: list, what: str) -> None:
    """Run a command, its output going to ours; StepError when it fails."""
    log("    $ " + " ".join(argv))
    try:
        status = subprocess.call(argv)
    except OSError as exc:
        raise StepError("%s: cannot run %s: %s" % (what, argv[0], exc.strerror or exc))
    if status != 0:
        raise StepError("%s: %s exited with status %d" % (what, argv[0], status))


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------- payload


def member_name(name: str) -> str:
    """An archive member name without a leading ``./`` or ``/``."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def find_agent(archive: tarfile.TarFile) -> tarfile.TarInfo:
    """The kata-agent binary in a payload archive; StepError saying what was expected."""
    members = {member_name(m.name): m for m in archive.getmembers()}
    for candidate in AGENT_CANDIDATES:
        member = members.get(candidate)
        if member is None:
            continue
        if not member.isreg():
            raise StepError("payload: %s is not a regular file (a link or directory); expected the agent binary" % candidate)
        if member.size == 0:
            raise StepError("payload: %s is empty" % candidate)
        return member
    raise StepError("payload: no kata-agent binary in the archive (expected one of %s)" % ", ".join(AGENT_CANDIDATES))


def read_agent(payload: str) -> tuple:
    """(member name, agent bytes) from the payload archive at ``payload``."""
    try:
        with tarfile.open(payload, "r:*") as archive:
            member = find_agent(archive)
            stream = archive.extractfile(member)
            assert stream is not None
            return member_name(member.name), stream.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise StepError("payload %s is not a readable tar archive: %s" % (payload, exc))


# ------------------------------------------------------------------- wheel


def wheel_version(wheel: str) -> str:
    """The version in a wheel's file name (``name-version-tags.whl``)."""
    parts = os.path.basename(wheel).split("-")
    if len(parts) < 5 or not wheel.endswith(".whl"):
        raise StepError("%s is not a wheel file name (name-version-python-abi-platform.whl)" % wheel)
    return parts[1]


def check_wheel(wheel: str) -> list:
    """The wheel's member names, checked: ours, pure Python, no unsafe path."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise StepError("wheel %s is not readable: %s" % (wheel, exc))
    for name in names:
        if name.startswith("/") or ".." in name.split("/") or ".data/" in name:
            raise StepError("wheel %s: refusing member %s" % (wheel, name))
    if PACKAGE_NAME + "/cli.py" not in names:
        raise StepError("wheel %s does not hold the %s package" % (wheel, PACKAGE_NAME))
    return names


def unpack_wheel(wheel: str, target: str) -> None:
    """Replace ``target`` with the wheel's contents (files 0644, directories 0755)."""
    fresh = target + ".new"
    old = target + ".old"
    for leftover in (fresh, old):
        shutil.rmtree(leftover, ignore_errors=True)
    ensure_dir(fresh)
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            if name.endswith("/"):
                continue
            path = os.path.join(fresh, *name.split("/"))
            ensure_dir(os.path.dirname(path))
            with open(path, "wb") as out:
                out.write(archive.read(name))
            os.chmod(path, 0o644)
    if os.path.isdir(target):
        os.rename(target, old)
    os.rename(fresh, target)
    shutil.rmtree(old, ignore_errors=True)


def launcher(python: str) -> bytes:
    return (
        "#!%s -s\n"
        "# cloud-api-adaptor, pod VM side (process-user-data, pod-network, forwarder).\n"
        "# Installed by images/podvm/provision.py from our wheel; do not edit.\n"
        "import sys\n"
        "sys.path[:0] = [\"/%s\", \"/%s\"]\n"
        "from cloudadaptor.cli import main\n"
        "sys.exit(main())\n" % (python, LIB_DIR, DEPS_DIR)
    ).encode()


# ------------------------------------------------------------------- steps


class Install:
    """The ``install`` steps; each is idempotent."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = os.path.abspath(args.root)
        self.system = self.root == "/"
        self.agent_member = ""
        self.agent = b""

    def steps(self) -> list:
        return [
            ("checking the wheel and the payload archive", self.check_inputs),
            ("OS packages", self.os_packages),
            ("kata-agent from the payload", self.install_agent),
            ("pod VM components from the wheel", self.install_components),
            ("Python dependencies", self.python_dependencies),
            ("configuration and systemd units", self.install_files),
            ("enabling the units", self.enable_units),
        ]

    def skip(self, what: str) -> None:
        log("    skipped: %s only on the VM itself (root is %s, not /)" % (what, self.root))

    def check_inputs(self) -> None:
        check_wheel(self.args.wheel)
        self.agent_member, self.agent = read_agent(self.args.payload)
        log("    wheel %s (version %s)" % (os.path.basename(self.args.wheel), wheel_version(self.args.wheel)))
        log("    kata-agent: %s, %d bytes, sha256 %s" % (self.agent_member, len(self.agent), sha256_of(self.agent)))
        if not os.path.isdir(FILES_DIR):
            raise StepError("%s is missing (it ships with this script)" % FILES_DIR)

    def os_packages(self) -> None:
        packages = self.args.os_packages.split()
        if not packages:
            log("    none asked for")
            return
        if not self.system:
            self.skip("dnf install " + " ".join(packages))
            return
        if shutil.which("dnf") is None:
            raise StepError("OS packages: dnf not found; the base image must be RHEL 9 (or another dnf-based distribution)")
        run(["dnf", "-y", "install", "--setopt=install_weak_deps=False"] + packages, "OS packages")

    def install_agent(self) -> None:
        changed = write_file(under(self.root, AGENT_TARGET), self.agent, 0o755)
        log("    /%s %s" % (AGENT_TARGET, "installed" if changed else "unchanged"))

    def install_components(self) -> None:
        unpack_wheel(self.args.wheel, under(self.root, LIB_DIR))
        write_file(under(self.root, LAUNCHER), launcher(self.args.python), 0o755)
        log("    /%s, /%s (python %s)" % (LIB_DIR, LAUNCHER, self.args.python))

    def python_dependencies(self) -> None:
        if not self.system:
            self.skip("pip install -r requirements.txt")
            return
        run([self.args.python, "-m", "pip", "install", "--no-cache-dir", "--upgrade", "--target", "/" + DEPS_DIR,
             "-r", REQUIREMENTS], "Python dependencies")

    def install_files(self) -> None:
        for directory, _, names in sorted(os.walk(FILES_DIR)):
            for name in sorted(names):
                source = os.path.join(directory, name)
                relative = os.path.relpath(source, FILES_DIR)
                with open(source, "rb") as f:
                    write_file(under(self.root, relative), f.read(), 0o644)
                log("    /" + relative)
        info = {
            "built_by": "images/podvm/provision.py",
            "cloudadaptor_version": wheel_version(self.args.wheel),
            "kata_agent": {"member": self.agent_member, "sha256": sha256_of(self.agent)},
            "agent_payload": self.args.payload_source or os.path.basename(self.args.payload),
            "cloud": self.args.cloud,
        }
        write_file(under(self.root, IMAGE_INFO), (json.dumps(info, indent=2, sort_keys=True) + "\n").encode(), 0o644)
        log("    /" + IMAGE_INFO)

    def enable_units(self) -> None:
        for unit, unit_file in ENABLED_UNITS:
            if not os.path.isfile(under(self.root, UNIT_DIR + "/" + unit_file)):
                raise StepError("cannot enable %s: /%s/%s is missing" % (unit, UNIT_DIR, unit_file))
            ensure_symlink(under(self.root, WANTS_DIR + "/" + unit), "/%s/%s" % (UNIT_DIR, unit_file))
            log("    enabled " + unit)
        if self.system and shutil.which("restorecon"):
            run(["restorecon", "-R", "/usr/local/bin", "/opt/peerpod", "/etc/systemd/system", "/etc/default",
                 "/etc/agent-config.toml", "/etc/peerpod"], "SELinux labels")


class Seal:
    """The ``seal`` steps: make the installed VM ready to be captured as an image."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = os.path.abspath(args.root)
        self.system = self.root == "/"

    def steps(self) -> list:
        return [
            ("removing the build files", self.remove_build_files),
            ("resetting the VM's identity (SSH host keys, authorized keys, machine id)", self.reset_identity),
            ("cleaning the cloud agents (cloud-init, waagent)", self.clean_agents),
        ]

    def remove_build_files(self) -> None:
        for path in self.args.remove or []:
            shutil.rmtree(path, ignore_errors=True)
            log("    removed " + path)

    def reset_identity(self) -> None:
        patterns = ["etc/ssh/ssh_host_*_key", "etc/ssh/ssh_host_*_key.pub", "root/.ssh/authorized_keys"]
        if self.args.user:
            patterns.append("home/%s/.ssh/authorized_keys" % self.args.user)
        for pattern in patterns:
            for path in sorted(glob.glob(under(self.root, pattern))):
                os.unlink(path)
                log("    removed /" + os.path.relpath(path, self.root))
        machine_id = under(self.root, "etc/machine-id")
        if os.path.isfile(machine_id):
            write_file(machine_id, b"", 0o444)
            log("    emptied /etc/machine-id")

    def clean_agents(self) -> None:
        if not self.system:
            log("    skipped: cloud-init clean%s only on the VM itself (root is %s, not /)"
                % (" and waagent -deprovision+user" if self.args.cloud == "azure" else "", self.root))
            return
        if shutil.which("cloud-init"):
            run(["cloud-init", "clean", "--logs", "--seed"], "cloud-init clean")
        if self.args.cloud == "azure" and shutil.which("waagent"):
            run(["waagent", "-force", "-deprovision+user"], "waagent deprovision")


def run_steps(steps: list) -> int:
    total = len(steps)
    for number, (title, step) in enumerate(steps, 1):
        log("==> [%d/%d] %s" % (number, total, title))
        try:
            step()
        except StepError as exc:
            print("provision: step %d/%d (%s) failed: %s" % (number, total, title, exc), file=sys.stderr, flush=True)
            return 1
    log("==> done")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="provision.py", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    install = sub.add_parser("install", help="install the pod VM components under --root (idempotent)")
    install.add_argument("--root", default="/", help="install under this directory (default /)")
    install.add_argument("--wheel", required=True, help="our wheel (cloudadaptor-*.whl)")
    install.add_argument("--payload", required=True, help="payload archive holding the kata-agent")
    install.add_argument("--payload-source", default="", help="where the payload came from (recorded in image-info.json)")
    install.add_argument("--python", default=DEFAULT_PYTHON, help="interpreter of the pod VM components (default %(default)s)")
    install.add_argument("--os-packages", default=DEFAULT_OS_PACKAGES, help="dnf packages to install (default: %(default)s)")
    install.add_argument("--cloud", choices=("aws", "azure", "local"), default="aws",
                         help="the cloud the image is for (local: the local provider's QEMU VMs)")
    seal = sub.add_parser("seal", help="prepare the installed VM for capture as an image")
    seal.add_argument("--root", default="/", help="the installed root (default /)")
    seal.add_argument("--cloud", choices=("aws", "azure"), default="aws", help="the cloud the image is for")
    seal.add_argument("--user", default="", help="the build user whose authorized keys are removed")
    seal.add_argument("--remove", action="append", help="a build directory to remove (repeatable)")
    return parser


def main(argv: list = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.root):
        print("provision: --root %s is not a directory" % args.root, file=sys.stderr)
        return 2
    steps = Install(args).steps() if args.action == "install" else Seal(args).steps()
    return run_steps(steps)


if __name__ == "__main__":
    sys.exit(main())
