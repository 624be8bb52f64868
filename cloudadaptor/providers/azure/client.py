"""Credential, the ARM pipeline, the one retry policy, and how blocking calls are awaited.

- Credential: ``ClientSecretCredential`` when ``AZURE_CLIENT_SECRET`` is set,
  otherwise azure-identity's ``DefaultAzureCredential`` as is (workload
  identity, managed identity, ...). A test passes its own ``TokenCredential``.
- One azure-mgmt-core ``ARMPipelineClient`` per provider (``arm.Arm``: the
  ARM calls as REST paths and JSON, see that module for why not the generated
  SDK clients), on ``AZURE_RESOURCE_MANAGER_ENDPOINT`` with that cloud's token
  scope and the policies the generated clients use. Extra CA trust comes from
  the standard ``REQUESTS_CA_BUNDLE``. ``image build azure`` (a one-shot Job)
  also uses the generated ``ComputeManagementClient``/``NetworkManagementClient``:
  built on first use (``AzureClients.compute``/``.network``), never by the daemon.
- Retries: azure-core's ``RetryPolicy`` (429, 408, 5xx and connection errors,
  honouring ``Retry-After``) is the only HTTP retry; ``retry_until`` (the
  adaptor's backoff helper) only retries resource states such as a NIC still
  in use. Errors are classified once here (``is_not_found``, ``is_in_use``).
- Blocking SDK calls run in worker threads (``call``); long-running
  operations are awaited with ``wait`` without holding a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline import policies
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.core.polling import LROPoller
from azure.mgmt.core import ARMPipelineClient
from azure.mgmt.core.policies import (
    ARMAutoResourceProviderRegistrationPolicy, ARMChallengeAuthenticationPolicy, ARMHttpLoggingPolicy,
)

from cloudadaptor import __version__
from cloudadaptor.providers.azure.arm import Arm
from cloudadaptor.providers.azure.config import AzureConfig
from cloudadaptor.providers.telemetry import CloudCalls, outcome_of_status

T = TypeVar("T")

# Errors meaning "a dependent resource is still attached; try again shortly".
IN_USE_CODES = frozenset({
    "NicInUse", "NicReservedForAnotherVm", "InUseNetworkInterfaceCannotBeDeleted",
    "OperationNotAllowed", "DiskAttached", "AnotherOperationInProgress", "RetryableError",
})
MAX_MESSAGE = 300


def make_credential(config: AzureConfig) -> TokenCredential:
    """The credential for ``config``: client secret when set, else the default chain.

    Nothing is fetched here; the first token is requested by the first call.
    """
    if config.client_secret:
        from azure.identity import ClientSecretCredential

        assert config.tenant_id and config.client_id  # from_values guarantees both
        return ClientSecretCredential(config.tenant_id, config.client_id, config.client_secret)
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


@dataclass
class AzureClients:
    """The provider's ARM client (and credential); ``close()`` releases their connections."""

    credential: TokenCredential
    arm: Arm
    scope: str
    options: dict[str, Any]  # the pipeline settings, for the SDK clients ``image build`` asks for
    owns_credential: bool = True  # False: the caller's, left open
    _sdk: dict[str, Any] = field(default_factory=dict)

    @property
    def compute(self) -> Any:  # ComputeManagementClient
        """The generated compute client, for ``image build azure`` only (imported on first use:
        its models cost a daemon ~15 MiB)."""
        if "compute" not in self._sdk:
            from azure.mgmt.compute import ComputeManagementClient

            self._sdk["compute"] = ComputeManagementClient(self.credential, self.arm.subscription_id, **self.options)
        return self._sdk["compute"]

    @property
    def network(self) -> Any:  # NetworkManagementClient
        """The generated network client, for ``image build azure`` only (imported on first use)."""
        if "network" not in self._sdk:
            from azure.mgmt.network import NetworkManagementClient

            self._sdk["network"] = NetworkManagementClient(self.credential, self.arm.subscription_id, **self.options)
        return self._sdk["network"]

    def close(self) -> None:
        """Close the clients (and the credential when it was made here). Blocking."""
        self.arm.close()
        for sdk in self._sdk.values():
            sdk.close()
        close = getattr(self.credential, "close", None)
        if self.owns_credential and callable(close):
            close()


