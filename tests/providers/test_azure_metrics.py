"""Cloud API metrics from azure-core's pipeline (per-call and per-retry policies), and VM consoles from boot
diagnostics, against the fake ARM endpoint."""

from __future__ import annotations

import pytest

from cloudadaptor.metrics import Metrics
from cloudadaptor.providers.base import InstanceSpec, ProviderError
from fakes.armserver import FakeArm, fast_provider

SANDBOX = "4567abcd" + "f" * 56


def _spec() -> InstanceSpec:
    return InstanceSpec(name="podvm-metrics-4567abcd", sandbox_id=SANDBOX, user_data="#cloud-config\n",
                        client_token=SANDBOX, tags={"peerpods.io/sandbox-id": SANDBOX})


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"provider": "azure", **labels})
    return 0.0 if value is None else value


@pytest.fixture
async def counted(arm_env):
    made = []

    def make(**tuning):
        provider = fast_provider(arm_env, **tuning)
        metrics = Metrics("azure")
        provider.cloud_calls.recorder = metrics
        made.append(provider)
        return provider, metrics

    yield make
    for provider in made:
        await provider.close()


async def test_throttled_put_counts_one_retry_and_one_throttle(counted, arm: FakeArm):
    provider, metrics = counted()
    arm.throttle(1, retry_after="0", method="PUT", kind="virtualMachines")
    instance = await provider.create_instance(_spec())
    assert _value(metrics, "cloud_api_adaptor_cloud_api_calls_total", operation="PUT virtualMachines", outcome="ok") == 1
    assert _value(metrics, "cloud_api_adaptor_cloud_api_retries_total", operation="PUT virtualMachines") == 1
    assert _value(metrics, "cloud_api_adaptor_cloud_api_throttles_total", operation="PUT virtualMachines") == 1
    assert _value(metrics, "cloud_api_adaptor_cloud_api_calls_total", operation="PUT networkInterfaces", outcome="ok") == 1
    await provider.delete_instance(instance.id)
    assert _value(metrics, "cloud_api_adaptor_cloud_api_calls_total", operation="DELETE virtualMachines", outcome="ok") >= 1
    text = metrics.exposition().decode()
    assert SANDBOX[:8] not in text and "podvm-metrics" not in text, "no resource name in any label"


async def test_throttling_beyond_the_budget_counts_a_throttled_call(counted, arm: FakeArm):
    provider, metrics = counted(retry_total=2)
    arm.throttle(10, retry_after="0", method="PUT", kind="virtualMachines")
    with pytest.raises(ProviderError):
        await provider.create_instance(_spec())
    assert _value(metrics, "cloud_api_adaptor_cloud_api_calls_total", operation="PUT virtualMachines", outcome="throttled") == 1
    assert _value(metrics, "cloud_api_adaptor_cloud_api_throttles_total", operation="PUT virtualMachines") == 3
    assert _value(metrics, "cloud_api_adaptor_cloud_api_retries_total", operation="PUT virtualMachines") == 2


# ------------------------------------------------------------------ consoles (boot diagnostics)


async def test_console_is_the_boot_diagnostics_serial_log(counted, arm: FakeArm):
    provider, _ = counted()
    instance = await provider.create_instance(_spec())
    arm.state.consoles["podvm-metrics-4567abcd"] = "[    0.0] Linux version 6.1\nforwarder: listening on 15150\n"
    assert await provider.console_output(instance.id) == arm.state.consoles["podvm-metrics-4567abcd"]
    await provider.delete_instance(instance.id)


async def test_console_with_boot_diagnostics_off_says_not_available_and_why(counted, arm: FakeArm):
    from cloudadaptor.providers.base import ConsoleUnavailable

    provider, _ = counted()
    instance = await provider.create_instance(_spec())
    assert arm.resource(instance.id)["properties"]["diagnosticsProfile"] == {"bootDiagnostics": {"enabled": True}}
    with arm.state.lock:  # an operator turned boot diagnostics off
        arm.state.resources[instance.id.lower()]["properties"]["diagnosticsProfile"]["bootDiagnostics"]["enabled"] = False
    with pytest.raises(ConsoleUnavailable) as err:
        await provider.console_output(instance.id)
    message = str(err.value)
    assert "boot diagnostics of VM podvm-metrics-4567abcd not available" in message and "not enabled" in message, message
    await provider.delete_instance(instance.id)


async def test_console_blob_refused_names_no_sas_signature(counted, arm: FakeArm):
    from cloudadaptor.providers.base import ConsoleUnavailable

    provider, _ = counted()
    instance = await provider.create_instance(_spec())  # no serial log stored: the blob is 404
    with pytest.raises(ConsoleUnavailable) as err:
        await provider.console_output(instance.id)
    assert "404" in str(err.value) and "sig=" not in str(err.value), str(err.value)
    await provider.delete_instance(instance.id)
