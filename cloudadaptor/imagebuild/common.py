"""What both clouds' image builds share: errors, names, tags, options and the backend interface.

Temporary resources are named ``peerpod-image-builder-<build id>`` and
tagged ``peerpods.io/image-build=<build id>``; they never carry
``peerpods.io/owner`` (the peerpod-controller would sweep a builder VM as
an orphan pod VM). The image carries ``peerpods.io/built-by`` and the
versions it was built from.
"""

from __future__ import annotations

import secrets
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol

from cloudadaptor import __version__
from cloudadaptor.imagebuild.cleanup import CleanupStack
from cloudadaptor.retry import Backoff

DEFAULT_IMAGE_NAMES = {"aws": "peer-pod-ami", "azure": "peer-pod-vmimage"}
CONFIGMAP_KEYS = {"aws": "PODVM_AMI_ID", "azure": "AZURE_IMAGE_ID"}
NAME_PREFIX = "peerpod-image-builder-"

TAG_BUILD = "peerpods.io/image-build"
TAG_BUILT_BY = "peerpods.io/built-by"
TAG_BUILDER_VERSION = "peerpods.io/builder-version"
TAG_PODVM_VERSION = "peerpods.io/podvm-version"
TAG_BASE_IMAGE = "peerpods.io/base-image"
TAG_AGENT_SHA256 = "peerpods.io/kata-agent-sha256"
TAG_AGENT_PAYLOAD = "peerpods.io/agent-payload"
BUILT_BY = "cloud-api-adaptor image build"


def builder_backoff(interval: float) -> Backoff:
    """The image builder's pace for ``retry_call``: the poll ``interval`` first, doubling up to ten times it."""
    return Backoff(initial=interval, factor=2.0, maximum=max(interval * 10, interval))


class BuildError(Exception):
    """The build failed; the message says what failed and what to check (temporaries are cleaned up)."""


class ImageExists(BuildError):
    """An image of the requested name exists (and neither --replace nor --keep-existing was given)."""


def source_label(source: str) -> str:
    """Where the payload came from, safe to show and record: a URL without credentials, query or fragment
    (a presigned URL's signature stays out of logs and tags)."""
    parts = urllib.parse.urlsplit(source)
    if parts.scheme.lower() in ("http", "https"):
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
    return source


def new_build_id() -> str:
    """A short random id naming this build's temporary resources."""
    return secrets.token_hex(4)


def builder_name(build_id: str) -> str:
    return NAME_PREFIX + build_id


@dataclass(frozen=True)
class ImageInfo:
    """An image as ``image list`` shows it."""

    id: str
    name: str
    state: str = ""
    created: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildInputs:
    """What gets uploaded to the builder VM: checked locally before any cloud resource exists."""

    podvm_dir: Path  # images/podvm: provision.py, requirements.txt, files/
    wheel: Path
    wheel_version: str
    payload: Path
    payload_source: str
    agent_sha256: str


@dataclass(frozen=True)
class BuildOptions:
    """One ``image build`` (the cloud-independent part).

    ``ssh_endpoint`` replaces the builder VM's address (port forwards,
    bastions, tests); ``install_root`` is where provisioning installs on the
    builder VM (``/`` for a real image). Intervals are seconds.
    """

    name: str
    replace: bool = False
    keep_existing: bool = False
    base_image: str | None = None
    instance_type: str | None = None
    ssh_user: str | None = None  # AWS only (Azure logs in as SSH_USERNAME)
    ssh_endpoint: tuple[str, int] | None = None
    ssh_timeout: float = 300.0
    ssh_poll_interval: float = 5.0
    provision_timeout: float = 1800.0
    poll_interval: float = 5.0
    image_timeout: float = 3600.0
    install_root: str = "/"
    remote_python: str = "python3"
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SshAccess:
    """How to log in to the builder VM: address, user, the private key (never shown)
    and the host key the VM was given (``buildkeys``): the only one accepted."""

    host: str
    port: int
    username: str
    key: object = field(repr=False)  # paramiko.PKey
    host_key: object | None = field(default=None, repr=False)  # paramiko.PKey; None: accepted and logged


def image_tags(inputs: BuildInputs, base_image: str, build_id: str, extra: Mapping[str, str]) -> dict[str, str]:
    """The tags of a built image: what built it, from which versions, plus the operator's TAGS."""
    tags = dict(extra)
    tags.update({
        TAG_BUILT_BY: BUILT_BY,
        TAG_BUILDER_VERSION: __version__,
        TAG_PODVM_VERSION: inputs.wheel_version,
        TAG_BASE_IMAGE: base_image[-256:],
        TAG_AGENT_SHA256: inputs.agent_sha256,
        TAG_AGENT_PAYLOAD: source_label(inputs.payload_source).rsplit("/", 1)[-1][:256],
        TAG_BUILD: build_id,
    })
    return tags


def temporary_tags(build_id: str, extra: Mapping[str, str]) -> dict[str, str]:
    """Tags of the builder VM, its key, disk, NIC, security group: traceable to the build."""
    return {**extra, "Name": builder_name(build_id), TAG_BUILD: build_id, TAG_BUILT_BY: BUILT_BY}


class ImageBackend(Protocol):
    """One cloud's part of a build. Blocking calls; every resource made is undone through ``stack``."""

    cloud: str

    def find_image(self, name: str) -> ImageInfo | None:
        """The image called ``name`` in the configured region/resource group, or None."""

    def resolve_base_image(self, requested: str | None) -> str:
        """The base image id to boot the builder VM from (the default RHEL 9 when None); BuildError if none."""

    def launch(self, stack: CleanupStack, build_id: str, base_image: str, options: BuildOptions) -> SshAccess:
        """Create the builder VM (and its key, network bits), wait until it runs; its SSH address and login."""

    def capture(self, stack: CleanupStack, build_id: str, options: BuildOptions, tags: Mapping[str, str],
                before_create: Callable[[], None]) -> str:
        """Stop/generalize the provisioned builder VM and create the image; its id.

        ``before_create`` runs right before the image is created (``--replace``
        deletes the old image there)."""

    def delete_image(self, image: ImageInfo) -> None:
        """Delete an image and what it holds (snapshots); gone is success."""

    def list_images(self) -> list[ImageInfo]:
        """Images made by ``image build`` (tagged ``peerpods.io/built-by``)."""

    def close(self) -> None:
        """Release the SDK clients."""
