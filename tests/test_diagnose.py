"""`diagnose` and `console` against a real local cloud: the bundle names the orphan VM and the
missing one, and holds none of the secrets this node was configured with."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from cloudadaptor import cli
from cloudadaptor.adaptor.store import Sandbox, SandboxState, SandboxStore
from cloudadaptor.config import load_settings
from cloudadaptor.providers import base as providers
from cloudadaptor.providers.base import InstanceSpec, create_provider
from links import delete_link


def _key_lines() -> list[str]:
    return [base64.b64encode(secrets.token_bytes(48)).decode() for _ in range(3)]


@pytest.fixture
def node(private_ns, monkeypatch):
    root = Path(tempfile.mkdtemp(prefix="diag-", dir="/run"))
    n = os.getpid() % 50
    secret_values = {
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "AZURE_CLIENT_SECRET": secrets.token_urlsafe(24),
    }
    env = {
        "CLOUD_PROVIDER": "local", "STATE_DIR": str(root), "NODE_NAME": "diag-node", "PROBE_PORT": "18003",
        "LOCAL_CLOUD_BRIDGE": f"ppdg{n}", "LOCAL_CLOUD_CIDR": "192.0.2.192/26", "LOCAL_CLOUD_DIR": str(root / "cloud"),
        **secret_values,
    }
    for key in list(os.environ):
        if key.startswith(("AWS_", "AZURE_", "LOCAL_")) or key in ("KUBECONFIG",):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(root)
    settings = load_settings(env)
    yield settings, root, secret_values
    async def cleanup():
        provider = create_provider(settings)
        for instance in await provider.list_owned({}):
            await provider.delete_instance(instance.id)
        await provider.close()
    asyncio.run(cleanup())
    delete_link(f"ppdg{n}")
    shutil.rmtree(root, ignore_errors=True)


def _spec(sandbox_id: str, pod: str) -> InstanceSpec:
    tags = {providers.TAG_OWNER: providers.OWNER_VALUE, providers.TAG_NODE: "diag-node",
            providers.TAG_SANDBOX: sandbox_id, providers.TAG_POD: pod}
    return InstanceSpec(name=f"podvm-{pod.split('/')[1]}-{sandbox_id[:8]}", sandbox_id=sandbox_id,
                        user_data="#cloud-config\n", client_token=sandbox_id, tags=tags)


def test_bundle_names_orphans_and_missing_vms_and_holds_no_secret(node, capsys):
    settings, root, secret_values = node
    key_lines = _key_lines()
    pem = "-----BEGIN PRIVATE KEY-----\n" + "\n".join(key_lines) + "\n-----END PRIVATE KEY-----\n"
    registry_auth = base64.b64encode(b"robot:" + secrets.token_hex(12).encode()).decode()
    user_data = f'#cloud-config\nwrite_files:\n- path: /run/peerpod/apf.json\n  content: {pem!r}\n' \
                f'- path: /run/peerpod/auth.json\n  content: \'{{"auths": {{"r.example": {{"auth": "{registry_auth}"}}}}}}\'\n'

    async def arrange():
        provider = create_provider(settings)
        assert await provider.verify() == []
        known = await provider.create_instance(_spec("a" * 64, "shop/web"))
        orphan = await provider.create_instance(_spec("0" * 64, "shop/gone"))
        await provider.close()
        return known, orphan

    known, orphan = asyncio.run(arrange())
    store = SandboxStore(settings.state_dir / "state.db")
    common = dict(netns_path="/run/netns/none", agent_socket="/run/x.sock", user_data=user_data)
    store.add(Sandbox(id="a" * 64, pod_name="web", pod_namespace="shop", vm_name=known.name, vni=555001, **common))
    store.update("a" * 64, state=SandboxState.RUNNING, instance_id=known.id, vm_ips=known.ips)
    store.add(Sandbox(id="b" * 64, pod_name="api", pod_namespace="shop", vm_name="podvm-api-bbbbbbbb", vni=555002,
                      annotations={"io.katacontainers.config.hypervisor.cc_init_data": "c2VjcmV0LWluaXRkYXRh"}, **common))
    store.update("b" * 64, state=SandboxState.FAILED, instance_id="i-vanished", error="agent never answered")
    store.close()
    (settings.state_dir / "adaptor.log").write_text("2026-11-30 INFO cloudadaptor: StartVM bbbb failed\n")

    output = root / "bundle.tar.gz"
    assert cli.main(["diagnose", "--output", str(output)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert oct(output.stat().st_mode & 0o777) == "0o600"
    with tarfile.open(output) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    assert set(files) == {"versions.txt", "config.txt", "sandboxes.json", "vms.json", "network.txt", "log.txt",
                          "consoles.txt", "metrics.txt"}
    vms = __import__("json").loads(files["vms.json"])
    assert [vm["id"] for vm in vms["orphans"]] == [orphan.id], vms
    assert vms["missing"] == [{"sandbox_id": "b" * 64, "instance_id": "i-vanished"}]
    assert "StartVM bbbb failed" in files["log.txt"]
    assert "AWS_SECRET_ACCESS_KEY" in files["config.txt"] and "<hidden>" in files["config.txt"]
    assert "agent never answered" in files["consoles.txt"]
    bundle = "\n".join(files.values())
    for secret in [*secret_values.values(), *key_lines, registry_auth, "c2VjcmV0LWluaXRkYXRh"]:
        assert secret not in bundle, f"a configured secret is in the bundle: {secret[:6]}..."
        assert secret.encode() not in output.read_bytes()


def test_console_prints_a_running_vm_console_and_says_why_for_a_failed_one(node, capsys):
    settings, root, _ = node

    async def arrange():
        provider = create_provider(settings)
        assert await provider.verify() == []
        vm = await provider.create_instance(_spec("c" * 64, "shop/cart"))
        await provider.close()
        return vm

    vm = asyncio.run(arrange())
    store = SandboxStore(settings.state_dir / "state.db")
    store.add(Sandbox(id="c" * 64, pod_name="cart", pod_namespace="shop", vm_name=vm.name, netns_path="/x",
                      agent_socket="/x.sock", vni=555003))
    store.update("c" * 64, state=SandboxState.RUNNING, instance_id=vm.id, vm_ips=vm.ips)
    store.add(Sandbox(id="d" * 64, pod_name="bad", pod_namespace="shop", vm_name="podvm-bad", netns_path="/x",
                      agent_socket="/y.sock", vni=555004))
    store.update("d" * 64, state=SandboxState.FAILED, error="creating VM failed: quota")
    store.close()
    assert cli.main(["console", "shop/cart"]) == 0
    assert "local-vm[" in capsys.readouterr().out
    assert cli.main(["console", "cccccccc", "--lines", "1"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert cli.main(["console", "bad"]) == 1
    err = capsys.readouterr().err
    assert "has no VM now: creating VM failed: quota" in err and "PodVMFailed" in err
    assert cli.main(["console", "shop/nobody"]) == 1
    assert "no sandbox or VM of this node (diag-node) matches 'shop/nobody'" in capsys.readouterr().err
