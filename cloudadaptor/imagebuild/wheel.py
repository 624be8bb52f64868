"""Our wheel, the form in which the pod VM components reach the builder VM.

``--wheel PATH`` names a prebuilt one (``pip wheel --no-deps .``); the
builder's container image ships one in ``SHIPPED_WHEELS``. Otherwise
``build_wheel`` makes one from the running ``cloudadaptor`` package: a
pure-Python ``py3-none-any`` wheel with the package's files and metadata,
deterministic (same files, same bytes), written with the standard library.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import zipfile
from pathlib import Path

import cloudadaptor

PACKAGE = "cloudadaptor"
SHIPPED_WHEELS = Path("/usr/share/cloud-api-adaptor/wheels")
_EPOCH = (1980, 1, 1, 0, 0, 0)
_SKIP_SUFFIXES = (".pyc", ".pyo")


def wheel_version(path: Path) -> str:
    """The version in a wheel file name (``name-version-python-abi-platform.whl``); ValueError if not a wheel name."""
    parts = path.name.split("-")
    if path.suffix != ".whl" or len(parts) < 5:
        raise ValueError(f"{path.name} is not a wheel file name (name-version-python-abi-platform.whl)")
    return parts[1]


def find_wheel(requested: Path | None, workdir: Path) -> Path:
    """The wheel to install: ``requested``, else the shipped one, else one built now into ``workdir``.

    Raises ValueError when ``requested`` is not a readable wheel of ours.
    """
    if requested is not None:
        _check(requested)
        return requested
    shipped = sorted(SHIPPED_WHEELS.glob(f"{PACKAGE}-*.whl")) if SHIPPED_WHEELS.is_dir() else []
    if shipped:
        return shipped[-1]
    return build_wheel(workdir)


def _check(path: Path) -> None:
    wheel_version(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a readable wheel: {exc}") from None
    if f"{PACKAGE}/cli.py" not in names:
        raise ValueError(f"{path} does not hold the {PACKAGE} package")


def _metadata(version: str) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {PACKAGE}", f"Version: {version}", "Requires-Python: >=3.11"]
    try:
        requires = importlib.metadata.requires(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    lines += [f"Requires-Dist: {req}" for req in requires]
    return "\n".join(lines) + "\n"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(dest: Path) -> Path:
    """Write ``cloudadaptor-<version>-py3-none-any.whl`` of the running package into ``dest``; its path."""
    version = cloudadaptor.__version__
    package_dir = Path(cloudadaptor.__file__).resolve().parent
    files: dict[str, bytes] = {}
    for path in sorted(package_dir.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in _SKIP_SUFFIXES:
            files[f"{PACKAGE}/{path.relative_to(package_dir).as_posix()}"] = path.read_bytes()
    info = f"{PACKAGE}-{version}.dist-info"
    files[f"{info}/METADATA"] = _metadata(version).encode()
    files[f"{info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: cloudadaptor.imagebuild\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    ).encode()
    files[f"{info}/entry_points.txt"] = b"[console_scripts]\ncloud-api-adaptor = cloudadaptor.cli:main\n"
    record = [_record_line(name, data) for name, data in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{PACKAGE}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            entry = zipfile.ZipInfo(name, _EPOCH)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, data)
    return target
