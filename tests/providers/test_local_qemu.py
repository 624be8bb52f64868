"""LOCAL_VM=qemu faults: QEMU or the image missing, a guest that never boots, a provider restart."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import pytest

from cloudadaptor.providers.base import ProviderError
from cloudadaptor.providers.local import qemu
from providers.test_local import spec
from links import delete_link
from qemu_support import leftovers, truncated_copy


def test_qemu_missing_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(qemu.shutil, "which", lambda *a, **k: None)
    with pytest.raises(ProviderError) as err:
        qemu.binary(qemu.QEMU)
    assert str(err.value) == ("qemu-system-x86_64 not found: install the Debian package qemu-system-x86 "
                              "(apt-get install -y qemu-system-x86)")


async def test_no_image_is_one_line_naming_the_build_command(local_cloud, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_IMAGE_CACHE", str(tmp_path / "empty"))
    provider = local_cloud.provider(vm="qemu")
    problems = await provider.verify()
    assert problems == [f"LOCAL_VM=qemu: no pod VM image at {tmp_path}/empty/current: "
                        "build it with `cloud-api-adaptor image build local`"]
    with pytest.raises(ProviderError, match="image build local"):
        await provider.create_instance(spec())
    assert await provider.list_owned({}) == []


async def test_a_guest_that_never_boots_is_deleted_with_its_console_tail_after_a_restart(
        local_cloud, qemu_image, tmp_path, caplog):
    broken = truncated_copy(qemu_image, tmp_path / "broken-image")  # no file system on its disk
    provider = local_cloud.provider(vm="qemu", qemu_image=broken, qemu_accel="tcg")
    instance = await provider.create_instance(spec())
    directory = local_cloud.cloud_dir / instance.id
    assert (directory / "disk.qcow2").is_file() and json.loads((directory / "qemu.json").read_text())["accel"] == "tcg"
    # The adaptor restarts: a new provider over the same cloud finds the VM by its tags.
    restarted = local_cloud.provider(vm="qemu", qemu_image=broken, qemu_accel="tcg")
    assert [i.id for i in await restarted.list_owned({"peerpods.io/node": "node-1"})] == [instance.id]
    pid = int((directory / "qemu.pid").read_text())  # QEMU removes it when it exits
    deadline = time.monotonic() + 240
    while qemu._cmdline_has(pid, "qemu-system") and time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # panic=-1 and -no-reboot: QEMU exits when the guest panics
    assert not qemu._cmdline_has(pid, "qemu-system"), (directory / "console.log").read_text(errors="replace")[-2000:]
    with caplog.at_level(logging.WARNING, logger=qemu.__name__):
        await restarted.delete_instance(instance.id)
    warnings = [r.getMessage() for r in caplog.records if instance.id in r.getMessage()]
    stopped = [w for w in warnings if "had stopped by itself; console:" in w]
    assert stopped and "anic" in stopped[0], warnings
    await restarted.delete_instance(instance.id)  # idempotent
    assert await asyncio.to_thread(leftovers, local_cloud.cloud_dir) == ([], [], [])
    assert not os.path.exists(directory)


IMDS_CLIENT = """
import sys, urllib.request, urllib.error
from cloudadaptor import linuxns
linuxns.setns(sys.argv[1], linuxns.CLONE_NEWNET)
base = "http://169.254.169.254"

def call(method, path, headers):
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, method=method, headers=headers), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""

print(call("GET", "/latest/user-data", {})[0])
print(call("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "0"})[0])
status, token = call("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
print(status)
print(call("GET", "/latest/user-data", {"X-aws-ec2-metadata-token": "forged"})[0])
print(call("GET", "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": token})[0])
status, body = call("GET", "/latest/user-data", {"X-aws-ec2-metadata-token": token})
print(status)
sys.stdout.write(body)
"""


async def test_the_metadata_service_speaks_imdsv2_to_the_instance_at_that_address(local_cloud):
    import subprocess
    import sys

    from cloudadaptor.providers import local_metadata

    provider = local_cloud.provider()  # a namespace VM is a client on the bridge with the instance's address
    instance = await provider.create_instance(spec())
    await asyncio.to_thread(qemu.ensure_metadata, provider.config)
    pid = int((local_cloud.cloud_dir / local_metadata.PID_FILE).read_text())
    await asyncio.to_thread(qemu.ensure_metadata, provider.config)  # running: not started twice
    assert int((local_cloud.cloud_dir / local_metadata.PID_FILE).read_text()) == pid
    done = None
    for _ in range(50):  # the service binds within a moment of starting
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", IMDS_CLIENT, f"/run/netns/{instance.id}"],
                                       capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            break
        await asyncio.sleep(0.1)
    assert done is not None and done.returncode == 0, done.stderr
    lines = done.stdout.split("\n", 6)
    assert lines[:6] == ["401", "400", "200", "401", "404", "200"], done.stdout
    assert lines[6] == spec().user_data
    await provider.delete_instance(instance.id)
    await asyncio.to_thread(delete_link, provider.config.bridge)  # the cloud is gone: the service exits
    deadline = time.monotonic() + 10
    while qemu._cmdline_has(pid, local_metadata.MODULE) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not qemu._cmdline_has(pid, local_metadata.MODULE)
    assert not (local_cloud.cloud_dir / local_metadata.PID_FILE).exists()


async def test_a_metadata_service_that_cannot_bind_is_one_error_with_its_own_words(local_cloud):
    """Without the wait, the guest would boot without user data and fail only at PROXY_TIMEOUT, saying nothing."""
    import socket

    from cloudadaptor.providers import local_metadata
    from cloudadaptor.providers.local import machine

    provider = local_cloud.provider()
    await asyncio.to_thread(machine.ensure_bridge, provider.config)
    local_cloud.cloud_dir.mkdir(parents=True, exist_ok=True)  # a create makes it before it starts the service
    with socket.socket() as squatter:  # holds the metadata port on this cloud's bridge, without SO_REUSEADDR
        squatter.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND (not in the socket module): the address needs not exist yet
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, provider.config.bridge.encode())
        squatter.bind((local_metadata.ADDRESS, local_metadata.PORT))
        squatter.listen()
        with pytest.raises(ProviderError) as refused:
            await asyncio.to_thread(qemu.ensure_metadata, provider.config)
    assert "exited with status" in str(refused.value) and "Address already in use" in str(refused.value)
    pid = int((local_cloud.cloud_dir / local_metadata.PID_FILE).read_text())
    assert not qemu._cmdline_has(pid, local_metadata.MODULE)
