"""Socket files of unix listeners: replacing a stale one, removing only our own."""

from __future__ import annotations

import asyncio
import logging
import os
import stat

from cloudadaptor.ttrpc.framing import close_writer

log = logging.getLogger("cloudadaptor.ttrpc")


async def remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody accepts on; refuse a non-socket or a live socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 1.0)
    except (OSError, asyncio.TimeoutError):
        os.unlink(path)  # stale: nobody accepts on it
        log.info("removed stale socket %s", path)
        return
    await close_writer(writer)
    raise OSError(98, f"{path} is served by another process", path)


def unlink_if_same(path: str, dev: int, ino: int) -> None:
    """Unlink ``path`` only if it is still the file we created (same device and inode)."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove socket %s: %s", path, exc)
