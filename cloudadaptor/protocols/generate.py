"""Regenerate the checked-in protobuf modules from ``protos/``.

Run ``make protos`` (or ``python -m cloudadaptor.protocols.generate``) after
editing a ``.proto`` file; ``tests/test_protocols.py`` fails while the
checked-in modules differ from what this produces.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parent.parent / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi")


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc (from grpcio-tools) on every .proto into ``out_dir``."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.name) for p in proto_dir.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files in {proto_dir}")
    rc = protoc.main(
        [
            "protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            *protos,
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def drift(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Names of generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in generate(Path(tmp))}
    current = {
        p.name: p.read_bytes()
        for p in package_dir.iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    }
    return sorted(
        name
        for name in fresh.keys() | current.keys()
        if fresh.get(name) != current.get(name)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift")
    args = parser.parse_args(argv)
    if args.check:
        stale = drift()
        for name in stale:
            print(f"out of date: cloudadaptor/protocols/{name}")
        return 1 if stale else 0
    for path in generate(PACKAGE_DIR):
        print(f"generated {path.relative_to(PACKAGE_DIR.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
