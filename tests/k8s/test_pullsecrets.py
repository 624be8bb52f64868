"""A peer pod's registry credentials read from the local Kubernetes API endpoint (kubernetes_asyncio, real HTTP)."""

from __future__ import annotations

import base64
import json
import logging

from cloudadaptor.adaptor.hooks import PodCredentials
from cloudadaptor.k8s.pullsecrets import PullSecretReader
from fakes.kubeapi import PODS, SECRETS, SERVICEACCOUNTS

_IS_CREDENTIALS: type[PodCredentials] = PullSecretReader  # checked by mypy in test_lint
PASSWORD = "s3cr3t-pa55"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def pod_with_secrets(name: str, secrets: list[str], account: str = "default", namespace: str = "default") -> dict:
    spec: dict = {"containers": [{"name": "app", "image": "registry.one.example/app"}], "serviceAccountName": account}
    if secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in secrets]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def dockerconfigjson(name: str, registry: str, namespace: str = "default") -> dict:
    auth = b64(f"robot:{PASSWORD}")
    body = json.dumps({"auths": {registry: {"auth": auth}}})
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": b64(body)}}


def service_account(name: str, secrets: list[str], namespace: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace},
            "imagePullSecrets": [{"name": s} for s in secrets]}


async def test_pod_and_service_account_secrets_merge_into_one_auth_json(kubeapi, api, caplog):
    kubeapi.seed(PODS, pod_with_secrets("web", ["pod-pull"], account="builder"))
    kubeapi.seed(SERVICEACCOUNTS, service_account("builder", ["sa-pull"]))
    kubeapi.seed(SECRETS, dockerconfigjson("pod-pull", "registry.one.example"))
    kubeapi.seed(SECRETS, dockerconfigjson("sa-pull", "registry.two.example:5000"))
    with caplog.at_level(logging.DEBUG):
        auth = await PullSecretReader(api).registry_auth("default", "web")
    assert auth is not None
    assert set(json.loads(auth)["auths"]) == {"registry.one.example", "registry.two.example:5000"}
    assert PASSWORD not in caplog.text and b64(f"robot:{PASSWORD}") not in caplog.text


async def test_legacy_dockercfg_and_other_secret_types(kubeapi, api):
    kubeapi.seed(PODS, pod_with_secrets("web", ["legacy", "opaque"]))
    kubeapi.seed(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "legacy", "namespace": "default"},
                           "type": "kubernetes.io/dockercfg",
                           "data": {".dockercfg": b64(json.dumps({"old.example": {"auth": b64("u:p")}}))}})
    kubeapi.seed(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "opaque", "namespace": "default"},
                           "type": "Opaque", "data": {"password": b64(PASSWORD)}})
    auth = await PullSecretReader(api).registry_auth("default", "web")
    assert auth is not None and json.loads(auth) == {"auths": {"old.example": {"auth": b64("u:p")}}}


async def test_a_pod_without_secrets_gets_nothing(kubeapi, api):
    kubeapi.seed(PODS, pod_with_secrets("web", []))
    assert await PullSecretReader(api).registry_auth("default", "web") is None


async def test_missing_and_malformed_secrets_are_warnings_naming_the_secret_never_its_content(kubeapi, api, caplog):
    kubeapi.seed(PODS, pod_with_secrets("web", ["gone", "garbled", "good"]))
    garbled = dockerconfigjson("garbled", "x.example")
    garbled["data"][".dockerconfigjson"] = b64("{not json " + PASSWORD)
    kubeapi.seed(SECRETS, garbled)
    kubeapi.seed(SECRETS, dockerconfigjson("good", "registry.ok.example"))
    with caplog.at_level(logging.WARNING):
        auth = await PullSecretReader(api).registry_auth("default", "web")
    assert auth is not None and set(json.loads(auth)["auths"]) == {"registry.ok.example"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("default/gone" in w and "404" in w for w in warnings), warnings
    assert any("default/garbled" in w and "not base64 of a JSON document" in w for w in warnings), warnings
    assert PASSWORD not in caplog.text


async def test_an_unreadable_pod_or_unreachable_api_gives_nothing_and_never_raises(kubeapi, api, caplog):
    with caplog.at_level(logging.WARNING):
        assert await PullSecretReader(api).registry_auth("default", "absent") is None
    assert "pod default/absent: cannot read the pod" in caplog.text
    kubeapi.fail("GET", "/api/v1/namespaces/default/pods/web$", 503, times=1)
    kubeapi.seed(PODS, pod_with_secrets("web", []))
    assert await PullSecretReader(api).registry_auth("default", "web") is None
    assert await PullSecretReader(api).registry_auth("", "") is None