def _pipeline(credential: TokenCredential, options: dict[str, Any]) -> ARMPipelineClient:
    """An ARM pipeline with the policies, in the order, the generated management clients use."""
    scopes = options["credential_scopes"]
    kwargs = {k: v for k, v in options.items()
              if k not in ("base_url", "credential_scopes", "polling_interval", "per_call_policies", "per_retry_policies")}
    kwargs["sdk_moniker"] = f"cloudadaptor/{__version__}"
    redirect = policies.RedirectPolicy(**kwargs)
    chain = [
        policies.RequestIdPolicy(**kwargs),
        policies.HeadersPolicy(**kwargs),
        policies.UserAgentPolicy(**kwargs),
        policies.ProxyPolicy(**kwargs),
        policies.ContentDecodePolicy(**kwargs),
        ARMAutoResourceProviderRegistrationPolicy(),
        redirect,
        policies.RetryPolicy(**kwargs),
        ARMChallengeAuthenticationPolicy(credential, *scopes, **kwargs),
        policies.CustomHookPolicy(**kwargs),
        policies.NetworkTraceLoggingPolicy(**kwargs),
        policies.DistributedTracingPolicy(**kwargs),
        policies.SensitiveHeaderCleanupPolicy(**kwargs),
        ARMHttpLoggingPolicy(**kwargs),
    ]
    return ARMPipelineClient(base_url=options["base_url"], policies=chain,
                             per_call_policies=options.get("per_call_policies", []),
                             per_retry_policies=options.get("per_retry_policies", []), **kwargs)


def build_clients(config: AzureConfig, credential: TokenCredential | None = None,
                  calls: CloudCalls | None = None) -> AzureClients:
    """Clients bound to ``config``'s subscription and endpoint, with the retry policy configured.

    With ``calls``, azure-core's pipeline reports every call and throttled attempt there (``CallPolicy``)."""
    _quiet_sdk_logs()
    owns_credential = credential is None
    credential = credential or make_credential(config)
    options: dict[str, Any] = {
        "base_url": config.arm_endpoint,
        "credential_scopes": [config.credential_scope],
        "polling_interval": config.polling_interval,
        "retry_total": config.retry_total,
        "retry_backoff_factor": config.retry_backoff_factor,
        "retry_backoff_max": config.retry_backoff_max,
        "connection_timeout": 30,
        "read_timeout": 120,
    }
    if calls is not None:
        options["per_call_policies"] = [CallPolicy(calls)]
        options["per_retry_policies"] = [AttemptPolicy(calls)]
    arm = Arm(_pipeline(credential, options), config.subscription_id, config.polling_interval)
    return AzureClients(credential=credential, arm=arm, scope=config.credential_scope, options=options,
                        owns_credential=owns_credential)


# ------------------------------------------------------------------ metrics

_ATTEMPTS = "cloudadaptor.attempts"


def operation_name(request: PipelineRequest[Any]) -> str:
    """``METHOD resourceType[/childType]`` from an ARM URL: names a kind of call, never a resource."""
    path = request.http_request.url.split("?", 1)[0]
    parts = [p for p in path.split("/") if p]
    lowered = [p.lower() for p in parts]
    if "providers" in lowered:
        start = len(lowered) - 1 - lowered[::-1].index("providers") + 2  # skip "providers/<Namespace>"
        kind = "/".join(parts[start::2]) or "provider"
    elif "resourcegroups" in lowered:
        kind = "resourceGroups"
    else:
        kind = parts[0] if parts else "root"
    return f"{request.http_request.method} {kind}"


class CallPolicy(SansIOHTTPPolicy[Any, Any]):
    """Per call (outside the retry policy): one report per call, with its outcome and retries."""

    def __init__(self, calls: CloudCalls) -> None:
        self._calls = calls

    def on_request(self, request: PipelineRequest[Any]) -> None:
        request.context[_ATTEMPTS] = 0

    def on_response(self, request: PipelineRequest[Any], response: PipelineResponse[Any, Any]) -> None:
        retries = max(0, int(request.context.get(_ATTEMPTS, 1)) - 1)
        self._calls.call(operation_name(request), outcome_of_status(response.http_response.status_code), retries)

    def on_exception(self, request: PipelineRequest[Any]) -> None:
        retries = max(0, int(request.context.get(_ATTEMPTS, 1)) - 1)
        self._calls.call(operation_name(request), "connection_error", retries)


