"""The agent payload archive whose kata-agent is the third-party agent (``thirdpartyagent.py``).

    python tests/fakes/thirdpartypayload.py PATH

writes the archive to PATH: one member ``usr/local/bin/kata-agent`` (mode 0755)
holding ``thirdpartyagent.py`` byte for byte (its shebang runs it on the guest's
python3; the image's kata-agent.service starts it with ``--config``). The bytes
are the same every time (mtime 0, fixed owner), so ``image build local
--agent-payload PATH`` and the tests that compute the image's cache key from
this archive agree, and a second build is a cache hit. ``make podvm-image``
builds that image before the tests (mmdebstrap needs the machine's real root).
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

AGENT = Path(__file__).resolve().parent / "thirdpartyagent.py"
MEMBER = "usr/local/bin/kata-agent"


def write(target: Path) -> Path:
    """Write the payload archive to ``target``; returns it."""
    agent = AGENT.read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        member = tarfile.TarInfo(MEMBER)
        member.size, member.mode, member.mtime = len(agent), 0o755, 0
        archive.addfile(member, io.BytesIO(agent))
    target.write_bytes(buffer.getvalue())
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: thirdpartypayload.py PATH")
    print(write(Path(sys.argv[1])))
