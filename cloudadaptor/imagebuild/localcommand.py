"""``cloud-api-adaptor image build|list|delete local`` (the local provider's QEMU image).

``build`` prints the image directory on stdout (progress on stderr); ``list``
shows the cache; ``delete`` removes one image (``--id KEY``, default the
current one). Exit status as for the clouds: 0, 1 build failed (nothing half
built left), 2 bad arguments, 130/143 interrupted (after the clean-up).
"""

from __future__ import annotations

import argparse
import shutil
from typing import Mapping, TextIO

from cloudadaptor.imagebuild import localcache
from cloudadaptor.imagebuild.cleanup import CleanupError, Terminated, interruptible
from cloudadaptor.imagebuild.common import BuildError

CLOUD_ONLY = ("name", "replace", "keep_existing", "base_image", "instance_type", "ssh_user", "ssh_private_key",
              "ssh_cidr", "ssh_endpoint", "update_configmap", "namespace")


def run(args: argparse.Namespace, env: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    action = f"image {args.image_command} local"
    cache = args.cache_dir or localcache.default_cache_dir(dict(env))
    try:
        with interruptible():
            if args.image_command == "build":
                return _build(args, env, cache, out, err)
            if args.image_command == "list":
                return _list(cache, out)
            return _delete(args, cache, out, err)
    except CleanupError as exc:
        print(f"{action}: {exc}", file=err)
        return 3
    except BuildError as exc:
        print(f"{action} failed: {exc}", file=err)
        return 1
    except Terminated:
        print(f"{action}: terminated; the half-built image was removed", file=err)
        return 143
    except KeyboardInterrupt:
        print(f"{action}: interrupted; the half-built image was removed", file=err)
        return 130


def _build(args: argparse.Namespace, env: Mapping[str, str], cache: object, out: TextIO, err: TextIO) -> int:
    from pathlib import Path

    from cloudadaptor.imagebuild import localbuild
    from cloudadaptor.imagebuild.progress import Progress

    given = [f"--{name.replace('_', '-')}" for name in CLOUD_ONLY if getattr(args, name, None)]
    if given:
        print(f"image build local: {', '.join(given)} only apply to aws and azure", file=err)
        return 2
    payload = args.agent_payload or (env.get("PODVM_AGENT_PAYLOAD") or "").strip() or None
    options = localbuild.LocalBuildOptions(Path(str(cache)), payload, args.wheel, args.podvm_files, args.rebuild)
    result = localbuild.build_local(options, Progress(localbuild.STEPS, err))
    print(result.image.directory, file=out, flush=True)
    return 0


def _list(cache: object, out: TextIO) -> int:
    from pathlib import Path

    current = localcache.current(Path(str(cache)))
    header = ("KEY", "CURRENT", "CREATED", "BUILD-S", "DISK-MIB", "KATA-AGENT")
    rows = [header] + [
        (i.key, "*" if current is not None and current.key == i.key else "", str(i.info.get("created", "")),
         str(i.info.get("build_seconds", "")), str(int(i.info.get("disk_bytes", 0) or 0) >> 20),  # type: ignore[call-overload]
         str(i.info.get("agent_payload", "")))
        for i in localcache.list_images(Path(str(cache)))
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)
    return 0


def _delete(args: argparse.Namespace, cache: object, out: TextIO, err: TextIO) -> int:
    from pathlib import Path

    root = Path(str(cache))
    if args.name:
        print("image delete local: local images have no name; use --id KEY (see image list local)", file=err)
        return 2
    image = localcache.read_image(root / args.id) if args.id else localcache.current(root)
    if image is None or image.directory.parent != root.resolve():
        print(f"image delete local: no image {args.id or 'current'} in {root}", file=err)
        return 1
    current = localcache.current(root)
    if current is not None and current.key == image.key:
        (root / localcache.CURRENT).unlink()
    shutil.rmtree(image.directory)
    print(f"deleted {image.key}", file=out)
    return 0
