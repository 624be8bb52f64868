"""Metrics recorded by the lifecycle and the service: counts match what ran, promtool accepts
the exposition, and the series count stays flat however many pods come and go."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloudadaptor.adaptor.lifecycle import LifecycleError
from cloudadaptor.adaptor.proxy import AgentProxy
from cloudadaptor.adaptor.service import HypervisorService
from cloudadaptor.dev.shim import shim_annotations
from cloudadaptor.metrics import Metrics
from cloudadaptor.protocols import hypervisor_pb2 as hv


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the text exposition (what a scraper sees), keyed by name and sorted labels."""
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sid(n: int) -> str:
    return f"{n:064x}"


def _metrics_for(lifecycle_store) -> Metrics:
    return Metrics("fake", lambda: [(s.state.value, bool(s.instance_id)) for s in lifecycle_store.all()])


async def _run_pods(service: HypervisorService, netns_file: str, ids: range) -> None:
    for n in ids:
        sid = _sid(n)
        await service.create_vm(hv.CreateVMRequest(id=sid, annotations=shim_annotations(f"p{n}", "ns"),
                                                    networkNamespacePath=netns_file))
        await service.start_vm(hv.StartVMRequest(id=sid))
        await service.stop_vm(hv.StopVMRequest(id=sid))


def _counted_service(lifecycle) -> HypervisorService:
    service = HypervisorService(lifecycle)
    counted = {m.name: m.call for m in service.methods()}
    service.create_vm, service.start_vm, service.stop_vm = counted["CreateVM"], counted["StartVM"], counted["StopVM"]
    return service


async def test_phase_histograms_count_the_pods_started(lifecycle_factory, agent, netns_file):
    lifecycle = lifecycle_factory(agent_port=agent.port)
    metrics = _metrics_for(lifecycle.store)
    lifecycle.recorder = metrics
    service = _counted_service(lifecycle)
    await _run_pods(service, netns_file, range(1, 4))
    # one more that starts and stays running
    await service.create_vm(hv.CreateVMRequest(id=_sid(9), annotations=shim_annotations("p9", "ns"),
                                               networkNamespacePath=netns_file))
    await service.start_vm(hv.StartVMRequest(id=_sid(9)))
    samples = _samples(metrics)
    for phase in ("create_instance", "instance_running", "tunnel_up", "agent_ready"):
        key = ("cloud_api_adaptor_startvm_phase_seconds_count", (("phase", phase), ("provider", "fake")))
        assert samples[key] == 4, f"{phase}: expected 4 observations, got {samples[key]}"
    assert samples[("cloud_api_adaptor_startvm_seconds_count", (("provider", "fake"), ("result", "ok")))] == 4
    assert samples[("cloud_api_adaptor_hypervisor_calls_total", (("code", "OK"), ("method", "StartVM")))] == 4
    assert samples[("cloud_api_adaptor_hypervisor_calls_total", (("code", "OK"), ("method", "StopVM")))] == 3
    assert samples[("cloud_api_adaptor_vms_deleted_total", (("cause", "stop"), ("provider", "fake")))] == 3
    assert samples[("cloud_api_adaptor_sandboxes", (("state", "running"),))] == 1
    assert samples[("cloud_api_adaptor_pod_vms", (("provider", "fake"),))] == 1


async def test_failed_start_counts_as_failed_with_its_code(lifecycle_factory, provider, netns_file):
    lifecycle = lifecycle_factory(agent_port=1)
    metrics = _metrics_for(lifecycle.store)
    lifecycle.recorder = metrics
    service = _counted_service(lifecycle)
    provider.fail_create = "capacity: no hosts"
    await service.create_vm(hv.CreateVMRequest(id=_sid(1), annotations=shim_annotations("p", "ns"),
                                               networkNamespacePath=netns_file))
    with pytest.raises(LifecycleError):
        await service.start_vm(hv.StartVMRequest(id=_sid(1)))
    samples = _samples(metrics)
    assert samples[("cloud_api_adaptor_startvm_seconds_count", (("provider", "fake"), ("result", "failed")))] == 1
    assert samples[("cloud_api_adaptor_hypervisor_calls_total", (("code", "UNAVAILABLE"), ("method", "StartVM")))] == 1
    assert samples[("cloud_api_adaptor_sandboxes", (("state", "failed"),))] == 1


