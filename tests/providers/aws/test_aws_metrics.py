"""Cloud API metrics from botocore's own event hooks: calls, retries and throttles as EC2 answered them."""

from __future__ import annotations

from typing import Any

import pytest
from awsworld import Ec2World, Hooks, ec2_error, spec_for

from cloudadaptor.metrics import Metrics
from cloudadaptor.providers.base import ProviderError


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"provider": "aws", **labels})
    return 0.0 if value is None else value


def _failing(times: int, code: str, status: int) -> Any:
    attempts: list[str] = []

    def hook(**kwargs: Any) -> Any:
        attempts.append(kwargs["event_name"])
        return ec2_error(code, "injected fault", status) if len(attempts) <= times else None

    return hook


async def test_throttled_then_successful_call_counts_one_call_three_retries_three_throttles(aws: Ec2World, hooks: Hooks):
    provider = aws.provider()
    metrics = Metrics("aws")
    provider.cloud_calls.recorder = metrics
    hooks.on(await provider.client(), "before-send.ec2.RunInstances", _failing(3, "RequestLimitExceeded", 503))
    await provider.create_instance(spec_for())
    assert _value(metrics, "cloud_api_adaptor_cloud_api_calls_total", operation="RunInstances", outcome="ok") == 1
    assert _value(metrics, "cloud_api_adaptor_cloud_api_retries_total", operation="RunInstances") == 3
    assert _value(metrics, "cloud_api_adaptor_cloud_api_throttles_total", operation="RunInstances") == 3
    assert _value(metrics, "cloud_api_adaptor_cloud_api_calls_total", operation="DescribeInstances", outcome="ok") >= 1


async def test_call_failing_after_the_retry_budget_counts_as_throttled(aws: Ec2World, hooks: Hooks):
    provider = aws.provider(AWS_MAX_ATTEMPTS="2")
    metrics = Metrics("aws")
    provider.cloud_calls.recorder = metrics
    hooks.on(await provider.client(), "before-send.ec2.RunInstances", _failing(100, "RequestLimitExceeded", 503))
    with pytest.raises(ProviderError):
        await provider.create_instance(spec_for())
    assert _value(metrics, "cloud_api_adaptor_cloud_api_calls_total", operation="RunInstances", outcome="throttled") == 1
    assert _value(metrics, "cloud_api_adaptor_cloud_api_retries_total", operation="RunInstances") == 1
    assert _value(metrics, "cloud_api_adaptor_cloud_api_throttles_total", operation="RunInstances") == 2


async def test_permanent_error_is_counted_by_class_not_by_code(aws: Ec2World, hooks: Hooks):
    provider = aws.provider()
    metrics = Metrics("aws")
    provider.cloud_calls.recorder = metrics
    hooks.on(await provider.client(), "before-send.ec2.RunInstances", _failing(100, "InsufficientInstanceCapacity", 400))
    with pytest.raises(ProviderError):
        await provider.create_instance(spec_for())
    assert _value(metrics, "cloud_api_adaptor_cloud_api_calls_total", operation="RunInstances", outcome="client_error") == 1
    assert _value(metrics, "cloud_api_adaptor_cloud_api_throttles_total", operation="RunInstances") == 0
