"""The EC2 client and the one way AWS errors are classified and shown.

Retries are botocore's (``standard`` or ``adaptive`` mode): throttling
(RequestLimitExceeded, Throttling...), 5xx and connection errors are retried
with exponential backoff and jitter inside each call, up to
``AWS_MAX_ATTEMPTS``. Nothing above retries again; an error that reaches
our code is permanent for that call and becomes a one-line message.

Endpoints are boto3's business: ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_EC2`` (how tests reach moto) are never overridden.

The daemon's client is built from slim model data (``slimmodel``: the
operations we call, ~2 MiB instead of ~25 MiB); the operator commands
(``image build aws``, ``aws open-ports``) use botocore's full model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import botocore.config
import botocore.session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, WaiterError

from cloudadaptor import __version__
from cloudadaptor.providers.aws import slimmodel
from cloudadaptor.providers.aws.config import AwsConfig
from cloudadaptor.providers.telemetry import CloudCalls, outcome_of_status

# Codes that mean "the credentials (or their permissions) are the problem".
AUTH_CODES = frozenset({
    "AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
    "ExpiredToken", "RequestExpired", "AccessDenied", "UnrecognizedClientException",
    "OptInRequired", "Blocked",
})
INSTANCE_GONE_CODES = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InstanceLimitExceeded", "VcpuLimitExceeded",
    "InsufficientFreeAddressesInSubnet", "MaxSpotInstanceCountExceeded",
})



def _quiet_sdk_loggers() -> None:
    """botocore logs request headers (the access key id) at debug level: keep it at info."""
    for name in ("botocore", "boto3", "urllib3"):
        logger = logging.getLogger(name)
        if logger.level < logging.INFO:
            logger.setLevel(logging.INFO)


def make_ec2_client(config: AwsConfig, calls: CloudCalls | None = None, *, model_cache: Path | None = None) -> Any:
    """A thread-safe EC2 client for ``config.region`` with botocore retries.

    Static credentials when configured, else botocore's default chain (the one boto3
    uses). A botocore session, not boto3's: boto3 adds only its resource layer, which
    we do not use, at about 2 MiB of the daemon's memory (issue 16). Builds a
    fresh session (sessions are not thread-safe; clients are). With ``calls``,
    every API call, retry and throttle is reported there (``instrument``).
    With ``model_cache``, the client knows only ``slimmodel.EC2_OPERATIONS``
    (its data made or reused there; botocore's full model if that fails).
    """
    _quiet_sdk_loggers()
    creds = config.credentials
    core = botocore.session.get_session()
    if model_cache is not None:
        data_path = core.get_config_variable("data_path")
        slim_dir = slimmodel.slim_model_dir(model_cache, data_path)
        if slim_dir is not None:
            core.register_component("data_loader", slimmodel.SlimLoader(slim_dir, data_path))
    if creds.access_key_id is not None:
        core.set_credentials(creds.access_key_id, creds.secret_access_key, creds.session_token)
    boto_config = botocore.config.Config(
        # total_max_attempts counts the first try, like AWS_MAX_ATTEMPTS does.
        retries={"mode": config.retry_mode, "total_max_attempts": config.max_attempts},
        connect_timeout=10,
        read_timeout=60,
        user_agent_extra=f"cloud-api-adaptor/{__version__}",
    )
    client = core.create_client("ec2", region_name=config.region, config=boto_config)
    if calls is not None:
        instrument(client, calls)
    return client


# botocore's own list of throttling error codes (standard retry mode), plus EC2's.
THROTTLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "RequestThrottled", "SlowDown",
    "EC2ThrottledException", "BandwidthLimitExceeded", "PriorRequestNotComplete",
})


def instrument(client: Any, calls: CloudCalls) -> None:
    """Report ``client``'s calls through botocore's event hooks, not by wrapping calls.

    ``after-call`` fires once per operation (retries included in its
    ``RetryAttempts``), ``after-call-error`` when no response came at all, and
    ``needs-retry`` after every attempt (where throttled attempts are seen).
    """
    prefix = client.meta.service_model.service_id.hyphenize()

    def after_call(http_response: Any, parsed: dict[str, Any], model: Any, **_: Any) -> None:
        code = str(parsed.get("Error", {}).get("Code", ""))
        retries = int(parsed.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)
        outcome = outcome_of_status(http_response.status_code, throttled=code in THROTTLE_CODES, auth=code in AUTH_CODES)
        if code in INSTANCE_GONE_CODES:
            outcome = "not_found"
        calls.call(model.name, outcome, retries)

    def after_call_error(event_name: str, **_: Any) -> None:
        calls.call(event_name.rsplit(".", 1)[-1], "connection_error")

    def needs_retry(response: Any, operation: Any, **_: Any) -> None:
        if response is not None and str(response[1].get("Error", {}).get("Code", "")) in THROTTLE_CODES:
            calls.throttled(operation.name)

    client.meta.events.register(f"after-call.{prefix}", after_call)
    client.meta.events.register(f"after-call-error.{prefix}", after_call_error)
    client.meta.events.register(f"needs-retry.{prefix}", needs_retry)


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ``ClientError`` ("" for anything else)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, NoCredentialsError) or error_code(exc) in AUTH_CODES


def describe(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """One line for an AWS failure: code and message, never a secret."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        text = f"{err.get('Code', 'Error')}: {err.get('Message', '')}".rstrip(": ")
    elif isinstance(exc, NoCredentialsError):
        text = "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or use an instance profile or IRSA)"
    elif isinstance(exc, WaiterError):
        text = f"waiting failed: {exc.last_response.get('Error', {}).get('Message') or exc}"
    elif isinstance(exc, BotoCoreError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    for secret in secrets:
        text = text.replace(secret, "<hidden>")
    return text
