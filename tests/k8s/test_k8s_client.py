"""Client setup (KUBECONFIG, in-cluster service account over HTTPS) and the conflict retry."""

from __future__ import annotations

import ssl

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from cloudadaptor.k8s.client import KubeConfigError, connect, describe, retry_on_conflict
from fakes.kubeapi import PODS, KubeApiServer
from cloudadaptor.tlscerts import CertificateAuthority


async def test_no_kubeconfig_and_no_service_host_means_no_cluster():
    assert await connect({}) is None


async def web_pod_name(api: client.ApiClient | None) -> str:
    """Read pod default/web through ``api`` (a client ``connect`` returned), then close it."""
    assert api is not None, "connect found no configuration"
    try:
        pod = await client.CoreV1Api(api).read_namespaced_pod("web", "default")
    finally:
        await api.close()
    return pod.metadata.name


async def test_kubeconfig_is_used_with_its_token(kubeapi: KubeApiServer, add_pod, tmp_path):
    add_pod("web")
    api = await connect({"KUBECONFIG": str(kubeapi.write_kubeconfig(tmp_path / "kc", token="dev-token"))})
    assert await web_pod_name(api) == "web"
    assert kubeapi.requests[-1].authorization == "Bearer dev-token"


async def test_a_missing_kubeconfig_is_a_clear_error(tmp_path):
    with pytest.raises(KubeConfigError, match="KUBECONFIG="):
        await connect({"KUBECONFIG": str(tmp_path / "nope")})


async def test_in_cluster_service_account_over_https(tmp_path):
    ca = CertificateAuthority.create("test cluster CA")
    cert_pem, key_pem = ca.issue("kubernetes", server=True, ip_addresses=["127.0.0.1"])
    (tmp_path / "server.crt").write_text(cert_pem)
    (tmp_path / "server.key").write_text(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    (sa / "ca.crt").write_text(ca.cert_pem)
    async with KubeApiServer(ssl_context=context) as kubeapi:
        kubeapi.seed(PODS, {"metadata": {"name": "web", "namespace": "default"},
                            "spec": {"containers": [{"name": "c", "image": "i"}]}})
        port = kubeapi.url.rsplit(":", 1)[1]
        api = await connect({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}, service_account_dir=sa)
        assert await web_pod_name(api) == "web"
        assert kubeapi.requests[-1].authorization == "Bearer sa-token"


async def test_in_cluster_without_a_token_is_a_clear_error(tmp_path):
    with pytest.raises(KubeConfigError, match="in-cluster"):
        await connect({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}, service_account_dir=tmp_path)


async def test_retry_on_conflict_reruns_until_no_conflict_and_passes_other_errors():
    calls = []

    async def conflicting_twice():
        calls.append(1)
        if len(calls) <= 2:
            raise ApiException(status=409, reason="Conflict")
        return "done"

    assert await retry_on_conflict(conflicting_twice) == "done" and len(calls) == 3

    async def forbidden():
        raise ApiException(status=403, reason="Forbidden")

    with pytest.raises(ApiException) as err:
        await retry_on_conflict(forbidden)
    assert err.value.status == 403

    async def always_conflict():
        raise ApiException(status=409, reason="Conflict")

    with pytest.raises(ApiException):
        await retry_on_conflict(always_conflict, attempts=2)


def test_describe_shows_the_api_servers_message():
    exc = ApiException(status=409, reason="Conflict")
    exc.body = '{"kind":"Status","message":"the object has been modified"}'
    assert describe(exc) == "HTTP 409: the object has been modified"
