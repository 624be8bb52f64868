"""``cloud-api-adaptor image build|list|delete aws|azure|local``.

``local`` builds the local provider's QEMU image on this machine
(``imagebuild/localbuild.py``, cached by input hash; ``localcommand.py``).

Settings are the peer-pods-cm / peer-pods-secret keys the adaptor uses (the
image Jobs get them with ``envFrom``), plus ``PODVM_AGENT_PAYLOAD`` and
``PODVM_BASE_IMAGE``; flags win. Progress goes to stderr, the image id (and
nothing else) to stdout. Exit status: 0 done, 1 the build failed (every
temporary resource removed), 2 bad settings or arguments, 3 some temporary
resource could not be removed (they are listed), 130 interrupted (Ctrl-C),
143 terminated (SIGTERM) — both after the clean-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

from cloudadaptor.commandline import print_problems
from cloudadaptor.config import ConfigError, parse_duration, parse_host_port
from cloudadaptor.imagebuild.cleanup import CleanupError, Terminated, interruptible
from cloudadaptor.imagebuild.common import CONFIGMAP_KEYS, DEFAULT_IMAGE_NAMES, BuildError, BuildOptions, ImageBackend

CLOUDS = ("aws", "azure")
TARGETS = (*CLOUDS, "local")
BackendFactory = Callable[[str, Mapping[str, str], argparse.Namespace], ImageBackend]


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _endpoint(text: str) -> tuple[str, int]:
    try:
        host, port = parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT ({exc})") from None
    if not host:
        raise argparse.ArgumentTypeError("expected HOST:PORT with a host")
    return host, port


def _add_build(sub: Any) -> None:
    build = sub.add_parser("build", help="build the pod VM image (peer-pod-ami / peer-pod-vmimage)")
    build.add_argument("cloud", choices=TARGETS, help="aws, azure, or local (a QEMU disk image on this machine)")
    build.add_argument("--name", help="image name (default peer-pod-ami on AWS, peer-pod-vmimage on Azure)")
    exists = build.add_mutually_exclusive_group()
    exists.add_argument("--replace", action="store_true",
                        help="an image of that name exists: delete it right before the new one is created")
    exists.add_argument("--keep-existing", action="store_true",
                        help="an image of that name exists: use it (print its id, update the ConfigMap), build nothing")
    build.add_argument("--agent-payload", help="[PODVM_AGENT_PAYLOAD] tar archive (path or https URL) holding "
                       "the kata-agent binary (usr/bin/kata-agent, usr/local/bin/kata-agent or opt/kata/bin/kata-agent)")
    build.add_argument("--agent-payload-sha256", help="[PODVM_AGENT_PAYLOAD_SHA256] the archive's sha256 (64 hex "
                       "digits): required for a URL, checked for a path when given")
    build.add_argument("--base-image", help="[PODVM_BASE_IMAGE] AWS: an AMI id (default: the newest RHEL 9 of Red Hat); "
                       "Azure: publisher:offer:sku:version or an image id (default RedHat:RHEL:9-lvm-gen2:latest)")
    build.add_argument("--instance-type", help="builder VM type (default t3.medium / Standard_B2als_v2)")
    build.add_argument("--wheel", type=Path, help="our wheel to install (default: the one shipped, else built now)")
    build.add_argument("--podvm-files", type=Path, help="the images/podvm directory (provision.py, files/)")
    build.add_argument("--ssh-user", help="AWS: login user on the builder VM (default ec2-user, RHEL's); "
                       "Azure always uses SSH_USERNAME, the VM's admin user")
    build.add_argument("--ssh-cidr", action="append", help="AWS: also allow SSH to the builder VM from this CIDR "
                       "(default: from AWS_SG_IDS only); repeatable")
    build.add_argument("--ssh-endpoint", type=_endpoint, help="reach the builder VM's SSH at HOST:PORT instead of its "
                       "address (port forward, bastion, tests)")
    build.add_argument("--ssh-timeout", type=_duration, default=300.0, help="how long to wait for SSH (default 5m)")
    build.add_argument("--poll-interval", type=_duration, default=5.0, help="between polls of cloud operations (default 5s)")
    build.add_argument("--install-root", default="/", help="where provisioning installs on the builder VM (default /; "
                       "another directory makes an image without the pod VM components: for tests and inspection)")
    build.add_argument("--gallery", help="Azure: also publish the image as a version (the pod VM version) of an "
                       "image definition of this Azure Compute Gallery, fit for confidential VMs; prints the "
                       "version id, for AZURE_IMAGE_ID")
    build.add_argument("--update-configmap", action="store_true",
                       help="put the image id into peer-pods-cm (PODVM_AMI_ID / AZURE_IMAGE_ID)")
    build.add_argument("--namespace", help="namespace of peer-pods-cm (default: POD_NAMESPACE, else "
                       "openshift-sandboxed-containers-operator)")
    build.add_argument("--rebuild", action="store_true", help="local: build even when the cache has this image")
    build.add_argument("--cache-dir", type=Path, help="local: the image cache [LOCAL_IMAGE_CACHE] "
                       "(default ~/.cache/cloud-api-adaptor/podvm)")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``image`` actions to ``parser`` (mounted by ``cloudadaptor.cli``); no SDK import."""
    sub = parser.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    _add_build(sub)
    listing = sub.add_parser("list", help="list the images built by `image build`")
    listing.add_argument("cloud", choices=TARGETS)
    listing.add_argument("--cache-dir", type=Path, help="local: the image cache [LOCAL_IMAGE_CACHE]")
    delete = sub.add_parser("delete", help="delete an image (and its snapshots); images are not managed after creation")
    delete.add_argument("cloud", choices=TARGETS)
    delete.add_argument("--cache-dir", type=Path, help="local: the image cache [LOCAL_IMAGE_CACHE]")
    which = delete.add_mutually_exclusive_group()
    which.add_argument("--name", help="image name (default peer-pod-ami / peer-pod-vmimage)")
    which.add_argument("--id", help="image id (an AMI id, an Azure image resource id, a local image key)")
    return parser


