"""Initdata decoding, validation and digest (cloudadaptor/initdata.py), checked against independent computations."""

from __future__ import annotations

import base64
import gzip
import hashlib

import pytest

from cloudadaptor import initdata

DOC = b'version = "0.1.0"\nalgorithm = "sha512"\n[data]\n"aa.toml" = "aa"\n"policy.rego" = "package p"\n'


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("wrap", [lambda d: b64(gzip.compress(d)), b64], ids=["gzip", "plain"])
def test_gzip_and_plain_documents_decode_to_the_same_entries(wrap):
    doc = initdata.decode(wrap(DOC))
    assert (doc.version, doc.algorithm, dict(doc.data)) == ("0.1.0", "sha512", {"aa.toml": "aa", "policy.rego": "package p"})
    assert doc.document == DOC


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
def test_digest_is_the_hex_of_the_documents_hash_at_its_natural_length(algorithm):
    document = DOC.replace(b"sha512", algorithm.encode())
    digest = initdata.decode(b64(document)).digest_hex()
    assert digest == getattr(hashlib, algorithm)(document).hexdigest()
    assert len(bytes.fromhex(digest)) == {"sha256": 32, "sha384": 48, "sha512": 64}[algorithm]


# Ten malformed documents, each with the words its refusal must contain.
MALFORMED = {
    "not base64": ("@@@not-base64@@@", "not valid base64"),
    "empty after decoding": ("", "empty document"),
    "corrupt gzip": (b64(gzip.compress(DOC)[:20]), "gzip data is corrupt"),
    "not UTF-8": (b64(b"\xff\xfe\x00"), "not UTF-8"),
    "not TOML": (b64(b"version = = 1"), "not a TOML document"),
    "no version": (b64(b'algorithm = "sha256"\n'), "'version' is missing"),
    "no algorithm": (b64(b'version = "0.1.0"\n'), "'algorithm' is missing"),
    "unknown algorithm": (b64(b'version = "0.1.0"\nalgorithm = "md5"\n'), "'algorithm' is not one of sha256, sha384, sha512"),
    "data not a table": (b64(b'version = "0.1.0"\nalgorithm = "sha256"\ndata = "x"\n'), "'data' must be a table"),
    "entry not a string": (b64(b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"aa.toml" = 3\n'), "data entry 'aa.toml' must be a string"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_initdata_is_refused_naming_the_problem(name):
    encoded, words = MALFORMED[name]
    with pytest.raises(initdata.InitDataError) as err:
        initdata.decode(encoded if encoded else b64(b""), "INITDATA")
    assert words in str(err.value) and str(err.value).startswith("INITDATA: "), str(err.value)


def test_a_gzip_bomb_is_refused_without_inflating_it_all():
    bomb = b64(gzip.compress(b"#" * (initdata.MAX_DOCUMENT_BYTES + 10)))
    with pytest.raises(initdata.InitDataError, match="decompresses to more than"):
        initdata.decode(bomb)


def test_summary_shows_algorithm_and_digest_never_content():
    secret_policy = DOC.replace(b"package p", b"package topsecret-kbs-token")
    shown = initdata.summary(b64(secret_policy))
    assert shown == f"<set, sha512 {hashlib.sha512(secret_policy).hexdigest()}>"
    assert "topsecret" not in shown
    assert initdata.summary("@@") == "<set, invalid>"