class AttemptPolicy(SansIOHTTPPolicy[Any, Any]):
    """Per attempt (inside the retry policy): counts attempts and throttled (429) answers."""

    def __init__(self, calls: CloudCalls) -> None:
        self._calls = calls

    def on_request(self, request: PipelineRequest[Any]) -> None:
        request.context[_ATTEMPTS] = int(request.context.get(_ATTEMPTS, 0)) + 1

    def on_response(self, request: PipelineRequest[Any], response: PipelineResponse[Any, Any]) -> None:
        if response.http_response.status_code == 429:
            self._calls.throttled(operation_name(request))


def _quiet_sdk_logs() -> None:
    """azure-core logs every request at INFO; keep that for LOG_LEVEL=debug only."""
    for name in ("azure.core.pipeline.policies.http_logging_policy", "azure.identity"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET and not logging.getLogger().isEnabledFor(logging.DEBUG):
            logger.setLevel(logging.WARNING)


# ------------------------------------------------------------------ awaiting


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run the blocking ``fn(*args, **kwargs)`` in a worker thread and return its result.

    A request in flight cannot be interrupted: if the caller is cancelled, this
    first lets it finish, so a cleanup that follows sees what it created.
    """
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


async def wait(poller: LROPoller[T]) -> T:
    """The result of a long-running operation, polled by azure-core in its own thread.

    Holds no worker thread while waiting and is cancellable at once (the
    operation itself goes on in Azure). Raises what ``poller.result()`` raises
    (``HttpResponseError`` for a failed operation).
    """
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()

    def wake(_: object) -> None:  # runs in the poller's thread
        try:
            loop.call_soon_threadsafe(finished.set)
        except RuntimeError:
            pass  # the loop is closed: nobody waits for this operation any more

    poller.add_done_callback(wake)
    if not poller.done():  # checked after registering: no wake-up can be lost
        await finished.wait()
    return poller.result()


async def begin(fn: Callable[..., LROPoller[T]], *args: Any, **kwargs: Any) -> T:
    """Start a long-running operation (``begin_*``) and await its result."""
    poller = await call(fn, *args, **kwargs)
    return await wait(poller)


# -------------------------------------------------------------------- errors


def text(value: Any) -> str:
    """An SDK enum member (``SecurityRuleDirection.INBOUND``) or plain string as its wire text ("Inbound")."""
    return str(getattr(value, "value", value) if value is not None else "")


def error_code(exc: BaseException) -> str:
    """ARM's error code (``ResourceNotFound``, ``NicInUse``...) or "" when there is none."""
    error = getattr(exc, "error", None)
    return str(getattr(error, "code", "") or "")


def status_code(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None) if isinstance(exc, HttpResponseError) else None


def is_not_found(exc: BaseException) -> bool:
    """The resource (or its resource group) does not exist."""
    return isinstance(exc, ResourceNotFoundError) or status_code(exc) == 404


def is_in_use(exc: BaseException) -> bool:
    """A delete refused because the resource is still attached or busy (worth retrying)."""
    return isinstance(exc, HttpResponseError) and status_code(exc) in (400, 409) and error_code(exc) in IN_USE_CODES


def describe(exc: BaseException) -> str:
    """One line for logs and errors: ``Code (status): message``. Never contains credentials."""
    if isinstance(exc, HttpResponseError):
        error = getattr(exc, "error", None)
        message = str(getattr(error, "message", "") or exc.reason or exc.message or "")
        code = error_code(exc) or "Error"
        text = f"{code} ({exc.status_code}): {message}" if exc.status_code else f"{code}: {message}"
    elif isinstance(exc, AzureError):
        text = f"{type(exc).__name__}: {exc.message}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."