def make_backend(cloud: str, env: Mapping[str, str], args: argparse.Namespace) -> ImageBackend:
    """The cloud's backend from the environment's settings (raises ConfigError / BuildError)."""
    poll = getattr(args, "poll_interval", 5.0)
    if cloud == "aws":
        from cloudadaptor.imagebuild import aws

        config, _ = aws.load_config(env)
        return aws.AwsImageBackend(config, poll_interval=poll, ssh_cidrs=tuple(getattr(args, "ssh_cidr", None) or ()))
    from cloudadaptor.imagebuild import azure
    from cloudadaptor.providers.azure.client import build_clients

    config = dataclasses.replace(azure.load_config(env), polling_interval=poll)
    return azure.AzureImageBackend(config, build_clients(config))


def payload_sha256(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    """--agent-payload-sha256 / PODVM_AGENT_PAYLOAD_SHA256, parsed; ConfigError naming the key."""
    from cloudadaptor.config import Problem
    from cloudadaptor.imagebuild.inputs import SHA256_KEY, parse_sha256

    text = getattr(args, "agent_payload_sha256", None) or (env.get(SHA256_KEY) or "").strip()
    if not text:
        return None
    try:
        return parse_sha256(text)
    except ValueError:
        raise ConfigError([Problem(SHA256_KEY, text, "expected the payload archive's sha256 as 64 hex digits")]) from None


def options_from(args: argparse.Namespace, env: Mapping[str, str], tags: Mapping[str, str]) -> BuildOptions:
    return BuildOptions(
        name=args.name or DEFAULT_IMAGE_NAMES[args.cloud],
        replace=args.replace,
        keep_existing=args.keep_existing,
        base_image=args.base_image or (env.get("PODVM_BASE_IMAGE") or "").strip() or None,
        instance_type=args.instance_type,
        ssh_user=args.ssh_user,
        ssh_endpoint=args.ssh_endpoint,
        ssh_timeout=args.ssh_timeout,
        ssh_poll_interval=min(args.poll_interval, 5.0),
        poll_interval=args.poll_interval,
        install_root=args.install_root,
        tags=dict(tags),
    )


def _build(args: argparse.Namespace, env: Mapping[str, str], backend: ImageBackend, out: TextIO, err: TextIO) -> int:
    from cloudadaptor.imagebuild import build, configmap
    from cloudadaptor.imagebuild.progress import Progress

    options = options_from(args, env, getattr(backend, "extra_tags", {}))
    update = None
    if args.update_configmap:
        namespace = args.namespace or configmap.default_namespace(env)

        def update(image_id: str) -> None:
            configmap.update(env, namespace, CONFIGMAP_KEYS[args.cloud], image_id)
    payload = args.agent_payload or (env.get("PODVM_AGENT_PAYLOAD") or "").strip() or None
    spec = build.InputSpec(payload, args.wheel, args.podvm_files, payload_sha256(args, env))
    publish = _gallery_publisher(args, backend, options)
    progress = Progress(build.steps_for(update is not None, publish is not None), err)
    result = build.build_image(backend, options, spec, progress, update, publish)
    print(result.image_id, file=out, flush=True)
    return 0


def _gallery_publisher(args: argparse.Namespace, backend: ImageBackend,
                       options: BuildOptions) -> Callable[[str], str] | None:
    """``--gallery``: publish the built image there (Azure only; refused before anything is built elsewhere)."""
    gallery = getattr(args, "gallery", None)
    if not gallery:
        return None
    if args.cloud != "azure":
        raise BuildError("--gallery is for Azure (an Azure Compute Gallery)")
    from cloudadaptor.imagebuild import azure_gallery

    def publish(image_id: str) -> str:
        return azure_gallery.publish(backend.clients, backend.config, gallery=gallery,  # type: ignore[attr-defined]
                                     definition=options.name, image_id=image_id, tags=options.tags,
                                     replace=options.replace)
    return publish


def _list(args: argparse.Namespace, backend: ImageBackend, out: TextIO) -> int:
    from cloudadaptor.imagebuild.common import TAG_AGENT_SHA256, TAG_PODVM_VERSION

    rows = [(i.id, i.name, i.state, i.created, i.tags.get(TAG_PODVM_VERSION, ""), i.tags.get(TAG_AGENT_SHA256, "")[:12])
            for i in backend.list_images()]
    header = ("ID", "NAME", "STATE", "CREATED", "PODVM", "KATA-AGENT")
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)
    return 0


