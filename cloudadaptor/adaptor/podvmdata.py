"""What a pod VM is handed in its user data: forwarder config, initdata, registry credentials.

``pod_initdata`` is called by CreateVM before anything is recorded: bad
initdata is refused with INVALID_ARGUMENT naming the part, so no record and
no VM exist for it. ``render`` builds the ``#cloud-config`` within the
provider's user-data limit: initdata that does not fit is refused (the pod
cannot run without it); registry credentials that do not fit are left out
with one warning naming the pod and the size (the pod still starts; public
images still pull).
"""

from __future__ import annotations

import base64
import gzip
import logging
from typing import Mapping

from cloudadaptor import initdata, userdata
from cloudadaptor.adaptor.errors import LifecycleError
from cloudadaptor.adaptor.validation import ANN_INITDATA
from cloudadaptor.ttrpc.errors import Code

log = logging.getLogger(__name__)


def pod_initdata(annotations: Mapping[str, str], default: initdata.InitData | None) -> initdata.InitData | None:
    """The pod's initdata: its ``cc_init_data`` annotation when set, else the ``INITDATA`` default."""
    given = annotations.get(ANN_INITDATA, "").strip()
    if not given:
        return default
    try:
        return initdata.decode(given, f"annotation {ANN_INITDATA}")
    except initdata.InitDataError as exc:
        raise LifecycleError(Code.INVALID_ARGUMENT, str(exc)) from None


def encode(doc: initdata.InitData) -> str:
    """The document as user data carries it: base64 of its gzip (as kata's tooling encodes it).

    ``mtime=0`` keeps the bytes stable, so a re-rendered sandbox gets identical user data."""
    return base64.b64encode(gzip.compress(doc.document, mtime=0)).decode("ascii")


def render(
    forwarder_json: str, doc: initdata.InitData | None, auth: bytes | None, limit: int | None, pod: str,
) -> str:
    """``#cloud-config`` for one pod VM, within ``limit`` bytes (None: no limit).

    Raises ``LifecycleError`` (INVALID_ARGUMENT) when initdata makes it too large."""
    files = {userdata.APF_CONFIG_PATH: forwarder_json}
    if doc is not None:
        files[userdata.INITDATA_PATH] = encode(doc)
    text = userdata.render(files)
    size = len(text.encode("utf-8"))
    if limit is not None and size > limit:
        carried = f" with {len(files.get(userdata.INITDATA_PATH, ''))} bytes of encoded initdata" if doc else ""
        raise LifecycleError(
            Code.INVALID_ARGUMENT,
            f"pod {pod}: user data would be {size} bytes{carried}; the provider's limit is {limit} bytes "
            "(shorten the initdata's policy or configuration)",
        )
    if auth is None:
        return text
    with_auth = userdata.render({**files, userdata.AUTH_JSON_PATH: auth.decode("utf-8")})
    size = len(with_auth.encode("utf-8"))
    if limit is not None and size > limit:
        log.warning("pod %s: registry credentials left out of the user data: it would be %d bytes, over the "
                    "provider's limit of %d bytes (images needing them will not pull)", pod, size, limit)
        return text
    return with_auth