async def test_proxy_counts_connections_bytes_and_dials(lifecycle_factory, agent, netns_file):
    from cloudadaptor.protocols import health_pb2
    from cloudadaptor.ttrpc.client import Client

    holder: list[Metrics] = []

    def factory(path, endpoint):
        return AgentProxy(path, endpoint, recorder=holder[0])

    lifecycle = lifecycle_factory(agent_port=agent.port, proxy_factory=factory)
    holder.append(_metrics_for(lifecycle.store))
    lifecycle.recorder = holder[0]
    socket_path = await lifecycle.create(_sid(5), shim_annotations("p", "ns"), netns_file)
    await lifecycle.start(_sid(5))
    client = await Client.connect_unix(socket_path)
    try:
        reply = await client.call_message("grpc.Health", "Check", health_pb2.CheckRequest(),
                                          health_pb2.HealthCheckResponse, timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        samples = _samples(holder[0])
        assert samples[("cloud_api_adaptor_agent_proxy_connections", ())] == 1
    finally:
        await client.close()
    await lifecycle.stop(_sid(5))
    samples = _samples(holder[0])
    assert samples[("cloud_api_adaptor_agent_proxy_connections", ())] == 0
    assert samples[("cloud_api_adaptor_agent_proxy_bytes_total", (("direction", "to_vm"),))] > 0
    assert samples[("cloud_api_adaptor_agent_proxy_bytes_total", (("direction", "from_vm"),))] > 0
    assert samples[("cloud_api_adaptor_agent_proxy_dials_total", (("result", "ok"),))] >= 2  # readiness + the pipe


async def test_thousand_pods_leave_the_series_count_flat(lifecycle_factory, agent, netns_file):
    lifecycle = lifecycle_factory(agent_port=agent.port)
    metrics = _metrics_for(lifecycle.store)
    lifecycle.recorder = metrics
    service = _counted_service(lifecycle)
    await _run_pods(service, netns_file, range(1, 11))
    after_ten = metrics.series_count()
    await _run_pods(service, netns_file, range(11, 1001))
    assert metrics.series_count() == after_ten, "series grew with the number of pods: a label holds a per-pod value"
    samples = _samples(metrics)
    assert samples[("cloud_api_adaptor_startvm_seconds_count", (("provider", "fake"), ("result", "ok")))] == 1000


def test_unknown_label_values_fold_into_other():
    metrics = Metrics("fake")
    for n in range(500):
        metrics.phase_done(f"phase-{n}", 1.0)
        metrics.cloud_call("fake", f"Operation{n}", "ok")
        metrics.vms_deleted(f"cause-{n}")
    samples = _samples(metrics)
    assert samples[("cloud_api_adaptor_startvm_phase_seconds_count", (("phase", "other"), ("provider", "fake")))] == 500
    operations = {dict(k[1]).get("operation") for k in samples if k[0] == "cloud_api_adaptor_cloud_api_calls_total"}
    assert len(operations) == 101 and "other" in operations  # MAX_OPERATIONS names, then "other"


async def test_promtool_accepts_the_exposition(lifecycle_factory, agent, netns_file):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: `make test` installs the Debian package prometheus")
    lifecycle = lifecycle_factory(agent_port=agent.port)
    metrics = _metrics_for(lifecycle.store)
    lifecycle.recorder = metrics
    metrics.cloud_call("fake", "RunInstances", "ok")
    metrics.cloud_call("fake", "RunInstances", "throttled", retries=2)
    metrics.cloud_throttled("fake", "RunInstances")
    await _run_pods(_counted_service(lifecycle), netns_file, range(1, 3))
    result = subprocess.run([promtool, "check", "metrics"], input=metrics.exposition(), capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_the_pool_gauge_counts_pool_vms_by_state_and_is_absent_without_a_pool():
    states: list[str] | None = None
    metrics = Metrics("fake", None, lambda: states)
    assert b"cloud_api_adaptor_pool_vms" not in metrics.exposition(), "no pool, no series"
    states = ["ready", "ready", "booting"]
    text = metrics.exposition().decode()
    assert 'cloud_api_adaptor_pool_vms{provider="fake",state="ready"} 2.0' in text
    assert 'cloud_api_adaptor_pool_vms{provider="fake",state="booting"} 1.0' in text
    assert 'cloud_api_adaptor_pool_vms{provider="fake",state="deleting"} 0.0' in text
