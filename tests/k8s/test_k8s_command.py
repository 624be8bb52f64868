"""`cloud-api-adaptor probe` and `cloud-api-adaptor peerpod-controller` as the manifests run them."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from cloudadaptor.k8s.peerpods import FINALIZER
from cloudadaptor.protocols import hypervisor_pb2 as hv
from fakes.kubeapi import PEERPODS, KubeApiServer
from cloudadaptor.ttrpc.server import Server, unary


async def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "AZURE_", "LOCAL_", "KUBE", "PEERPOD_")) and k not in ("CLOUD_PROVIDER", "SOCKET")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloudadaptor.cli", *args, env={**base, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode or 0, out.decode(), err.decode()


async def test_probe_succeeds_when_the_adaptor_answers_version(tmp_path: Path):
    server = Server()
    server.register("hypervisor.Hypervisor", "Version", unary(hv.VersionRequest, lambda req, ctx: hv.VersionResponse(version="9.9.9")))
    socket = tmp_path / "hypervisor.sock"
    await server.serve_unix(str(socket))
    try:
        code, out, err = await cli("probe", "--socket", str(socket))
    finally:
        await server.close()
    assert code == 0, err
    assert "9.9.9" in out


async def test_probe_fails_when_nobody_listens(tmp_path: Path):
    code, _, err = await cli("probe", "--socket", str(tmp_path / "absent.sock"))
    assert code == 1 and "not ready" in err


async def test_probe_fails_when_the_daemon_does_not_answer_in_time(tmp_path: Path):
    async def hang(request, ctx):
        await asyncio.sleep(30)

    server = Server()
    server.register("hypervisor.Hypervisor", "Version", unary(hv.VersionRequest, hang))
    await server.serve_unix(str(tmp_path / "h.sock"))
    try:
        code, _, err = await cli("probe", "--socket", str(tmp_path / "h.sock"), "--timeout", "0.5")
    finally:
        await server.close()
    assert code == 1 and "TimeoutError" in err


async def test_controller_once_finalizes_a_deleted_peerpod(tmp_path: Path, kubeapi: KubeApiServer):
    kubeapi.seed(PEERPODS, {
        "metadata": {"name": "web-1", "namespace": "default", "finalizers": [FINALIZER],
                     "deletionTimestamp": "2024-01-01T00:00:00Z"},
        "spec": {"cloudProvider": "local", "instanceID": "i-local-0000000000000001"},
    })
    env = {"CLOUD_PROVIDER": "local", "LOCAL_CLOUD_DIR": str(tmp_path / "cloud"), "STATE_DIR": str(tmp_path),
           "KUBECONFIG": str(kubeapi.write_kubeconfig(tmp_path / "kubeconfig"))}
    code, _, err = await cli("peerpod-controller", "--once", env=env)
    assert code == 0, err
    assert kubeapi.all(PEERPODS) == [], "the finalizer must be released (the VM is gone in the local cloud)"


async def test_controller_refuses_bad_settings_naming_each_key(tmp_path: Path):
    code, _, err = await cli("peerpod-controller", "--once", "--sweep-grace", "forever",
                             env={"CLOUD_PROVIDER": "local", "PEERPOD_CONTROLLER_INTERVAL": "soon"})
    assert code == 2
    assert "PEERPOD_SWEEP_GRACE" in err and "PEERPOD_CONTROLLER_INTERVAL" in err


async def test_controller_without_a_cluster_says_so(tmp_path: Path):
    code, _, err = await cli("peerpod-controller", "--once", env={"CLOUD_PROVIDER": "local", "STATE_DIR": str(tmp_path)})
    assert code == 1 and "no Kubernetes configuration" in err
