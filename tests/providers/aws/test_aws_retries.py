"""Cloud faults: throttling and 5xx are retried by botocore; what is left is one clear error."""

from __future__ import annotations

from typing import Any

import pytest
from awsworld import Ec2World, Hooks, ec2_error, spec_for

from cloudadaptor.providers import base
from cloudadaptor.providers.base import ProviderError


def _failing(times: int, code: str, status: int, attempts: list[str]) -> Any:
    """A before-send hook answering the first ``times`` attempts with an EC2 error."""

    def hook(**kwargs: Any) -> Any:
        attempts.append(kwargs["event_name"])
        if len(attempts) <= times:
            return ec2_error(code, "injected fault", status)
        return None

    return hook


async def test_throttled_run_instances_is_retried_and_makes_exactly_one_instance(aws: Ec2World, hooks: Hooks):
    provider = aws.provider()
    attempts: list[str] = []
    hooks.on(await provider.client(), "before-send.ec2.RunInstances",
             _failing(3, "RequestLimitExceeded", 503, attempts))
    instance = await provider.create_instance(spec_for())
    assert len(attempts) == 4, "3 throttled attempts, then the one that went through"
    assert aws.alive(**{base.TAG_SANDBOX: "a" * 64}) == [instance.id]


async def test_server_errors_on_terminate_are_retried(aws: Ec2World, hooks: Hooks):
    provider = aws.provider()
    instance = await provider.create_instance(spec_for())
    attempts: list[str] = []
    hooks.on(await provider.client(), "before-send.ec2.TerminateInstances",
             _failing(2, "InternalError", 500, attempts))
    await provider.delete_instance(instance.id)
    assert len(attempts) == 3
    assert aws.alive(**{base.TAG_SANDBOX: "a" * 64}) == []


async def test_throttling_beyond_max_attempts_is_one_provider_error_and_no_instance(aws: Ec2World, hooks: Hooks):
    provider = aws.provider(AWS_MAX_ATTEMPTS="2")
    attempts: list[str] = []
    hooks.on(await provider.client(), "before-send.ec2.RunInstances",
             _failing(100, "RequestLimitExceeded", 503, attempts))
    with pytest.raises(ProviderError) as err:
        await provider.create_instance(spec_for())
    assert len(attempts) == 2, "AWS_MAX_ATTEMPTS counts every attempt"
    assert "RequestLimitExceeded" in str(err.value), str(err.value)
    assert aws.instances() == []


async def test_permanent_errors_are_not_retried(aws: Ec2World, hooks: Hooks):
    provider = aws.provider()
    attempts: list[str] = []
    hooks.on(await provider.client(), "before-send.ec2.RunInstances",
             _failing(100, "InsufficientInstanceCapacity", 400, attempts))
    with pytest.raises(ProviderError, match="InsufficientInstanceCapacity"):
        await provider.create_instance(spec_for())
    assert len(attempts) == 1
