"""The daemon in a cluster: node capacity advertised, PeerPods follow the VMs, pull secrets reach the VM.

The daemon's lifecycle is wired to the Kubernetes integration only through
``SandboxObserver`` and ``PodCredentials``; this checks that wiring against the local API endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging

from cloudadaptor import userdata

from cloudadaptor.adaptor.daemon import Daemon
from cloudadaptor.config import load_settings
from cloudadaptor.k8s.peerpods import FINALIZER, peerpod_name
from cloudadaptor.protocols import health_pb2
from fakes.kubeapi import NODES, PEERPODS, PODS, SECRETS, SERVICEACCOUNTS, KubeApiServer
from cloudadaptor.dev.shim import ShimEmulator, shim_annotations
from cloudadaptor.ttrpc.server import Server, unary

SANDBOX = "d" * 64
PASSWORD = "pull-s3cr3t"


async def _eventually(check, timeout: float = 5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := check()) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return value


async def _agent_on_port_15150() -> Server:
    """The fake VM's agent: the daemon dials the provider's IP (127.0.0.1) on 15150.
    Only possible in the private namespace, where the port is ours."""
    server = Server()

    async def check(request, ctx):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server.register("grpc.Health", "Check", unary(health_pb2.CheckRequest, check))
    await server.serve_tcp("127.0.0.1", 15150)
    return server


def _pull_secret(name: str, namespace: str, registry: str) -> dict:
    auth = base64.b64encode(f"robot:{PASSWORD}".encode()).decode()
    body = base64.b64encode(json.dumps({"auths": {registry: {"auth": auth}}}).encode()).decode()
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": body}}


async def test_daemon_advertises_capacity_and_tracks_peerpods(private_ns, short_dir, provider, pod_network, netns_file, caplog):
    async with KubeApiServer() as kubeapi:
        kubeapi.seed(NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "worker-1"},
                             "status": {"capacity": {"cpu": "4"}, "allocatable": {"cpu": "4"}}})
        kubeapi.seed(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "prod"},
                            "spec": {"nodeName": "worker-1", "containers": [{"name": "app", "image": "busybox"}],
                                     "serviceAccountName": "builder", "imagePullSecrets": [{"name": "pod-pull"}]}})
        kubeapi.seed(SERVICEACCOUNTS, {"apiVersion": "v1", "kind": "ServiceAccount",
                                       "metadata": {"name": "builder", "namespace": "prod"},
                                       "imagePullSecrets": [{"name": "sa-pull"}]})
        for name, registry in (("pod-pull", "registry.one.example"), ("sa-pull", "registry.two.example")):
            kubeapi.seed(SECRETS, _pull_secret(name, "prod", registry))
        settings = load_settings({
            "CLOUD_PROVIDER": "local", "NODE_NAME": "worker-1", "PEERPODS_LIMIT_PER_NODE": "3", "DISABLE_TLS": "true",
            "STATE_DIR": str(short_dir / "state"), "SOCKET": str(short_dir / "hv.sock"), "PODS_DIR": str(short_dir / "pods"),
            "KUBECONFIG": str(kubeapi.write_kubeconfig(short_dir / "kubeconfig")),
        })
        agent = await _agent_on_port_15150()
        daemon = Daemon(settings, provider=provider, pod_network=pod_network)
        await daemon.start()
        try:
            node = await _eventually(lambda: kubeapi.get(NODES, "worker-1")["status"]["capacity"].get("kata.peerpods.io/vm"))
            assert node == "3", "the node advertises PEERPODS_LIMIT_PER_NODE as kata.peerpods.io/vm"
            assert kubeapi.get(NODES, "worker-1")["status"]["allocatable"]["kata.peerpods.io/vm"] == "3"

            shim = ShimEmulator(str(settings.socket))
            with caplog.at_level(logging.DEBUG):
                await shim.create_vm(SANDBOX, netns_file, shim_annotations("web", "prod"))
            auth = json.loads(userdata.parse(daemon.lifecycle.store.get(SANDBOX).user_data)[userdata.AUTH_JSON_PATH])
            assert set(auth["auths"]) == {"registry.one.example", "registry.two.example"}, "pod and SA secrets merged"
            assert PASSWORD not in caplog.text, "credentials never logged"
            await shim.start_vm(SANDBOX)
            peerpod = kubeapi.get(PEERPODS, peerpod_name("web", SANDBOX), "prod")
            assert peerpod is not None, "a PeerPod exists once the VM exists"
            assert peerpod["spec"] == {"cloudProvider": "fake", "instanceID": "i-fake-1"}
            assert FINALIZER in peerpod["metadata"]["finalizers"]
            assert peerpod["metadata"]["ownerReferences"][0]["name"] == "web"

            kubeapi.delete(PEERPODS, peerpod_name("web", SANDBOX), "prod")  # e.g. the pod is being deleted
            assert kubeapi.get(PEERPODS, peerpod_name("web", SANDBOX), "prod") is not None, "held by our finalizer"
            await shim.stop_vm(SANDBOX)
            assert provider.instances == {}
            gone = await _eventually(lambda: kubeapi.get(PEERPODS, peerpod_name("web", SANDBOX), "prod") is None)
            assert gone, "StopVM deleted the VM, so the finalizer is released and the PeerPod goes"
        finally:
            await daemon.close()
            await agent.close()
