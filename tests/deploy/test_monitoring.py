"""The monitoring component: the ServiceMonitor reaches the DaemonSet's metrics port, and the
Grafana dashboard queries only metrics and labels the daemon exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from cloudadaptor.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPONENT = DEPLOY / "components" / "monitoring"


def _doc(name: str) -> dict:
    return yaml.safe_load((COMPONENT / name).read_text())


def test_servicemonitor_service_and_daemonset_agree_on_labels_and_port():
    daemonset = next(d for d in yaml.safe_load_all((DEPLOY / "base" / "daemonset.yaml").read_text()) if d["kind"] == "DaemonSet")
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    service, monitor = _doc("service.yaml"), _doc("servicemonitor.yaml")
    assert _doc("kustomization.yaml")["kind"] == "Component"
    assert service["spec"]["selector"].items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"] == daemonset["metadata"]["namespace"]


def test_the_controller_metrics_service_reaches_the_controller_and_is_scraped():
    deployment = next(d for d in yaml.safe_load_all((DEPLOY / "base" / "peerpod-controller.yaml").read_text())
                      if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    service, monitor = _doc("controller-service.yaml"), _doc("servicemonitor.yaml")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    env = {e["name"]: e for e in container["env"]}
    assert int(env["PROBE_PORT"]["value"]) == next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_dashboard_queries_only_exposed_metrics_and_labels():
    metrics = Metrics("aws", lambda: [("running", True)])
    metrics.cloud_call("aws", "RunInstances", "ok", retries=1)
    metrics.cloud_throttled("aws", "RunInstances")
    metrics.call_done("StartVM", "OK")
    families = list(metrics.registry.collect())
    names = {s.name for f in families for s in f.samples}
    labels = {label for f in families for s in f.samples for label in s.labels} | {"le", "instance"}
    dashboard = json.loads((COMPONENT / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        for name in re.findall(r"cloud_api_adaptor_[a-z_]+", expr):
            assert name in names, f"dashboard queries {name}, which the daemon does not expose"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                assert label in labels, f"dashboard groups by {label!r}, not a label of ours"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for subject in ("pod vms", "phase", "failures", "throttl"):
        assert subject in titles, f"the dashboard has no panel about {subject}"
