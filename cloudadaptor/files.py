"""Writing files that hold secrets: atomic, and private from the first byte."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, content: bytes | str, mode: int) -> None:
    """Write ``content`` to ``path`` via a temp file in the same directory and a rename.

    The temp file has ``mode`` before any byte is written, so a reader sees
    either the old file or the whole new one, never a partial or world-readable
    one. Parent directories are created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
