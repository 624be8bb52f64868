"""A peer pod's registry credentials: its imagePullSecrets and its service account's, merged.

``PullSecretReader`` implements the lifecycle's ``PodCredentials`` seam
(``cloudadaptor.adaptor.hooks``): for a pod it reads the pod, its service
account and the named secrets in the pod's namespace (RBAC: get on pods,
serviceaccounts and secrets), keeps only ``kubernetes.io/dockerconfigjson``
and ``kubernetes.io/dockercfg`` secrets, and merges their registries into one
auth.json document (``{"auths": {registry: entry}}``), the format the pod VM's
image pull reads. Pod secrets come first, then the service account's; the
first secret naming a registry wins, as the kubelet's keyring does.

Never raises and never blocks longer than ``timeout``: an unreachable API, a
missing or malformed secret is one warning naming the pod or the secret and
what is wrong — never a credential, never secret data.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from typing import Any

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from cloudadaptor.k8s.client import API_ERRORS, describe

log = logging.getLogger(__name__)

DOCKERCONFIGJSON = "kubernetes.io/dockerconfigjson"
DOCKERCFG = "kubernetes.io/dockercfg"
# Secret type -> the data key holding the document, and whether its registries sit under "auths".
SECRET_FORMATS = {DOCKERCONFIGJSON: (".dockerconfigjson", True), DOCKERCFG: (".dockercfg", False)}
DEFAULT_TIMEOUT = 10.0


class MalformedSecret(ValueError):
    """A registry secret whose data cannot be used; the message says what is wrong, never the data."""


def registries_of(secret_type: str | None, data: dict[str, str] | None) -> dict[str, Any]:
    """{registry: auth entry} from one secret's data (values base64, as the API returns them).

    Secrets of other types give {}; unusable data raises ``MalformedSecret``."""
    if secret_type not in SECRET_FORMATS:
        return {}
    key, wrapped = SECRET_FORMATS[secret_type]
    encoded = (data or {}).get(key)
    if not encoded:
        raise MalformedSecret(f"has no {key} data")
    try:
        document = json.loads(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError):
        raise MalformedSecret(f"{key} is not base64 of a JSON document") from None
    registries = document.get("auths") if wrapped and isinstance(document, dict) else document
    if not isinstance(registries, dict):
        raise MalformedSecret(f"{key} has no {'auths object' if wrapped else 'registry object'}")
    bad = [name for name, entry in registries.items() if not isinstance(entry, dict)]
    if bad:
        raise MalformedSecret(f"{key}: the entry for registry {bad[0][:100]!r} is not an object")
    return registries


class PullSecretReader:
    """``PodCredentials`` over the Kubernetes API (see the module docstring)."""

    def __init__(self, api: k8s.ApiClient, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.core = k8s.CoreV1Api(api)
        self.timeout = timeout

    async def registry_auth(self, pod_namespace: str, pod_name: str) -> bytes | None:
        if not pod_namespace or not pod_name:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                auths = await self._merged(pod_namespace, pod_name)
        except TimeoutError:
            log.warning("pod %s/%s: registry credentials left out: the API did not answer within %gs",
                        pod_namespace, pod_name, self.timeout)
            return None
        if not auths:
            return None
        return json.dumps({"auths": auths}, sort_keys=True).encode()

    async def _secret_names(self, namespace: str, pod_name: str) -> list[str]:
        try:
            pod = await self.core.read_namespaced_pod(pod_name, namespace)
        except API_ERRORS as exc:
            log.warning("pod %s/%s: cannot read the pod for its imagePullSecrets: %s", namespace, pod_name, describe(exc))
            return []
        names = [ref.name for ref in (pod.spec.image_pull_secrets or []) if ref.name]
        account = pod.spec.service_account_name or "default"
        try:
            sa = await self.core.read_namespaced_service_account(account, namespace)
        except API_ERRORS as exc:
            if not (isinstance(exc, ApiException) and exc.status == 404):
                log.warning("pod %s/%s: cannot read service account %s for its imagePullSecrets: %s",
                            namespace, pod_name, account, describe(exc))
            return names
        names += [ref.name for ref in (sa.image_pull_secrets or []) if ref.name]
        return list(dict.fromkeys(names))  # each secret once, pod's first

    async def _merged(self, namespace: str, pod_name: str) -> dict[str, Any]:
        auths: dict[str, Any] = {}
        for name in await self._secret_names(namespace, pod_name):
            try:
                secret = await self.core.read_namespaced_secret(name, namespace)
            except API_ERRORS as exc:
                log.warning("pod %s/%s: cannot read pull secret %s/%s: %s", namespace, pod_name, namespace, name,
                            _status(exc))
                continue
            try:
                registries = registries_of(secret.type, secret.data)
            except MalformedSecret as exc:
                log.warning("pod %s/%s: pull secret %s/%s ignored: %s", namespace, pod_name, namespace, name, exc)
                continue
            for registry, entry in registries.items():
                auths.setdefault(registry, entry)
        return auths


def _status(exc: BaseException) -> str:
    """An API error as its status only: a secret's error body is never echoed."""
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return describe(exc)
