"""deploy/, file by file: every manifest validates against the Kubernetes schemas (offline),
every kustomization names only files that exist, and the manifests agree with the code.
What the rendered installations must hold (kustomize of every overlay and component) is in
test_rendered.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cloudadaptor.k8s import peerpods
from cloudadaptor.k8s.capacity import VM_RESOURCE
from cloudadaptor.webhook.server import MUTATE_PATH
from rendering import (CLOUD_OVERLAYS, DEPLOY, K8S_VERSIONS, KUSTOMIZATION, PLATFORM_OVERLAYS, Doc, crd_schema, find, load_docs,
                       pod_spec, render, validate)

def kustomizations() -> list[Path]:
    return sorted(DEPLOY.rglob(KUSTOMIZATION))


def manifest_files() -> list[Path]:
    """Every YAML file under deploy/ that is not a kustomization."""
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != KUSTOMIZATION)


def referenced_paths(kustomization: Path) -> Iterator[tuple[str, Path]]:
    """(field, path) of every file or directory a kustomization names."""
    spec = yaml.safe_load(kustomization.read_text())
    base = kustomization.parent
    for field in ("resources", "components", "crds"):
        for entry in spec.get(field) or []:
            yield field, base / entry
    for patch in spec.get("patches") or []:
        if "path" in patch:
            yield "patches", base / patch["path"]
    for generator in (spec.get("configMapGenerator") or []) + (spec.get("secretGenerator") or []):
        for entry in generator.get("files") or []:
            yield "generator", base / entry.split("=", 1)[-1]


# ------------------------------------------------------------------- structure


def test_there_is_a_base_a_settings_overlay_per_cloud_and_an_overlay_per_platform_and_cloud():
    for directory in ("base", *(f"overlays/{o}" for o in CLOUD_OVERLAYS + PLATFORM_OVERLAYS)):
        assert (DEPLOY / directory / KUSTOMIZATION).is_file(), directory
    for component in ("openshift", "cert-manager", "runtimeclass", "kata-remote-cc"):
        spec = yaml.safe_load((DEPLOY / "components" / component / KUSTOMIZATION).read_text())
        assert spec["kind"] == "Component", component


@pytest.mark.parametrize("kustomization", kustomizations(), ids=lambda p: str(p.parent.relative_to(DEPLOY)))
def test_every_kustomization_names_only_files_that_exist(kustomization):
    for field, path in referenced_paths(kustomization):
        assert path.exists(), f"{kustomization.relative_to(DEPLOY)}: {field} names {path} which does not exist"
        if path.is_dir():
            assert (path / KUSTOMIZATION).is_file(), f"{path} is named as a kustomization but has none"


def test_every_manifest_is_used_by_a_kustomization_or_is_an_example():
    used = {path.resolve() for k in kustomizations() for _, path in referenced_paths(k)}
    for path in manifest_files():
        assert path.resolve() in used or path.parent.name == "examples", f"{path.relative_to(DEPLOY)} is not in any kustomization"


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path):
    for doc in load_docs(path):
        if doc.get("apiVersion") == "monitoring.coreos.com/v1":
            continue  # the Prometheus operator's CRD: checked in tests/deploy/test_monitoring.py
        validate(doc)


def test_an_invalid_manifest_would_be_caught():
    daemonset = copy.deepcopy(find(load_docs(DEPLOY / "base" / "daemonset.yaml"), "DaemonSet"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["mountPropagaton"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, K8S_VERSIONS[0], strict=True)


def test_the_peerpod_crd_matches_the_code_and_accepts_what_the_tracker_creates():
    crd = find(load_docs(DEPLOY / "base" / "peerpod-crd.yaml"), "CustomResourceDefinition")
    spec = crd["spec"]
    assert (spec["group"], spec["names"]["kind"], spec["names"]["plural"]) == (peerpods.GROUP, peerpods.KIND, peerpods.PLURAL)
    assert crd["metadata"]["name"] == f"{peerpods.PLURAL}.{peerpods.GROUP}"
    assert [v["name"] for v in spec["versions"]] == [peerpods.VERSION]
    pod = peerpods.PodRef(namespace="default", name="web", uid="u-1", node_name="n", phase="Running", deleting=False)
    body = peerpods.peerpod_body(name="web-1", pod=pod, sandbox_id="s", node_name="n", instance_id="i-1", provider_name="aws")
    jsonschema.validate(body, crd_schema())
    body["spec"].pop("instanceID")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, crd_schema())


# ------------------------------------------------------------ what must be true


def test_the_daemonset_runs_the_adaptor_on_the_host_network_with_the_node_mounts():
    ds = find(load_docs(DEPLOY / "base" / "daemonset.yaml"), "DaemonSet")
    pod = pod_spec(ds)
    container = pod["containers"][0]
    assert pod["hostNetwork"] is True
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert set(container["securityContext"]["capabilities"]["add"]) >= {"NET_ADMIN", "SYS_ADMIN"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/run/peerpod", "/run/netns"):
        assert mounts[path].get("mountPropagation") == "HostToContainer", path
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    assert {(e.get("configMapRef") or e.get("secretRef"))["name"] for e in container["envFrom"]} == {"peer-pods-cm", "peer-pods-secret"}
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(env["PROBE_PORT"]["value"]), "the probes use the port the daemon serves"
    assert env["PROBE_ADDRESS"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert container["startupProbe"]["httpGet"] == {"path": "/startup", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_every_command_in_the_manifests_is_a_real_subcommand():
    from cloudadaptor.cli import build_parser

    parser = build_parser()
    docs = render("openshift-aws")
    for job in ("aws", "azure"):
        docs += load_docs(DEPLOY / "image-jobs" / job / f"{job}-image-creation.yaml")
    commands = []
    for doc in docs:
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            commands.append(container["command"])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "exec" in container.get(probe, {}):
                    commands.append(container[probe]["exec"]["command"])
    assert len(commands) >= 3  # serve, peerpod-controller, webhook at least (the daemon's probes are HTTP)
    for command in commands:
        assert command[0] == "cloud-api-adaptor"
        parser.parse_args(command[1:])  # exits (SystemExit) on an unknown subcommand or flag


def test_the_runtime_class_has_the_documented_overhead():
    rc = find(load_docs(DEPLOY / "components" / "runtimeclass" / "runtimeclass.yaml"), "RuntimeClass")
    assert (rc["metadata"]["name"], rc["handler"]) == ("kata-remote", "kata-remote")
    assert rc["overhead"]["podFixed"] == {"memory": "120Mi", "cpu": "250m"}


def webhook_parts(docs: list[Doc]) -> tuple[Doc, Doc, Doc, Doc]:
    return (find(docs, "Deployment", "peer-pods-webhook"), find(docs, "Service", "peer-pods-webhook"),
            find(docs, "MutatingWebhookConfiguration"), find(docs, "RuntimeClass"))


def assert_webhook_consistent(docs: list[Doc]) -> str:
    deployment, service, config, runtime_class = webhook_parts(docs)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    hook = config["webhooks"][0]
    target = env["TARGET_RUNTIME_CLASS"]
    assert target == runtime_class["metadata"]["name"], "the webhook must target the RuntimeClass deployed"
    assert f"== '{target}'" in hook["matchConditions"][0]["expression"], "matchConditions must select that class"
    client = hook["clientConfig"]["service"]
    assert (client["name"], client["namespace"], client["path"]) == (service["metadata"]["name"], service["metadata"]["namespace"], MUTATE_PATH)
    assert client["port"] == service["spec"]["ports"][0]["port"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert env["WEBHOOK_ADDRESS"].endswith(f":{container['ports'][0]['containerPort']}")
    assert hook["admissionReviewVersions"] == ["v1"] and hook["sideEffects"] == "None"
    assert hook["rules"][0]["operations"] == ["CREATE"] and hook["rules"][0]["resources"] == ["pods"]
    return target


def test_the_webhook_service_configuration_and_runtime_class_agree():
    assert assert_webhook_consistent(render("openshift-aws", ("runtimeclass",))) == "kata-remote"


def test_the_kata_remote_cc_component_renames_the_class_everywhere():
    docs = render("kubernetes-azure", ("runtimeclass", "kata-remote-cc"))
    assert assert_webhook_consistent(docs) == "kata-remote-cc"
    for doc in webhook_parts(docs):
        validate(doc)


def test_rbac_is_least_privilege():
    docs = load_docs(DEPLOY / "base" / "rbac.yaml")
    for role in (d for d in docs if d["kind"] == "ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]
            assert not {"list", "watch"} & set(rule["verbs"]) or (
                role["metadata"]["name"] == "peerpods-controller"
                and rule["resources"] in (["peerpods"], ["peerpodconfigs"], ["nodes"])), \
                f"{role['metadata']['name']}: only the controller lists, and only PeerPods, PeerPodConfigs and Nodes"
            assert "configmaps" not in rule["resources"], "no role reads config maps"
    adaptor = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"])
               for r in find(docs, "ClusterRole", "peerpods-cloud-api-adaptor")["rules"]}
    assert adaptor == {(("",), ("pods",)): {"get"}, (("",), ("nodes/status",)): {"patch"},
                       (("",), ("nodes",)): {"get"},  # its own Node: the PeerPodConfig limit written there
                       (("",), ("events",)): {"create"},
                       # Registry credentials (a pod's pull secrets): get by name, nothing wider.
                       (("",), ("secrets", "serviceaccounts")): {"get"},
                       (("confidentialcontainers.org",), ("peerpods",)): {"get", "create", "patch", "delete"},
                       (("",), ("namespaces",)): {"get"}}
    controller = find(docs, "ClusterRole", "peerpods-controller")
    for role in (find(docs, "ClusterRole", "peerpods-cloud-api-adaptor"), controller):
        [namespaces] = [r for r in role["rules"] if r["resources"] == ["namespaces"]]
        assert namespaces["resourceNames"] == ["kube-system"], "the cluster id is read from kube-system only"
    assert {"create"} == {v for r in controller["rules"] if r["resources"] == ["events"] for v in r["verbs"]}
    assert not [r for r in controller["rules"] if "secrets" in r["resources"]], "the controller reads no secrets"
    webhook_sa = find(docs, "ServiceAccount", "peer-pods-webhook")
    assert webhook_sa.get("automountServiceAccountToken") is False
    bound = {(b["roleRef"]["name"], b["subjects"][0]["name"]) for b in docs if b["kind"] == "ClusterRoleBinding"}
    assert bound == {("peerpods-cloud-api-adaptor", "cloud-api-adaptor"), ("peerpods-controller", "peerpod-controller")}


# ------------------------------------------------------- configuration examples

DESIGN_KEYS = {
    "aws": ({"CLOUD_PROVIDER", "PODVM_AMI_ID", "PODVM_INSTANCE_TYPE", "SSH_KP_NAME", "USE_PODVM_LAUNCHTEMPLATE",
             "PODVM_LAUNCHTEMPLATE_NAME", "VXLAN_PORT", "PEERPODS_LIMIT_PER_NODE"},
            {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_SUBNET_ID", "AWS_VPC_ID", "AWS_SG_IDS"}),
    "azure": ({"CLOUD_PROVIDER", "AZURE_INSTANCE_SIZE", "AZURE_INSTANCE_SIZES", "AZURE_SUBNET_ID", "AZURE_NSG_ID",
               "AZURE_IMAGE_ID", "SSH_USERNAME", "ENABLE_SECURE_BOOT", "VXLAN_PORT", "PEERPODS_LIMIT_PER_NODE"},
              {"AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_SUBSCRIPTION_ID", "AZURE_REGION",
               "AZURE_RESOURCE_GROUP"}),
}


def example_env(overlay: str) -> tuple[dict[str, str], dict[str, str]]:
    docs = render(overlay)
    return find(docs, "ConfigMap", "peer-pods-cm")["data"], find(docs, "Secret", "peer-pods-secret")["stringData"]


@pytest.mark.parametrize("overlay", CLOUD_OVERLAYS)
def test_the_example_config_carries_the_documented_keys(overlay):
    cm, secret = example_env(overlay)
    cm_keys, secret_keys = DESIGN_KEYS[overlay]
    assert cm_keys <= set(cm), f"missing from peer-pods-cm: {sorted(cm_keys - set(cm))}"
    assert secret_keys <= set(secret), f"missing from peer-pods-secret: {sorted(secret_keys - set(secret))}"
    assert cm["CLOUD_PROVIDER"] == overlay
    assert all(isinstance(v, str) for v in {**cm, **secret}.values()), "ConfigMap/Secret values must be strings"


@pytest.mark.parametrize("overlay", CLOUD_OVERLAYS)
def test_every_example_key_is_one_the_adaptor_knows_and_parses(overlay):
    from cloudadaptor.config import check
    from cloudadaptor.k8s import controller
    from cloudadaptor.providers import base

    assert overlay in base.provider_names(), f"the {overlay} overlay has no provider"
    cm, secret = example_env(overlay)
    env = {**cm, **secret}
    rows, problems = check(env)
    known = {key for key, _, _ in rows} | {k.name for k in controller.KEYS}
    assert set(env) <= known, f"keys nobody reads: {sorted(set(env) - known)}"
    assert [str(p) for p in problems] == []


def test_the_vm_resource_name_is_the_one_the_webhook_requests():
    from cloudadaptor.webhook.mutate import VM_RESOURCE as WEBHOOK_RESOURCE

    assert VM_RESOURCE == WEBHOOK_RESOURCE == "kata.peerpods.io/vm"
