"""One image build, the same for both clouds: the order of steps and the clean-up guarantee.

    inputs checked locally → image name checked → builder VM started → SSH →
    upload → provision.py install → seal → image created → temporaries removed
    (→ peer-pods-cm patched)

Nothing exists in the cloud until the inputs and the image name are known
good. From the builder VM on, every temporary resource has its undo on a
``CleanupStack`` that runs on success, failure, Ctrl-C and SIGTERM; a failed
clean-up is raised as ``CleanupError`` listing what is left.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cloudadaptor.imagebuild import inputs as build_inputs
from cloudadaptor.imagebuild import remote
from cloudadaptor.imagebuild.cleanup import CleanupStack
from cloudadaptor.imagebuild.common import (
    BuildInputs, BuildOptions, ImageBackend, ImageExists, ImageInfo, image_tags, new_build_id, source_label,
)
from cloudadaptor.imagebuild.progress import Progress
from cloudadaptor.imagebuild.ssh import RemoteHost, wait_for_ssh

CHECK_INPUTS = "checking the inputs (payload, wheel, pod VM files)"
CHECK_NAME = "checking the image name and the base image"
LAUNCH = "starting the builder VM"
WAIT_SSH = "waiting for SSH"
UPLOAD = "uploading"
PROVISION = "provisioning (provision.py install)"
SEAL = "sealing (provision.py seal)"
CAPTURE = "creating the image"
CLEANUP = "removing temporary resources"
PUBLISH = "publishing the gallery image version"
CONFIGMAP = "updating peer-pods-cm"
STEPS = (CHECK_INPUTS, CHECK_NAME, LAUNCH, WAIT_SSH, UPLOAD, PROVISION, SEAL, CAPTURE, CLEANUP)


@dataclass(frozen=True)
class InputSpec:
    """Where the inputs come from (see ``inputs.gather``)."""

    payload: str | None
    wheel: Path | None = None
    podvm_files: Path | None = None
    payload_sha256: str | None = None  # PODVM_AGENT_PAYLOAD_SHA256: required for a download


@dataclass(frozen=True)
class BuildResult:
    image_id: str
    name: str
    reused: bool = False  # --keep-existing found one
    durations: dict[str, float] = field(default_factory=dict)


def steps_for(update_configmap: bool, publish: bool = False) -> list[str]:
    return [*STEPS, *([PUBLISH] if publish else []), *([CONFIGMAP] if update_configmap else [])]


def build_image(backend: ImageBackend, options: BuildOptions, spec: InputSpec, progress: Progress,
                update_configmap: Callable[[str], None] | None = None,
                publish: Callable[[str], str] | None = None) -> BuildResult:
    """Build the image ``options.name`` with ``backend``; the result, or an exception.

    Raises ``BuildError`` (incl. ``ImageExists``, ``SshUnavailable``,
    ``ProvisioningFailed``) after removing every temporary resource,
    ``CleanupError`` when some could not be removed, and lets
    ``KeyboardInterrupt``/``Terminated`` through after the clean-up.
    ``publish(image_id)`` (a gallery, ``--gallery``) runs after the build and its
    result becomes the image id; ``update_configmap(image_id)`` runs last when given.
    """
    with tempfile.TemporaryDirectory(prefix="peerpod-image-") as tmp:
        progress.step(CHECK_INPUTS)
        inputs = build_inputs.gather(spec.payload, spec.wheel, spec.podvm_files, Path(tmp), spec.payload_sha256)
        progress.info(f"kata-agent sha256 {inputs.agent_sha256} from {source_label(inputs.payload_source)}")
        progress.info(f"pod VM components {inputs.wheel.name}")
        progress.step(CHECK_NAME)
        existing = backend.find_image(options.name)
        if existing is not None and not (options.replace or options.keep_existing):
            raise ImageExists(f"an image named {options.name} already exists ({existing.id}); pass --replace to "
                              "build a new one in its place, --keep-existing to use it, or --name for another name")
        if existing is not None and options.keep_existing:
            progress.info(f"keeping the existing image {existing.id}")
            image_id, reused = existing.id, True
        else:
            image_id, reused = _build(backend, options, inputs, existing, progress), False
    if publish is not None:
        progress.step(PUBLISH)
        image_id = publish(image_id)
    if update_configmap is not None:
        progress.step(CONFIGMAP)
        update_configmap(image_id)
    progress.finish(f"image {options.name}: {image_id}")
    return BuildResult(image_id, options.name, reused, dict(progress.durations))


def _build(backend: ImageBackend, options: BuildOptions, inputs: BuildInputs, existing: ImageInfo | None,
           progress: Progress) -> str:
    base_image = backend.resolve_base_image(options.base_image)
    progress.info(f"base image {base_image}")
    build_id = new_build_id()
    tags = image_tags(inputs, base_image, build_id, options.tags)
    stack = CleanupStack(report=progress.info)
    with stack:
        try:
            host = _prepare_vm(backend, stack, build_id, base_image, options, progress)
            _provision(host, inputs, options, backend.cloud, progress)
            progress.step(CAPTURE)

            def replace_old() -> None:
                if existing is not None:
                    backend.delete_image(existing)
                    progress.info(f"deleted the old image {existing.id} (--replace)")

            image_id = backend.capture(stack, build_id, options, tags, replace_old)
            progress.info(f"image {image_id} is available")
        finally:
            progress.step(CLEANUP)
    return image_id


def _prepare_vm(backend: ImageBackend, stack: CleanupStack, build_id: str, base_image: str,
                options: BuildOptions, progress: Progress) -> RemoteHost:
    progress.step(LAUNCH)
    access = backend.launch(stack, build_id, base_image, options)
    progress.info(f"builder VM {access.host} is running")
    if options.ssh_endpoint is not None:
        progress.info(f"reaching its SSH through {options.ssh_endpoint[0]}:{options.ssh_endpoint[1]} (--ssh-endpoint)")
        access = dataclasses.replace(access, host=options.ssh_endpoint[0], port=options.ssh_endpoint[1])
    progress.step(WAIT_SSH)
    host = wait_for_ssh(access, timeout=options.ssh_timeout, interval=options.ssh_poll_interval)
    stack.push("the SSH session", host.close)
    progress.info(f"logged in as {access.username}@{access.host}:{access.port}")
    return host


def _provision(host: RemoteHost, inputs: BuildInputs, options: BuildOptions, cloud: str, progress: Progress) -> None:
    progress.step(UPLOAD)
    uploaded = remote.upload(host, inputs, progress)
    progress.step(PROVISION)
    remote.install(host, uploaded, inputs, options, cloud, progress)
    progress.step(SEAL)
    user = host.client.get_transport().get_username() if host.client.get_transport() else ""
    remote.seal(host, uploaded, options, cloud, user or "", progress)
    host.close()
