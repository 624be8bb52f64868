"""`image build|list|delete local`: the cache key, the cache layout, the command, interruption."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from cloudadaptor.imagebuild import command, inputs, localcache
from cloudadaptor.imagebuild.wheel import build_wheel

PODVM = inputs.SOURCE_PODVM


def parse(*argv: str) -> argparse.Namespace:
    return command.build_parser(argparse.ArgumentParser()).parse_args(list(argv))


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = command.run(parse(*argv), env={}, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def fake_image(cache: Path, key: str, created: str = "2026-11-30T00:00:00Z") -> Path:
    directory = cache / key
    directory.mkdir(parents=True)
    for name in (localcache.DISK, localcache.KERNEL, localcache.INITRD):
        (directory / name).write_bytes(b"x")
    (directory / localcache.INFO).write_text(json.dumps({"key": key, "created": created, "disk_bytes": 3 << 20,
                                                         "agent_payload": "development agent (default)"}))
    return directory


def test_the_default_payload_is_deterministic_and_a_valid_agent_payload(tmp_path):
    first = localcache.devagent_payload(tmp_path / "a.tar").read_bytes()
    second = localcache.devagent_payload(tmp_path / "b.tar").read_bytes()
    assert first == second
    provision = inputs.load_provision(PODVM)
    with tarfile.open(tmp_path / "a.tar") as archive:
        member = provision.find_agent(archive)
        assert member.name == "usr/local/bin/kata-agent" and member.mode == 0o755


def test_the_third_party_agent_payload_is_deterministic_and_runs_the_fake_agent_itself(tmp_path):
    from fakes import thirdpartypayload

    first = thirdpartypayload.write(tmp_path / "a.tar").read_bytes()
    assert first == thirdpartypayload.write(tmp_path / "b.tar").read_bytes(), "same bytes, same image key"
    provision = inputs.load_provision(PODVM)
    with tarfile.open(tmp_path / "a.tar") as archive:
        member = provision.find_agent(archive)
        assert member.name == "usr/local/bin/kata-agent" and member.mode == 0o755
        agent = archive.extractfile(member).read()
    assert agent == thirdpartypayload.AGENT.read_bytes() and agent.startswith(b"#!/usr/bin/env python3\n")
    assert inputs.check_payload(tmp_path / "a.tar", str(tmp_path / "a.tar"), provision)


def test_the_key_covers_every_input(tmp_path):
    wheel = build_wheel(tmp_path / "w")
    payload = localcache.devagent_payload(tmp_path / "p.tar")
    podvm = tmp_path / "podvm"
    shutil.copytree(PODVM, podvm)
    key = localcache.input_key(wheel, podvm, payload)
    assert key == localcache.input_key(wheel, podvm, payload) and len(key) == 16
    (podvm / "files/etc/agent-config.toml").write_text("changed\n")
    changed_unit = localcache.input_key(wheel, podvm, payload)
    other_payload = tmp_path / "other.tar"
    other_payload.write_bytes(payload.read_bytes() + b"\0")
    assert len({key, changed_unit, localcache.input_key(wheel, podvm, other_payload)}) == 3


def test_a_cached_image_is_a_hit_without_building(tmp_path):
    cache = tmp_path / "cache"
    wheel = build_wheel(tmp_path / "w")
    key = localcache.input_key(wheel, PODVM, localcache.devagent_payload(tmp_path / "p.tar"))
    directory = fake_image(cache, key)
    code, out, err = run("build", "local", "--cache-dir", str(cache), "--wheel", str(wheel))
    assert code == 0, err
    assert out.strip() == str(directory.resolve()) and "cache hit" in err and "[1/7]" in err
    assert localcache.current(cache).key == key


def test_list_and_delete(tmp_path):
    cache = tmp_path / "cache"
    fake_image(cache, "aaaaaaaaaaaaaaaa")
    fake_image(cache, "bbbbbbbbbbbbbbbb")
    (cache / ".build-cccccccccccccccc-123456").mkdir()  # never listed
    localcache.set_current(cache, "bbbbbbbbbbbbbbbb")
    code, out, _ = run("list", "local", "--cache-dir", str(cache))
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:2] == ["KEY", "CURRENT"] and len(lines) == 3
    assert lines[2].split()[:2] == ["bbbbbbbbbbbbbbbb", "*"] and "3" in lines[2].split()
    assert run("delete", "local", "--cache-dir", str(cache), "--id", "../etc")[0] == 1
    code, out, _ = run("delete", "local", "--cache-dir", str(cache))  # the current one
    assert code == 0 and out == "deleted bbbbbbbbbbbbbbbb\n"
    assert not (cache / "bbbbbbbbbbbbbbbb").exists() and not (cache / "current").is_symlink()
    code, _, err = run("delete", "local", "--cache-dir", str(cache))
    assert code == 1 and "no image current" in err


def test_cloud_only_flags_are_refused(tmp_path):
    code, _, err = run("build", "local", "--cache-dir", str(tmp_path), "--replace")
    assert code == 2 and "--replace only apply to aws and azure" in err


def test_sigterm_during_the_build_leaves_no_half_image_and_no_mount(tmp_path):
    if os.geteuid() != 0 or shutil.which("mmdebstrap") is None:
        if os.environ.get("CI") == "true":  # `make test` installs mmdebstrap and runs as root in CI
            pytest.fail("the interrupted-build test needs root and mmdebstrap")
        pytest.skip("needs root and mmdebstrap")
    cache = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-m", "cloudadaptor.cli", "image", "build", "local",
                              "--cache-dir", str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stderr is not None
    for line in child.stderr:
        if line.startswith("[2/7]"):
            break
    time.sleep(2.0)  # mmdebstrap is at work in .build-*
    assert [p.name for p in cache.iterdir() if p.name.startswith(".build-")]
    child.send_signal(signal.SIGTERM)
    rest = child.stderr.read()
    assert child.wait(timeout=60) == 143, rest
    assert "terminated; the half-built image was removed" in rest
    assert [p.name for p in cache.iterdir()] == []
    with open("/proc/self/mountinfo") as f:
        assert str(cache) not in f.read()
