"""The docs' procedure end to end: the example PeerPodConfig, `oc patch` of its limit from 10 to 3, the
matching nodes' kata.peerpods.io/vm following, and a real adaptor (local provider, real pod VMs, the
shim emulator) on a matching node refusing a StartVM beyond 3 while its 4 running pods keep running.

The controller runs its loop in-process against the local Kubernetes API; the daemon reaches the same
API through a kubeconfig, as it would in a cluster."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio import client

from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.config import load_settings
from cloudadaptor.dev.shim import ShimEmulator, shim_annotations, start_pod, stop_pod
from cloudadaptor.k8s import node as node_module
from cloudadaptor.k8s import nodelimits
from cloudadaptor.k8s.capacity import CONFIG_ANNOTATION, VM_RESOURCE
from cloudadaptor.ttrpc.errors import Code, TtrpcError
from fakes.kubeapi import NODES, PEERPODCONFIGS, PODS, KubeApiServer
from links import delete_link

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "peerpodconfig-openshift.yaml"
NS, NAME = "openshift-sandboxed-containers-operator", "peerpodconfig-openshift"
KATA_OC = "node-role.kubernetes.io/kata-oc"


def _node(name: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "status": {"capacity": {"cpu": "4"}, "allocatable": {"cpu": "4"}}}


def _pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "e2e"},
            "spec": {"nodeName": "worker-a", "runtimeClassName": "kata-remote",
                     "containers": [{"name": "app", "image": "busybox"}]}}


async def _until(check, what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"not reached within {timeout:g}s: {what}"
        await asyncio.sleep(0.05)


def _vm(kubeapi: KubeApiServer, name: str) -> str | None:
    return kubeapi.get(NODES, name)["status"]["capacity"].get(VM_RESOURCE)


@pytest.fixture
async def world(private_ns, monkeypatch):
    monkeypatch.setattr(node_module, "FOLLOW_INTERVAL", 0.1)  # the adaptor re-reads its node this often
    root = Path(tempfile.mkdtemp(prefix="ppc-", dir="/run"))
    n = os.getpid() % 50
    async with KubeApiServer() as kubeapi:
        kubeapi.seed(NODES, _node("worker-a", {KATA_OC: ""}))
        kubeapi.seed(NODES, _node("worker-b", {KATA_OC: ""}))
        kubeapi.seed(NODES, _node("plain", {}))
        for i in range(5):
            kubeapi.seed(PODS, _pod(f"web-{i}"))
        settings = load_settings({
            "CLOUD_PROVIDER": "local", "NODE_NAME": "worker-a", "PEERPODS_LIMIT_PER_NODE": "10",
            "STATE_DIR": str(root), "SOCKET": str(root / "hv.sock"), "PODS_DIR": str(root / "pods"),
            "LOCAL_CLOUD_BRIDGE": f"ppcfg{n}", "LOCAL_CLOUD_CIDR": f"203.0.113.{(n % 4) * 64}/26",
            "PROXY_TIMEOUT": "20s", "KUBECONFIG": str(kubeapi.write_kubeconfig(root / "kubeconfig")),
        })
        daemon = Daemon(settings)
        await daemon.start()
        api = client.ApiClient(kubeapi.configuration())
        stop = asyncio.Event()
        controller = asyncio.create_task(nodelimits.run(nodelimits.NodeLimitController(api), stop=stop, interval=0.1))
        try:
            yield kubeapi, daemon, api
        finally:
            stop.set()
            await controller
            await api.close()
            for sandbox in daemon.lifecycle.store.all():
                await daemon.lifecycle.stop(sandbox.id)
            await daemon.close()
            await asyncio.to_thread(delete_link, f"ppcfg{n}")
            cloud_dir = root / "local-cloud"
            leftover = [p.name for p in cloud_dir.iterdir() if p.is_dir()] if cloud_dir.exists() else []
            shutil.rmtree(root, ignore_errors=True)
            assert leftover == [], f"VMs left in the local cloud: {leftover}"


async def test_patching_the_limit_reaches_the_nodes_and_the_adaptor_refuses_beyond_it(world, make_pod_netns):
    kubeapi, daemon, api = world
    await _until(lambda: _vm(kubeapi, "worker-a") == "10", "the adaptor advertises PEERPODS_LIMIT_PER_NODE")
    custom = client.CustomObjectsApi(api)
    # oc apply -f deploy/examples/peerpodconfig-openshift.yaml
    await custom.create_namespaced_custom_object("confidentialcontainers.org", "v1alpha1", NS, "peerpodconfigs",
                                                 yaml.safe_load(EXAMPLE.read_text()))
    await _until(lambda: (kubeapi.get(NODES, "worker-a")["metadata"].get("annotations") or {}).get(CONFIG_ANNOTATION)
                 == f"{NS}/{NAME}", "the controller manages worker-a")
    await _until(lambda: daemon.vm_limit.managed, "the adaptor follows the PeerPodConfig")
    assert _vm(kubeapi, "worker-b") == "10" and daemon.vm_limit.current() == 10

    shim = ShimEmulator(str(daemon.settings.socket))
    pods = [await asyncio.to_thread(make_pod_netns, f"198.51.100.{20 + i}/24", "198.51.100.1") for i in range(5)]
    started = await asyncio.gather(*(start_pod(shim, f"web-{i}", "e2e", pods[i].path) for i in range(4)))
    runs = [run for run, _, _ in started]

    # oc patch peerpodconfig peerpodconfig-openshift -n ... --type merge --patch '{"spec":{"limit":"3"}}'
    await custom.patch_namespaced_custom_object("confidentialcontainers.org", "v1alpha1", NS, "peerpodconfigs", NAME,
                                                {"spec": {"limit": "3"}}, _content_type="application/merge-patch+json")
    await _until(lambda: _vm(kubeapi, "worker-a") == "3" and _vm(kubeapi, "worker-b") == "3", "both nodes follow")
    assert kubeapi.get(NODES, "worker-a")["status"]["allocatable"][VM_RESOURCE] == "3"
    await _until(lambda: daemon.vm_limit.current() == 3, "the adaptor enforces 3 without a restart")
    assert _vm(kubeapi, "plain") is None and not kubeapi.get(NODES, "plain")["metadata"].get("annotations"), \
        "the node without the label is untouched"

    sandbox = uuid.uuid4().hex * 2
    await shim.create_vm(sandbox, pods[4].path, shim_annotations("web-4", "e2e"))
    with pytest.raises(TtrpcError) as refused:
        await shim.start_vm(sandbox)
    assert refused.value.code == Code.RESOURCE_EXHAUSTED
    assert f"PeerPodConfig {NS}/{NAME} spec.limit=3" in refused.value.message, refused.value.message
    await shim.stop_vm(sandbox)

    for run in runs:  # lowering the limit stops nothing: every pod still answers in its VM
        result = await run.exec(["sh", "-c", "echo still-here"])
        assert result.exit_code == 0 and result.stdout == b"still-here\n", result
    await _until(lambda: (kubeapi.get(PEERPODCONFIGS, NAME, NS).get("status") or {}).get("aboveLimit")
                 == [{"node": "worker-a", "running": 4, "limit": "3"}], "the status says worker-a runs above the limit")
    for run in runs:
        await stop_pod(shim, run)
