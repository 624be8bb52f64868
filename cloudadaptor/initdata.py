"""Initdata: the confidential-containers document a pod VM's attestation and policy come from.

An initdata document is TOML (``version``, ``algorithm`` = sha256|sha384|sha512,
``[data]`` with ``aa.toml``, ``cdh.toml``, ``policy.rego``), carried base64 of
its gzip (what kata's tooling and the Go adaptor produce) or base64 of the
plain TOML. It reaches us as the ``INITDATA`` key of peer-pods-cm (a default
for every pod) or the pod annotation
``io.katacontainers.config.hypervisor.cc_init_data`` (which overrides it).

The adaptor validates it at CreateVM (``decode``) and puts the encoded value
in the user data as ``/run/peerpod/initdata``, as the Go adaptor does; in the
VM ``process-user-data`` decodes it again and writes the entries and the
digest (``digest_hex``) next to it. Nothing here logs or returns the
document's content: errors name the part that is wrong, never the value.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import tomllib
import zlib
from dataclasses import dataclass, field
from typing import Mapping

ALGORITHMS = ("sha256", "sha384", "sha512")
# The entries process-user-data unpacks into /run/peerpod (the Go adaptor's InitdDataFilesList).
DATA_FILES = ("aa.toml", "cdh.toml", "policy.rego")
# A bound on the decompressed document: user data is at most 64 KiB, so a larger
# document can only be a gzip bomb.
MAX_DOCUMENT_BYTES = 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"


class InitDataError(ValueError):
    """The initdata is unusable; the message names the part (encoding, TOML, algorithm, an entry)."""


@dataclass(frozen=True)
class InitData:
    """A decoded initdata document. ``document`` is the TOML bytes the digest is taken over."""

    document: bytes = field(repr=False)
    version: str
    algorithm: str
    data: Mapping[str, str] = field(repr=False)

    def digest_hex(self) -> str:
        return digest_hex(self.document, self.algorithm)


def digest_hex(document: bytes, algorithm: str) -> str:
    """The document's digest with ``algorithm``, as lowercase hex of its natural length
    (sha256 → 32 bytes, sha384 → 48, sha512 → 64).

    This is what the Go adaptor's process-user-data writes to initdata.digest
    (``pkg/initdata/initdata.go`` ``digest``: ``hex.EncodeToString(hash[:])``).
    Fitting it to a TEE's field is the consumer's job, following kata's
    ``kata-types/src/initdata.rs`` ``adjust_digest``: truncated when wider than the
    field, zero-padded when narrower (TDX MRCONFIGID 48 bytes, SNP HOST_DATA 32,
    CCA 64); the podvm's PCR-8 unit takes the first 32 bytes (``head -c64``).
    """
    if algorithm not in ALGORITHMS:
        raise InitDataError(f"initdata algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    return hashlib.new(algorithm, document).hexdigest()


def _unwrap(encoded: str, source: str) -> bytes:
    compact = "".join(encoded.split())
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InitDataError(f"{source}: not valid base64 (expected base64 of a gzip or plain TOML document)") from None
    if not raw:
        raise InitDataError(f"{source}: decodes to an empty document")
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        # Bounded decompression: read one byte past the limit to tell "too big" apart.
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            document = stream.read(MAX_DOCUMENT_BYTES + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise InitDataError(f"{source}: gzip data is corrupt ({exc})") from None
    if len(document) > MAX_DOCUMENT_BYTES:
        raise InitDataError(f"{source}: decompresses to more than {MAX_DOCUMENT_BYTES} bytes")
    return document


def parse_document(document: bytes, source: str = "initdata") -> InitData:
    """Parse TOML ``document`` bytes; ``InitDataError`` names what is wrong."""
    try:
        text = document.decode("utf-8")
    except UnicodeDecodeError:
        raise InitDataError(f"{source}: the document is not UTF-8 text") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message names a line and column, never the content.
        raise InitDataError(f"{source}: not a TOML document ({exc})") from None
    version = doc.get("version")
    if not isinstance(version, str) or not version:
        raise InitDataError(f"{source}: 'version' is missing or not a string (expected e.g. \"0.1.0\")")
    algorithm = doc.get("algorithm")
    if not isinstance(algorithm, str):
        raise InitDataError(f"{source}: 'algorithm' is missing or not a string (expected one of {', '.join(ALGORITHMS)})")
    if algorithm not in ALGORITHMS:
        raise InitDataError(f"{source}: 'algorithm' is not one of {', '.join(ALGORITHMS)}")
    data = doc.get("data", {})
    if not isinstance(data, dict):
        raise InitDataError(f"{source}: 'data' must be a table of file name = text")
    for key, value in data.items():
        if not isinstance(value, str):
            raise InitDataError(f"{source}: data entry {key[:64]!r} must be a string, not a {type(value).__name__}")
    return InitData(document, version, algorithm, dict(data))


def decode(encoded: str, source: str = "initdata") -> InitData:
    """Decode base64 (of gzip or plain TOML) and parse; ``source`` names where it came from in errors."""
    return parse_document(_unwrap(encoded, source), source)


def parse_setting(text: str) -> InitData:
    """The ``INITDATA`` key's parser (errors are ``ValueError`` naming the part, never the value)."""
    return decode(text, "INITDATA")


def summary(text: str) -> str:
    """What ``config check`` shows for a set ``INITDATA``: its algorithm and digest, never its content."""
    try:
        doc = decode(text)
    except InitDataError:
        return "<set, invalid>"
    return f"<set, {doc.algorithm} {doc.digest_hex()}>"
