"""Prometheus metrics of the worker daemon: names, help texts, labels, one registry per daemon.

``Metrics`` implements the lifecycle's ``LifecycleRecorder`` (phase timings,
call results, deletions, the agent proxy) and the providers'
``CloudCallRecorder`` (API calls, retries, throttles from the SDKs' own hooks);
``cloudadaptor.adaptor.daemon`` wires it in, so the lifecycle never imports an
exporter library. Each daemon has its own ``CollectorRegistry`` (never the
global one), so tests do not share series.

Cardinality is bounded by construction: every label value is checked against
a fixed set (or capped, for cloud operation names) and anything else is
counted as ``other``. No label ever holds a pod name or a sandbox id.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cloudadaptor import __version__
from cloudadaptor.providers.telemetry import OUTCOMES

PREFIX = "cloud_api_adaptor"
# 0.1 s (a loopback VM) to 600 s (the shim's StartVM deadline).
START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 450.0, 600.0)
PHASES = ("create_instance", "instance_running", "tunnel_up", "agent_ready")
METHODS = ("Version", "CreateVM", "StartVM", "StopVM", "GetInfo")
DELETE_CAUSES = ("stop", "rollback", "recovery", "orphan_sweep")
DIRECTIONS = ("to_vm", "from_vm")
SANDBOX_STATES = ("created", "starting", "running", "stopping", "failed")
RENEWAL_RESULTS = ("ok", "failed", "unsupported")
MAX_OPERATIONS = 100  # distinct cloud operation names kept; the rest count as "other"
OTHER = "other"

# (state, has a VM) of every sandbox the store holds, read at scrape time.
SandboxSource = Callable[[], Iterable[tuple[str, bool]]]
# The state of every warm-pool VM (booting, ready, deleting), read at scrape time; None: no pool.
PoolSource = Callable[[], Iterable[str] | None]
POOL_STATES = ("booting", "ready", "deleting")


def _one_of(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


class _SandboxCollector(Collector):
    """Sandboxes by state and VMs owned by this node, read from the store when scraped (never stale)."""

    def __init__(self, source: SandboxSource, provider: str) -> None:
        self._source = source
        self._provider = provider

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = dict.fromkeys(SANDBOX_STATES, 0)
        vms = 0
        for state, has_vm in self._source():
            key = _one_of(state, SANDBOX_STATES)
            counts[key] = counts.get(key, 0) + 1
            vms += has_vm
        by_state = GaugeMetricFamily(f"{PREFIX}_sandboxes", "Sandboxes recorded on this node, by state.", labels=["state"])
        for state, count in counts.items():
            by_state.add_metric([state], count)
        yield by_state
        owned = GaugeMetricFamily(f"{PREFIX}_pod_vms", "Pod VMs this node owns (sandboxes with an instance).",
                                  labels=["provider"])
        owned.add_metric([self._provider], vms)
        yield owned

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # collected at scrape time only (describe() must not read the store)


class _PoolCollector(Collector):
    """Warm-pool VMs by state, read from the store when scraped; absent while there is no pool."""

    def __init__(self, source: PoolSource, provider: str) -> None:
        self._source = source
        self._provider = provider

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = self._source()
        if states is None:
            return
        counts = dict.fromkeys(POOL_STATES, 0)
        for state in states:
            key = _one_of(state, POOL_STATES)
            counts[key] = counts.get(key, 0) + 1
        pool = GaugeMetricFamily(f"{PREFIX}_pool_vms", "Warm-pool VMs of this node, by state.", labels=["provider", "state"])
        for state, count in counts.items():
            pool.add_metric([self._provider, state], count)
        yield pool

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class Metrics:
    """The daemon's metrics and their registry (``exposition()`` is the /metrics body)."""

    def __init__(self, provider: str, sandboxes: SandboxSource | None = None, pool: PoolSource | None = None) -> None:
        self.provider = provider
        self.registry = CollectorRegistry()
        reg = self.registry
        Gauge(f"{PREFIX}_build_info", "Version of the running adaptor (always 1).", ["version"],
              registry=reg).labels(__version__).set(1)
        self.phase = Histogram(f"{PREFIX}_startvm_phase_seconds",
                               "Duration of each StartVM phase that completed: create_instance (until the cloud "
                               "accepted the instance), instance_running (until it runs with an IP; 0 where the "
                               "provider returns a running VM), tunnel_up, agent_ready.",
                               ["provider", "phase"], buckets=START_BUCKETS, registry=reg)
        self.start = Histogram(f"{PREFIX}_startvm_seconds", "StartVM end to end, by result (ok, failed).",
                               ["provider", "result"], buckets=START_BUCKETS, registry=reg)
        self.calls = Counter(f"{PREFIX}_hypervisor_calls", "Hypervisor service calls answered, by method and status code.",
                             ["method", "code"], registry=reg)
        self.deleted = Counter(f"{PREFIX}_vms_deleted", "Pod VMs deleted, by cause (stop, rollback, recovery, orphan_sweep).",
                               ["provider", "cause"], registry=reg)
        self.cloud_calls = Counter(f"{PREFIX}_cloud_api_calls", "Cloud API calls (after the SDK's retries), by operation and outcome.",
                                   ["provider", "operation", "outcome"], registry=reg)
        self.cloud_retries = Counter(f"{PREFIX}_cloud_api_retries", "Cloud API attempts the SDK retried, by operation.",
                                     ["provider", "operation"], registry=reg)
        self.cloud_throttles = Counter(f"{PREFIX}_cloud_api_throttles", "Cloud API attempts refused as throttled, by operation.",
                                       ["provider", "operation"], registry=reg)
        self.proxy_open = Gauge(f"{PREFIX}_agent_proxy_connections", "Shim connections piped to pod VM agents now.",
                                registry=reg)
        self.proxy_bytes_total = Counter(f"{PREFIX}_agent_proxy_bytes", "Bytes piped between the shim and pod VM agents, by direction.",
                                         ["direction"], registry=reg)
        self.proxy_dials = Counter(f"{PREFIX}_agent_proxy_dials", "Connection attempts to pod VM agents, by result (ok, failed).",
                                   ["result"], registry=reg)
        self.cert_renewals = Counter(f"{PREFIX}_vm_cert_renewals",
                                     "Pod VM server certificate renewals, by result (ok, failed, unsupported: "
                                     "an image without renewal).", ["result"], registry=reg)
        self._operations: set[str] = set()
        self._initialise()
        if sandboxes is not None:
            reg.register(_SandboxCollector(sandboxes, provider))
        if pool is not None:
            reg.register(_PoolCollector(pool, provider))

    def _initialise(self) -> None:
        """Create every series of a fixed label set now, so dashboards see zeros rather than gaps."""
        for phase in PHASES:
            self.phase.labels(self.provider, phase)
        for result in ("ok", "failed"):
            self.start.labels(self.provider, result)
            self.proxy_dials.labels(result)
        for cause in DELETE_CAUSES:
            self.deleted.labels(self.provider, cause)
        # Counted per chunk on the agent path: the labelled children are looked up once, not per chunk.
        self._proxy_bytes = {direction: self.proxy_bytes_total.labels(direction) for direction in DIRECTIONS}
        for result in RENEWAL_RESULTS:
            self.cert_renewals.labels(result)

    # ---------------------------------------------------------- LifecycleRecorder
    def phase_done(self, phase: str, seconds: float, ok: bool = True) -> None:
        if phase == "end_to_end":
            self.start.labels(self.provider, "ok" if ok else "failed").observe(seconds)
        else:
            self.phase.labels(self.provider, _one_of(phase, PHASES)).observe(seconds)

    def call_done(self, method: str, code: str) -> None:
        # code: a gRPC status code name, a fixed set of 17
        self.calls.labels(_one_of(method, METHODS), code).inc()

    def vms_deleted(self, cause: str, count: int = 1) -> None:
        if count:
            self.deleted.labels(self.provider, _one_of(cause, DELETE_CAUSES)).inc(count)

    def proxy_dial(self, ok: bool) -> None:
        self.proxy_dials.labels("ok" if ok else "failed").inc()

    def proxy_connections(self, delta: int) -> None:
        self.proxy_open.inc(delta)

    def proxy_bytes(self, direction: str, count: int) -> None:
        self._proxy_bytes[direction].inc(count)

    def cert_renewal(self, result: str) -> None:
        """A ``CertRenewal`` attempt ended (its ``RenewalRecorder``)."""
        self.cert_renewals.labels(_one_of(result, RENEWAL_RESULTS)).inc()

    # ----------------------------------------------------------- CloudCallRecorder
    def _operation(self, operation: str) -> str:
        if operation in self._operations:
            return operation
        if len(self._operations) >= MAX_OPERATIONS:
            return OTHER
        self._operations.add(operation)
        return operation

    def cloud_call(self, provider: str, operation: str, outcome: str, retries: int = 0) -> None:
        op = self._operation(operation)
        self.cloud_calls.labels(self.provider, op, _one_of(outcome, OUTCOMES)).inc()
        if retries > 0:
            self.cloud_retries.labels(self.provider, op).inc(retries)

    def cloud_throttled(self, provider: str, operation: str) -> None:
        self.cloud_throttles.labels(self.provider, self._operation(operation)).inc()

    # ------------------------------------------------------------------- output
    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    def series_count(self) -> int:
        """How many samples the registry exposes now (the cardinality test's measure)."""
        return sum(len(family.samples) for family in self.registry.collect())


