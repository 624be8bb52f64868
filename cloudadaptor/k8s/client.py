"""Kubernetes API access: where the client is configured from, and how errors are classified.

``connect(env)`` returns a ``kubernetes_asyncio`` ``ApiClient``:

1. ``KUBECONFIG`` when set (development, tests: a kubeconfig file; its current context),
2. else the in-cluster service account when ``KUBERNETES_SERVICE_HOST`` is set
   (token and CA under /var/run/secrets/kubernetes.io/serviceaccount; the
   bound token is re-read as it rotates),
3. else ``None``: not in a cluster (the local demo, a developer's machine).

``retry_on_conflict`` is the one place a 409 Conflict is handled: the
operation re-reads the object and re-applies its change.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Awaitable, Callable, Mapping, TypeVar

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

from cloudadaptor.retry import Backoff, RetryTimeout, retry_until

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
CONFLICT_ATTEMPTS = 8
_CONFLICT_BACKOFF = Backoff(initial=0.05, factor=2.0, maximum=1.0)


class KubeConfigError(Exception):
    """The kubeconfig or in-cluster configuration could not be loaded."""


async def connect(env: Mapping[str, str], *, service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> k8s.ApiClient | None:
    """An API client from ``KUBECONFIG`` or the in-cluster service account; None outside a cluster.

    In-cluster: ``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``,
    ``token`` and ``ca.crt`` from ``service_account_dir``. Raises
    ``KubeConfigError`` when a configuration is named but unusable (a missing
    kubeconfig file, a service account without a token).
    """
    configuration = k8s.Configuration()
    kubeconfig = (env.get("KUBECONFIG") or "").strip()
    if kubeconfig:
        try:
            await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        except (k8s_config.ConfigException, OSError, ValueError) as exc:
            raise KubeConfigError(f"KUBECONFIG={kubeconfig}: {exc}") from None
        log.info("Kubernetes API %s (from KUBECONFIG)", configuration.host)
        return k8s.ApiClient(configuration)
    if (env.get("KUBERNETES_SERVICE_HOST") or "").strip():
        loader = InClusterConfigLoader(token_filename=str(service_account_dir / "token"),
                                       cert_filename=str(service_account_dir / "ca.crt"), environ=dict(env))
        try:
            loader.load_and_set(configuration)
        except (k8s_config.ConfigException, OSError) as exc:
            raise KubeConfigError(f"in-cluster configuration: {exc}") from None
        log.info("Kubernetes API %s (in-cluster service account)", configuration.host)
        return k8s.ApiClient(configuration)
    return None


def api_client(configuration: k8s.Configuration) -> k8s.ApiClient:
    """An API client for an explicit configuration (tests, embedding)."""
    return k8s.ApiClient(configuration)


# What a call to the API server can be expected to raise: an error answer, or no answer.
# Anything else is a bug in our code and deserves its traceback.
API_ERRORS: tuple[type[BaseException], ...] = (ApiException, aiohttp.ClientError, OSError, TimeoutError)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of an API error, None for anything else."""
    return exc.status if isinstance(exc, ApiException) else None


def is_not_found(exc: BaseException) -> bool:
    return status_of(exc) == 404


def is_conflict(exc: BaseException) -> bool:
    return status_of(exc) == 409


def describe(exc: BaseException) -> str:
    """One line for a log: status and the API server's message when there is one."""
    if isinstance(exc, ApiException):
        message = exc.reason or ""
        try:
            message = json.loads(exc.body or "{}").get("message") or message
        except (ValueError, AttributeError):
            pass
        return f"HTTP {exc.status}: {message}"
    return f"{type(exc).__name__}: {exc}"


async def retry_on_conflict(operation: Callable[[], Awaitable[T]], *, attempts: int = CONFLICT_ATTEMPTS) -> T:
    """Run ``operation`` (which must re-read what it changes) again on each 409 Conflict.

    Other errors propagate at once; after ``attempts`` conflicts the last one does.
    """
    try:
        return await retry_until(None, operation, backoff=_CONFLICT_BACKOFF, retryable=is_conflict,
                                 attempts=attempts, on_retry=_log_conflict)
    except RetryTimeout as exc:
        assert exc.last_error is not None  # only conflicts are retried, so one was recorded
        raise exc.last_error from None


def _log_conflict(exc: BaseException, pause: float) -> None:
    log.debug("conflict, re-reading in %.2fs: %s", pause, describe(exc))
