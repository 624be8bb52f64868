"""The builder VM side of a build: upload the inputs, run provision.py install, then seal.

Everything runs as the login user through ``sudo -n`` (passwordless sudo is
what RHEL cloud images give their default user and Azure gives its admin
user). Uploads go to a fresh ``mktemp -d`` directory, which ``seal`` removes
so the image carries no build files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cloudadaptor.imagebuild.common import BuildError, BuildInputs, BuildOptions, source_label
from cloudadaptor.imagebuild.progress import Progress
from cloudadaptor.imagebuild.ssh import RemoteHost, quote

FAILED_STEP = re.compile(r"^provision: step (\d+/\d+) \((.*)\) failed: (.*)$")


class ProvisioningFailed(BuildError):
    """provision.py exited non-zero; the message names its step and shows the end of its output."""


@dataclass(frozen=True)
class Uploaded:
    """Remote paths of the uploaded inputs."""

    workdir: str
    provision: str
    wheel: str
    payload: str


def upload(host: RemoteHost, inputs: BuildInputs, progress: Progress) -> Uploaded:
    """Make a remote work directory and copy provision.py, files/, the wheel and the payload into it."""
    workdir = host.output("mktemp -d /tmp/peerpod-image.XXXXXX")
    if not workdir.startswith("/tmp/peerpod-image."):
        raise BuildError(f"mktemp on the builder VM answered {workdir!r}")
    files: dict[str, Path] = {}
    for local in sorted(inputs.podvm_dir.rglob("*")):
        if local.is_file() and "__pycache__" not in local.parts:
            files[f"{workdir}/podvm/{local.relative_to(inputs.podvm_dir).as_posix()}"] = local
    wheel = f"{workdir}/{inputs.wheel.name}"
    payload = f"{workdir}/payload-{inputs.payload.name}"
    files[wheel] = inputs.wheel
    files[payload] = inputs.payload
    host.upload(files)
    progress.info(f"uploaded {len(files)} files to {workdir}")
    return Uploaded(workdir, f"{workdir}/podvm/provision.py", wheel, payload)


def _sudo(options: BuildOptions, script: str, *args: str) -> str:
    return quote(["sudo", "-n", options.remote_python, script, *args])


def install(host: RemoteHost, uploaded: Uploaded, inputs: BuildInputs, options: BuildOptions, cloud: str,
            progress: Progress) -> None:
    """Run ``provision.py install`` on the builder VM, streaming its output; ProvisioningFailed when it fails."""
    command = _sudo(options, uploaded.provision, "install", "--root", options.install_root,
                    "--wheel", uploaded.wheel, "--payload", uploaded.payload,
                    "--payload-source", source_label(inputs.payload_source), "--cloud", cloud)
    _run_checked(host, command, options, progress, "provisioning")


def seal(host: RemoteHost, uploaded: Uploaded, options: BuildOptions, cloud: str, user: str,
         progress: Progress) -> None:
    """Run ``provision.py seal`` (removes the work directory, host keys, the build user's keys; on Azure
    deprovisions). The last command of the build on the VM."""
    command = _sudo(options, uploaded.provision, "seal", "--root", options.install_root, "--cloud", cloud,
                    "--user", user, "--remove", uploaded.workdir)
    _run_checked(host, command, options, progress, "sealing")


def _run_checked(host: RemoteHost, command: str, options: BuildOptions, progress: Progress, what: str) -> None:
    status = host.run(command, progress.remote, timeout=options.provision_timeout)
    if status == 0:
        return
    tail = progress.tail()
    failed = next((FAILED_STEP.match(line) for line in reversed(tail) if FAILED_STEP.match(line)), None)
    where = f" at step {failed.group(1)} ({failed.group(2)}): {failed.group(3)}" if failed else ""
    shown = "\n".join(f"    | {line}" for line in tail[-15:]) or "    (no output)"
    raise ProvisioningFailed(f"{what} failed{where} (exit status {status}); last output of the builder VM:\n{shown}")