class ControllerMetrics:
    """The peerpod-controller's own metrics (its own registry, served on its PROBE_PORT)."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.registry = CollectorRegistry()
        reg = self.registry
        Gauge(f"{PREFIX}_build_info", "Version of the running adaptor (always 1).", ["version"],
              registry=reg).labels(__version__).set(1)
        self.passes = Counter(f"{PREFIX}_controller_passes", "Reconcile passes, by result (ok, errors, failed).",
                              ["result"], registry=reg)
        self.deleted = Counter(f"{PREFIX}_controller_vms_deleted",
                               "Pod VMs the controller deleted (PeerPods whose node died, unreferenced tagged VMs).",
                               ["provider"], registry=reg)
        self.released = Counter(f"{PREFIX}_controller_finalizers_released", "PeerPod finalizers the controller released.",
                                registry=reg)
        self.peerpods = Counter(f"{PREFIX}_controller_peerpods_deleted", "PeerPods deleted because their pod is gone.",
                                registry=reg)
        for result in ("ok", "errors", "failed"):
            self.passes.labels(result)
        self.deleted.labels(provider)

    def pass_done(self, vms_deleted: int, finalizers_released: int, peerpods_deleted: int, errors: int) -> None:
        """One reconcile pass finished with these counts."""
        self.passes.labels("errors" if errors else "ok").inc()
        self.deleted.labels(self.provider).inc(vms_deleted)
        self.released.inc(finalizers_released)
        self.peerpods.inc(peerpods_deleted)

    def pass_failed(self) -> None:
        """A pass failed as a whole (nothing swept)."""
        self.passes.labels("failed").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
