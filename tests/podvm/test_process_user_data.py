"""process-user-data against local imitations of AWS IMDSv2 and Azure IMDS."""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import logging
import stat
import threading
import time
import tomllib
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cloudadaptor import userdata
from cloudadaptor.podvm import process_user_data as pud
from cloudadaptor.userdata import APF_CONFIG_PATH, AUTH_JSON_PATH, INITDATA_PATH

TOKEN = "imds-token-42"
APF = json.dumps({"sandbox_id": "sid", "pod_name": "web", "pod_namespace": "default"})
INIT_DOC = (b'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"aa.toml" = "[token_configs]\\n"\n'
            b'"cdh.toml" = "socket = \'unix:///run/cdh.sock\'"\n"policy.rego" = "package agent_policy\\n"\n'
            b'"extra.txt" = "not unpacked"\n')
INIT_ENC = base64.b64encode(gzip.compress(INIT_DOC)).decode()


def user_data(extra: dict[str, str] | None = None) -> str:
    return userdata.render({APF_CONFIG_PATH: APF, INITDATA_PATH: INIT_ENC, **(extra or {})})


class FakeImds:
    """A tiny IMDS on 127.0.0.1: ``clouds`` says which of aws/azure it imitates."""

    def __init__(self, body: str, clouds=("aws", "azure"), fail_first: int = 0, always_fail: bool = False):
        self.body, self.clouds = body, clouds
        self.fail_first, self.always_fail = fail_first, always_fail
        self.requests: list[tuple[str, str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, body: bytes = b""):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def handle_any(self):
                fake.requests.append((self.command, self.path, self.headers))  # case-insensitive
                if fake.always_fail or len(fake.requests) <= fake.fail_first:
                    return self.reply(500, b"internal error")
                fake.route(self)

            do_GET = do_PUT = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def route(self, h) -> None:
        if h.path == "/latest/api/token" and "aws" in self.clouds:
            if h.command != "PUT" or "X-aws-ec2-metadata-token-ttl-seconds" not in h.headers:
                return h.reply(400, b"token request needs PUT and a TTL header")
            return h.reply(200, TOKEN.encode())
        if h.path == "/latest/user-data" and "aws" in self.clouds:
            if h.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                return h.reply(401)
            return h.reply(200, self.body.encode())
        if h.path == "/metadata/instance/compute/userData?api-version=2021-01-01&format=text" and "azure" in self.clouds:
            if h.headers.get("Metadata") != "true":
                return h.reply(400, b'{"error": "Bad request. Required metadata header not specified"}')
            return h.reply(200, base64.b64encode(self.body.encode()))
        return h.reply(404)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(pud, "FIRST_DELAY", 0.05)


def args(root: Path, **options) -> argparse.Namespace:
    parser = pud.build_parser(argparse.ArgumentParser())
    argv = ["--root", str(root), "--deadline", "5s"]  # a regression fails fast, not in 5m
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def written(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ the fake


def test_fake_aws_imds_requires_the_token():
    with FakeImds("x", clouds=("aws",)) as imds:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{imds.url}/latest/user-data", timeout=5)
        assert info.value.code == 401


# ------------------------------------------------------------------ sources


def test_aws_source_uses_imdsv2_and_writes_the_files(tmp_path):
    with FakeImds(user_data(), clouds=("aws",)) as imds:
        assert pud.run(args(tmp_path, source="aws", imds_url=imds.url)) == 0
    put, get = imds.requests
    assert put[0:2] == ("PUT", "/latest/api/token") and put[2]["X-aws-ec2-metadata-token-ttl-seconds"]
    assert get[0:2] == ("GET", "/latest/user-data") and get[2]["X-aws-ec2-metadata-token"] == TOKEN
    apf = written(tmp_path, APF_CONFIG_PATH)
    assert apf.read_text() == APF
    assert mode_of(apf) == 0o600
    assert written(tmp_path, INITDATA_PATH).read_text() == INIT_ENC


def test_azure_source_sends_the_metadata_header_and_decodes_base64(tmp_path):
    with FakeImds(user_data(), clouds=("azure",)) as imds:
        assert pud.run(args(tmp_path, source="azure", imds_url=imds.url)) == 0
    [(method, path, headers)] = imds.requests
    assert (method, headers["Metadata"]) == ("GET", "true")
    assert path == "/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
    assert written(tmp_path, APF_CONFIG_PATH).read_text() == APF


def test_auto_source_falls_back_from_aws_to_azure(tmp_path):
    with FakeImds(user_data(), clouds=("azure",)) as imds:
        assert pud.run(args(tmp_path, source="auto", imds_url=imds.url)) == 0
    assert imds.requests[0][1] == "/latest/api/token", "aws is tried first"
    assert written(tmp_path, APF_CONFIG_PATH).read_text() == APF


def test_auto_source_prefers_aws(tmp_path):
    with FakeImds(user_data(), clouds=("aws", "azure")) as imds:
        assert pud.run(args(tmp_path, imds_url=imds.url)) == 0
    assert not any("metadata/instance" in path for _, path, _ in imds.requests)


def test_file_source(tmp_path):
    source = tmp_path / "user-data"
    source.write_text(user_data({AUTH_JSON_PATH: '{"auths": {}}'}))
    root = tmp_path / "root"
    assert pud.run(args(root, source="file", file=source)) == 0
    assert written(root, AUTH_JSON_PATH).read_text() == '{"auths": {}}'
    assert mode_of(written(root, AUTH_JSON_PATH)) == 0o600


def test_main_parses_its_own_arguments(tmp_path):
    source = tmp_path / "user-data"
    source.write_text(user_data())
    assert pud.main(["--source", "file", "--file", str(source), "--root", str(tmp_path / "r")]) == 0
    assert written(tmp_path / "r", APF_CONFIG_PATH).exists()


# ------------------------------------------------------------------ retries


def test_retries_until_the_metadata_service_answers(tmp_path):
    with FakeImds(user_data(), clouds=("aws",), fail_first=3) as imds:
        assert pud.run(args(tmp_path, source="aws", imds_url=imds.url, deadline="5s")) == 0
    assert len(imds.requests) == 5, "3 failed token requests, then token + user data"
    assert written(tmp_path, APF_CONFIG_PATH).read_text() == APF


def test_deadline_exceeded_exits_1_with_one_clear_line(tmp_path, capsys):
    with FakeImds(user_data(), always_fail=True) as imds:
        start = time.monotonic()
        code = pud.run(args(tmp_path, source="aws", imds_url=imds.url, deadline="700ms"))
        elapsed = time.monotonic() - start
    assert code == 1
    assert 0.6 < elapsed < 3, f"should give up at the deadline, took {elapsed:.1f}s"
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("process-user-data: no user data from aws IMDS at " + imds.url), err
    assert "HTTP 500" in err and "0.7s" in err, err
    assert len(imds.requests) >= 2, "it retried before giving up"
    assert not written(tmp_path, APF_CONFIG_PATH).exists()


def test_unreachable_service_names_the_failure(tmp_path, capsys):
    with FakeImds("") as imds:
        url = imds.url  # closed on exit: nothing listens there any more
    assert pud.run(args(tmp_path, source="azure", imds_url=url, deadline="300ms")) == 1
    err = capsys.readouterr().err
    assert "azure IMDS at " + url in err and "refused" in err.lower(), err


def test_missing_file_is_retried_then_named(tmp_path, capsys):
    missing = tmp_path / "not-there"
    assert pud.run(args(tmp_path, source="file", file=missing, deadline="300ms")) == 1
    err = capsys.readouterr().err
    assert f"file {missing}" in err and "No such file" in err, err


def test_malformed_user_data_fails_at_once_without_waiting(tmp_path, capsys):
    with FakeImds("#!/bin/sh\necho not cloud-config\n", clouds=("aws",)) as imds:
        start = time.monotonic()
        assert pud.run(args(tmp_path, source="aws", imds_url=imds.url, deadline="10s")) == 1
    assert time.monotonic() - start < 5
    assert "not cloud-config" in capsys.readouterr().err


def test_bad_deadline_is_a_usage_error(tmp_path, capsys):
    assert pud.run(args(tmp_path, source="file", file="x", deadline="5 minutes")) == 2
    assert "--deadline" in capsys.readouterr().err


def test_file_source_needs_a_file(tmp_path):
    assert pud.run(args(tmp_path, source="file")) == 2


# ------------------------------------------------------------------ writing


def test_paths_outside_the_allow_list_are_not_written(tmp_path, caplog):
    text = (
        "#cloud-config\nwrite_files:\n"
        f"- path: {APF_CONFIG_PATH}\n  content: '{{}}'\n"
        "- path: /etc/cron.d/evil\n  content: '* * * * * root sh'\n"
        "- path: /run/peerpod/../../etc/passwd\n  content: 'x'\n"
    )
    source = tmp_path / "ud"
    source.write_text(text)
    root = tmp_path / "root"
    with caplog.at_level(logging.WARNING, logger=pud.__name__):
        assert pud.run(args(root, source="file", file=source)) == 0
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["run/peerpod/apf.json"]
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("/etc/cron.d/evil" in m for m in refused) and any("etc/passwd" in m for m in refused)


def test_permissions_from_user_data_are_applied(tmp_path):
    text = (
        "#cloud-config\nwrite_files:\n"
        f"- path: {INITDATA_PATH}\n  permissions: '0640'\n  content: {INIT_ENC}\n"
        f"- path: {AUTH_JSON_PATH}\n  content: '{{}}'\n"
    )
    source = tmp_path / "ud"
    source.write_text(text)
    assert pud.run(args(tmp_path / "r", source="file", file=source)) == 0
    assert mode_of(written(tmp_path / "r", INITDATA_PATH)) == 0o640
    assert mode_of(written(tmp_path / "r", AUTH_JSON_PATH)) == 0o600, "auth.json defaults to 0600"


def test_existing_files_are_replaced_atomically_without_leftovers(tmp_path):
    target = written(tmp_path, APF_CONFIG_PATH)
    target.parent.mkdir(parents=True)
    target.write_text("old")
    source = tmp_path / "ud"
    source.write_text(user_data())
    assert pud.run(args(tmp_path, source="file", file=source)) == 0
    assert target.read_text() == APF
    assert sorted(p.name for p in target.parent.iterdir()) == [
        "aa.toml", "apf.json", "cdh.toml", "initdata", "initdata.digest", "policy.rego"]


# ---------------------------------------------------------------- initdata


def test_initdata_is_unpacked_next_to_it_with_its_digest(tmp_path):
    source = tmp_path / "ud"
    source.write_text(user_data())
    root = tmp_path / "r"
    assert pud.run(args(root, source="file", file=source)) == 0
    run_dir = root / "run" / "peerpod"
    entries = tomllib.loads(INIT_DOC.decode())["data"]
    for name in ("aa.toml", "cdh.toml", "policy.rego"):
        assert (run_dir / name).read_text() == entries[name], name
        assert mode_of(run_dir / name) == 0o600, name
    assert (run_dir / "initdata.digest").read_text() == hashlib.sha384(INIT_DOC).hexdigest()
    assert mode_of(run_dir / "initdata.digest") == 0o644
    assert mode_of(run_dir / "initdata") == 0o600
    assert not (run_dir / "extra.txt").exists(), "only the three known entries are unpacked"


def test_without_initdata_no_initdata_file_is_written(tmp_path):
    source = tmp_path / "ud"
    source.write_text(userdata.render({APF_CONFIG_PATH: APF}))
    root = tmp_path / "r"
    assert pud.run(args(root, source="file", file=source)) == 0
    assert sorted(p.name for p in (root / "run" / "peerpod").iterdir()) == ["apf.json"]


def test_bad_initdata_fails_before_any_file_is_written(tmp_path, capsys):
    source = tmp_path / "ud"
    bad = base64.b64encode(b'version = "0.1.0"\nalgorithm = "crc32"\n').decode()
    source.write_text(userdata.render({APF_CONFIG_PATH: APF, INITDATA_PATH: bad}))
    root = tmp_path / "r"
    assert pud.run(args(root, source="file", file=source)) == 1
    err = capsys.readouterr().err
    assert "/run/peerpod/initdata: 'algorithm' is not one of sha256, sha384, sha512" in err, err
    assert not root.exists(), "nothing written"