def _delete(args: argparse.Namespace, backend: ImageBackend, out: TextIO, err: TextIO) -> int:
    from cloudadaptor.imagebuild.common import ImageInfo

    if args.id:
        name = args.id.rstrip("/").rsplit("/", 1)[-1] if args.cloud == "azure" else ""
        image = ImageInfo(args.id, name)
    else:
        name = args.name or DEFAULT_IMAGE_NAMES[args.cloud]
        found = backend.find_image(name)
        if found is None:
            print(f"image delete: no image named {name}", file=err)
            return 1
        image = found
    backend.delete_image(image)
    print(f"deleted {image.id}", file=out)
    return 0


def run(args: argparse.Namespace, *, env: Mapping[str, str] | None = None, backend_factory: BackendFactory = make_backend,
        out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the ``image`` action in ``args``; the exit status (see the module docstring)."""
    env = os.environ if env is None else env
    out, err = out or sys.stdout, err or sys.stderr
    action = f"image {args.image_command}"
    if args.cloud == "local":
        from cloudadaptor.imagebuild import localcommand

        return localcommand.run(args, env, out, err)
    try:
        with interruptible():
            backend = backend_factory(args.cloud, env, args)
            try:
                if args.image_command == "build":
                    return _build(args, env, backend, out, err)
                if args.image_command == "list":
                    return _list(args, backend, out)
                return _delete(args, backend, out, err)
            finally:
                backend.close()
    except ConfigError as exc:
        print_problems(exc.problems, context=action, file=err)
        return 2
    except CleanupError as exc:
        print(f"{action}: {exc}", file=err)
        return 3
    except BuildError as exc:
        print(f"{action} failed: {exc}", file=err)
        if args.image_command == "build":
            print("no temporary resource left behind", file=err)
        return 1
    except Terminated:
        print(f"{action}: terminated; temporary resources removed", file=err)
        return 143
    except KeyboardInterrupt:
        print(f"{action}: interrupted; temporary resources removed", file=err)
        return 130
