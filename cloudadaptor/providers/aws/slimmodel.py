"""Slim botocore data for the daemon's EC2 client: only the operations we call.

Why: botocore builds an EC2 client from the whole EC2 service model
(``ec2/2016-11-15/service-2.json``: ~700 operations, ~4,400 shapes) and the
whole ``endpoints.json`` (every service in every partition). Measured on
botocore 1.44: making the client grew the daemon by ~25 MiB, ~20 MiB of it
these parsed JSON documents, although the daemon calls a dozen operations.
Dropping the unused parts after loading gives nothing back (the freed
objects are scattered over the heap's pages), so the full model must never
be loaded in the daemon at all: with the slim files first on the loader's
search path the client costs ~3 MiB.

How: the slim files are derived from the installed botocore (its EC2 model
changes with every release: new instance types, new fields), never kept by
hand. A short-lived child process (``python -m
cloudadaptor.providers.aws.slimmodel OUT OP...``) loads the full model and
writes the operations in ``EC2_OPERATIONS``, every shape they reach,
their paginators and waiters, and ``endpoints.json`` cut to the services
the client and its credential providers resolve. The result is cached in
``<cache root>/botocore-<version>-<hash>/`` (hash of the operation list,
``AWS_DATA_PATH`` and this format), made in a temporary directory and
renamed into place (a crash leaves no half-made cache), checked against its
manifest's SHA-256 sums at every start (a damaged one is made again), and
reused across restarts. If it cannot be made, the client uses botocore's
full model (one warning): slower to start, bigger, but working.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import botocore
import botocore.loaders

log = logging.getLogger(__name__)

# Every EC2 operation the provider package calls (client methods, and the operations under
# the paginators and waiters it uses). tests/providers/aws/test_aws_slimmodel.py scans the
# package and fails if a call is missing here; a missing one fails loudly at run time too
# (the slim client has no such method).
EC2_OPERATIONS = (
    "AuthorizeSecurityGroupIngress",  # network.open_ports (aws open-ports uses the full model, but shares the module)
    "DescribeAvailabilityZones",      # checks: the credentials
    "DescribeImages",                 # catalog: the AMI
    "DescribeInstanceTypes",          # catalog: paginator describe_instance_types
    "DescribeInstances",              # instances: paginator describe_instances, waiter instance_running
    "DescribeKeyPairs",
    "DescribeLaunchTemplates",
    "DescribeSecurityGroups",
    "DescribeSubnets",
    "DescribeVpcs",
    "GetConsoleOutput",
    "RunInstances",
    "TerminateInstances",
)
# endpoints.json entries kept: EC2 itself, and what the credential providers call
# (STS for IRSA and assume-role, SSO for SSO profiles).
ENDPOINT_SERVICES = ("ec2", "sts", "sso", "sso-oidc")
SERVICE = "ec2"
FORMAT = "2"  # bump when what is written changes
MANIFEST = "manifest.json"
GENERATE_TIMEOUT = 120.0  # loading the full model takes ~1 s; a busy 2-CPU node may take far longer
_STALE_TMP_AGE = 2 * GENERATE_TIMEOUT
_CREDENTIAL_VARIABLES = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})


def cache_key(operations: Iterable[str], data_path: str | None) -> str:
    """The cache directory's name: botocore's version and a hash of what shapes the content."""
    text = "\n".join([FORMAT, data_path or "", *sorted(operations)])
    return f"botocore-{botocore.__version__}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


class PlainJSONFileLoader(botocore.loaders.JSONFileLoader):
    """botocore's JSON file loader, making plain dicts instead of ``OrderedDict``s.

    Dicts keep insertion order, and nothing in botocore needs the
    ``OrderedDict`` type of loaded data; they take about half the memory: the
    slim EC2 model parsed costs ~0.5 MiB instead of ~1 MiB, kept by the client
    for the daemon's lifetime.
    """

    def load_file(self, file_path: str) -> Any:
        for ext, opener in ((".json", open), (".json.gz", gzip.open)):
            if os.path.isfile(file_path + ext):
                with opener(file_path + ext, "rb") as fp:
                    return json.loads(fp.read().decode("utf-8"))
        return None


class SlimLoader(botocore.loaders.Loader):
    """botocore's loader with the slim directory first on its search path.

    The slim ``endpoints.json`` counts as botocore's own data: it is an exact
    subset of it, so endpoint rules resolve exactly as with the full file
    (botocore treats endpoint data from elsewhere as a custom endpoint).
    Files are read into plain dicts (``PlainJSONFileLoader``)."""

    FILE_LOADER_CLASS = PlainJSONFileLoader

    def __init__(self, slim_dir: Path, data_path: str | None) -> None:
        extra = [os.path.expanduser(os.path.expandvars(p)) for p in (data_path or "").split(os.pathsep) if p]
        super().__init__(extra_search_paths=[str(slim_dir), *extra])
        self._slim_dir = str(slim_dir)

    def is_builtin_path(self, path: str) -> bool:
        return path.startswith(self._slim_dir + os.sep) or bool(super().is_builtin_path(path))


def slim_model_dir(cache_root: Path, data_path: str | None = None, *,
                   operations: tuple[str, ...] = EC2_OPERATIONS, timeout: float = GENERATE_TIMEOUT) -> Path | None:
    """The slim data directory for ``operations`` under ``cache_root``, made if missing or damaged.

    None (after one warning) when it cannot be made: use the full model.
    """
    final = cache_root / cache_key(operations, data_path)
    if _valid(final, operations):
        return final
    try:
        cache_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if final.exists():
            log.warning("AWS: slim EC2 model in %s is damaged: making it again", final)
            shutil.rmtree(final)
        _prune(cache_root, keep=final.name)
        began = time.monotonic()
        _generate(cache_root, final, operations, data_path, timeout)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        log.warning("AWS: could not make the slim EC2 model in %s (%s): using botocore's full model",
                    cache_root, " ".join(str(exc).split())[:300])
        return None
    log.info("AWS: slim EC2 model (%d operations, botocore %s) made in %s in %.1f s",
             len(operations), botocore.__version__, final, time.monotonic() - began)
    return final


def _generate(cache_root: Path, final: Path, operations: tuple[str, ...], data_path: str | None,
              timeout: float) -> None:
    """Run the child into a temporary directory, check its work and rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_root))
    try:
        # The same data path as the client's; no credentials (the child makes no call).
        env = {k: v for k, v in os.environ.items() if k not in _CREDENTIAL_VARIABLES}
        if data_path:
            env["AWS_DATA_PATH"] = data_path
        try:
            done = subprocess.run([sys.executable, "-m", __name__, str(tmp), *operations], env=env,
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the generating process timed out after {timeout:g} s") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise RuntimeError(f"the generating process failed: {last}")
        if not _valid(tmp, operations):
            raise RuntimeError("the generating process wrote an incomplete model")
        try:
            os.rename(tmp, final)
        except OSError:
            if not _valid(final, operations):  # else another process made it first: use that one
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune(cache_root: Path, keep: str) -> None:
    """Remove other botocore versions' caches and temporary directories of crashed runs."""
    for entry in cache_root.iterdir():
        stale_tmp = entry.name.startswith(".tmp-") and time.time() - entry.stat().st_mtime > _STALE_TMP_AGE
        if entry.name != keep and (stale_tmp or entry.name.startswith("botocore-")):
            shutil.rmtree(entry, ignore_errors=True)


def _valid(directory: Path, operations: tuple[str, ...]) -> bool:
    """Whether ``directory`` holds a complete slim model for ``operations`` (manifest and checksums)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("operations") != sorted(operations) or manifest.get("botocore") != botocore.__version__:
            return False
        files: dict[str, str] = manifest["files"]
        return bool(files) and all(_sha256(directory / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------ the child process


def reachable_shapes(shapes: dict[str, Any], roots: Iterable[str]) -> set[str]:
    """Names of ``roots`` and every shape they refer to (members, list members, map keys and values)."""
    seen: set[str] = set()
    todo = [r for r in roots if r]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_refs(shapes[name]))
    return seen


def _refs(shape: dict[str, Any]) -> Iterator[str]:
    for member in shape.get("members", {}).values():
        yield member["shape"]
    for field in ("member", "key", "value"):
        if field in shape:
            yield shape[field]["shape"]


def _strip_docs(value: Any) -> Any:
    """The model without documentation strings (only help() and the docs generator read them)."""
    if isinstance(value, dict):
        return {k: _strip_docs(v) for k, v in value.items() if k not in ("documentation", "documentationUrl")}
    if isinstance(value, list):
        return [_strip_docs(v) for v in value]
    return value


def slim_documents(loader: botocore.loaders.Loader, operations: Iterable[str]) -> dict[str, Any]:
    """{relative path: JSON document} of the slim model, from ``loader``'s full data."""
    wanted = set(operations)
    version = loader.determine_latest_version(SERVICE, "service-2")
    model = loader.load_service_model(SERVICE, "service-2", version)
    unknown = sorted(wanted - set(model["operations"]))
    if unknown:
        raise ValueError(f"botocore {botocore.__version__} has no EC2 operation {', '.join(unknown)}")
    ops = {name: model["operations"][name] for name in sorted(wanted)}
    roots = [ref["shape"] for op in ops.values() for ref in (op.get("input"), op.get("output"), *op.get("errors", ())) if ref]
    # A string shape's "enum" (EC2's instance types alone are ~900 names) feeds only the docs and
    # botocore's example generator: neither the serializer, the validator nor the parser reads it.
    shapes = {name: {k: v for k, v in model["shapes"][name].items() if k != "enum"}
              for name in sorted(reachable_shapes(model["shapes"], roots))}
    base = f"{SERVICE}/{version}"
    documents = {f"{base}/service-2.json": _strip_docs({**model, "operations": ops, "shapes": shapes})}
    paginators = loader.load_service_model(SERVICE, "paginators-1", version)
    documents[f"{base}/paginators-1.json"] = {
        **paginators, "pagination": {k: v for k, v in paginators["pagination"].items() if k in wanted}}
    waiters = loader.load_service_model(SERVICE, "waiters-2", version)
    documents[f"{base}/waiters-2.json"] = {
        **waiters, "waiters": {k: v for k, v in waiters["waiters"].items() if v["operation"] in wanted}}
    endpoints = loader.load_data("endpoints")
    documents["endpoints.json"] = {**endpoints, "partitions": [
        {**p, "services": {k: v for k, v in p["services"].items() if k in ENDPOINT_SERVICES}}
        for p in endpoints["partitions"]]}
    return documents


def write_model(out: Path, operations: list[str]) -> None:
    """Write the slim model into the (empty) directory ``out``, the manifest last."""
    import botocore.session

    loader = botocore.session.get_session().get_component("data_loader")  # honours AWS_DATA_PATH
    files = {}
    for name, document in slim_documents(loader, operations).items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(document, separators=(",", ":")).encode()
        with open(path, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        files[name] = hashlib.sha256(data).hexdigest()
    manifest = {"botocore": botocore.__version__, "operations": sorted(operations), "files": files}
    with open(out / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        os.fsync(f.fileno())


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m cloudadaptor.providers.aws.slimmodel OUT_DIR OPERATION...", file=sys.stderr)
        return 2
    try:
        write_model(Path(argv[0]), argv[1:])
    except (OSError, ValueError, KeyError) as exc:
        print(f"slim EC2 model: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
