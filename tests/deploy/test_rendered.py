"""The installations operators apply: every platform overlay, with every combination of
the optional components, rendered by real kustomize; then what each must hold — valid
objects in one namespace, a hardened DaemonSet that sees no private key, the privileged
SCC bound on OpenShift only, a webhook certificate on every platform, the node-scoping
admission policy and namespace references that follow a namespace change."""

from __future__ import annotations

import shutil

import pytest
import yaml

from rendering import (CLOUD_OVERLAYS, DEPLOY, KUSTOMIZATION, NAMESPACE, OPTIONAL_COMPONENTS, PLATFORM_OVERLAYS, Doc, find,
                       find_all, kustomize, pod_spec, render, validate)

COMBINATIONS = [(overlay, components) for overlay in PLATFORM_OVERLAYS for components in OPTIONAL_COMPONENTS]
ADAPTOR_SA = "cloud-api-adaptor"
SERVING_CERT = "service.beta.openshift.io/serving-cert-secret-name"
INJECT_CABUNDLE = "service.beta.openshift.io/inject-cabundle"
INJECT_CA_FROM = "cert-manager.io/inject-ca-from"
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "RuntimeClass",
                  "MutatingWebhookConfiguration", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}


def combo_id(combo: tuple[str, tuple[str, ...]]) -> str:
    overlay, components = combo
    return "+".join((overlay, *components))


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_every_overlay_and_component_combination_builds_valid_objects_in_one_namespace(combo):
    overlay, components = combo
    docs = render(overlay, components)
    for kind, name in [("Namespace", NAMESPACE), ("CustomResourceDefinition", "peerpods.confidentialcontainers.org"),
                       ("DaemonSet", "cloud-api-adaptor-daemonset"), ("Deployment", "peerpod-controller"),
                       ("Deployment", "peer-pods-webhook"), ("Service", "peer-pods-webhook"),
                       ("MutatingWebhookConfiguration", "peer-pods-webhook"), ("ValidatingAdmissionPolicy", None),
                       ("ValidatingAdmissionPolicyBinding", None), ("ConfigMap", "peer-pods-cm"), ("Secret", "peer-pods-secret")]:
        find(docs, kind, name)
    assert len(find_all(docs, "RuntimeClass")) == ("runtimeclass" in components), "the RuntimeClass only with its component"
    namespaces = {d["metadata"]["namespace"] for d in docs if "namespace" in d["metadata"]}
    assert namespaces == {NAMESPACE}
    stamped = [f"{d['kind']}/{d['metadata']['name']}" for d in docs if d["kind"] in CLUSTER_SCOPED and "namespace" in d["metadata"]]
    assert stamped == [], "cluster-scoped objects carry no namespace"
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize("overlay", CLOUD_OVERLAYS)
def test_the_cloud_settings_overlays_build_too(overlay):
    docs = render(overlay)
    assert find(docs, "ConfigMap", "peer-pods-cm")["data"]["CLOUD_PROVIDER"] == overlay


@pytest.mark.parametrize("job", ["aws", "azure"])
def test_the_image_jobs_build_and_mount_no_ssh_key(job):
    docs = kustomize(DEPLOY / "image-jobs" / job)
    pod = pod_spec(find(docs, "Job"))
    for doc in docs:
        validate(doc)
    secrets = [v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v]
    assert secrets == [], f"the {job} image Job mounts secrets {secrets}: the builder makes its own key pair per build"
    env = {e["name"] for c in pod["containers"] for e in c.get("env", [])}
    assert "SSH_PRIVATE_KEY_PATH" not in env


# ------------------------------------------------------------ the adaptor's pod


@pytest.mark.parametrize("overlay", PLATFORM_OVERLAYS)
def test_the_rendered_daemonset_is_hardened(overlay):
    pod = pod_spec(find(render(overlay), "DaemonSet"))
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"]
    assert sorted(context["capabilities"]["add"]) == ["NET_ADMIN", "SYS_ADMIN"], "netlink (VXLAN, tc) and setns, nothing more"
    assert context.get("privileged") is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["seccompProfile"]["type"] == "RuntimeDefault" and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    # The API server refuses allowPrivilegeEscalation: false with SYS_ADMIN; it must not be claimed.
    assert "allowPrivilegeEscalation" not in context
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/run/peerpod", "/run/netns", "/tmp"}, "the only places the adaptor writes"
    assert "emptyDir" in volumes[next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp")]
    assert "/root/.ssh" in mounts


@pytest.mark.parametrize("overlay", PLATFORM_OVERLAYS)
def test_the_rendered_daemonset_mounts_no_private_key(overlay):
    pod = pod_spec(find(render(overlay), "DaemonSet"))
    for volume in pod["volumes"]:
        if "secret" in volume:
            items = volume["secret"].get("items")
            assert items, f"secret volume {volume['name']} projects every key; name the public ones (items)"
            assert all(i["key"].endswith(".pub") for i in items), f"{volume['name']} projects {items}"
    env_secrets = {e["secretRef"]["name"] for e in pod["containers"][0]["envFrom"] if "secretRef" in e}
    assert env_secrets == {"peer-pods-secret"}, "the SSH key secret never reaches the environment"


@pytest.mark.parametrize("overlay", PLATFORM_OVERLAYS)
def test_the_controller_and_the_webhook_run_restricted(overlay):
    docs = render(overlay)
    for name in ("peerpod-controller", "peer-pods-webhook"):
        pod = pod_spec(find(docs, "Deployment", name))
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
        assert not pod.get("hostNetwork") and not [v for v in pod.get("volumes", []) if "hostPath" in v], name


@pytest.mark.parametrize("overlay", PLATFORM_OVERLAYS)
def test_the_namespace_admits_the_privileged_daemonset(overlay):
    labels = find(render(overlay), "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


# ------------------------------------------------------------------- platforms


def scc_grants(docs: list[Doc]) -> set[tuple[str, str, str]]:
    """(SCC, service account namespace, name) pairs that some ClusterRoleBinding lets `use`."""
    roles = {r["metadata"]["name"]: r for r in find_all(docs, "ClusterRole")}
    grants = set()
    for binding in find_all(docs, "ClusterRoleBinding"):
        for rule in roles[binding["roleRef"]["name"]]["rules"]:
            if rule["apiGroups"] == ["security.openshift.io"] and "securitycontextconstraints" in rule["resources"]:
                assert rule["verbs"] == ["use"] and rule.get("resourceNames"), "use of named SCCs only"
                grants |= {(scc, s["namespace"], s["name"]) for scc in rule["resourceNames"] for s in binding["subjects"]}
    return grants


@pytest.mark.parametrize("cloud", CLOUD_OVERLAYS)
def test_the_openshift_overlay_binds_the_privileged_scc_and_uses_the_service_ca(cloud):
    docs = render(f"openshift-{cloud}")
    ds_pod = pod_spec(find(docs, "DaemonSet"))
    assert scc_grants(docs) == {("privileged", NAMESPACE, ds_pod["serviceAccountName"])}
    service, config = find(docs, "Service", "peer-pods-webhook"), find(docs, "MutatingWebhookConfiguration")
    secret = webhook_secret(docs)
    assert service["metadata"]["annotations"][SERVING_CERT] == secret
    assert config["metadata"]["annotations"][INJECT_CABUNDLE] == "true"
    assert not [d for d in docs if d["apiVersion"].startswith("cert-manager.io/")]
    assert INJECT_CA_FROM not in config["metadata"]["annotations"]


@pytest.mark.parametrize("cloud", CLOUD_OVERLAYS)
def test_the_kubernetes_overlay_gets_the_webhook_certificate_from_cert_manager(cloud):
    docs = render(f"kubernetes-{cloud}")
    assert scc_grants(docs) == set(), "no OpenShift objects on plain Kubernetes"
    service, config = find(docs, "Service", "peer-pods-webhook"), find(docs, "MutatingWebhookConfiguration")
    assert SERVING_CERT not in service["metadata"].get("annotations", {})
    assert INJECT_CABUNDLE not in config["metadata"].get("annotations", {})
    assert_cert_manager_wiring(docs)


def webhook_secret(docs: list[Doc]) -> str:
    pod = pod_spec(find(docs, "Deployment", "peer-pods-webhook"))
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    name: str = volume["secret"]["secretName"]
    return name


def assert_cert_manager_wiring(docs: list[Doc]) -> None:
    service, config = find(docs, "Service", "peer-pods-webhook"), find(docs, "MutatingWebhookConfiguration")
    certificate, issuer = find(docs, "Certificate"), find(docs, "Issuer")
    namespace = service["metadata"]["namespace"]
    spec = certificate["spec"]
    assert spec["secretName"] == webhook_secret(docs)
    assert f"{service['metadata']['name']}.{namespace}.svc" in spec["dnsNames"], "the name the API server calls"
    assert spec["issuerRef"] == {"kind": "Issuer", "name": issuer["metadata"]["name"]}
    assert certificate["metadata"]["namespace"] == issuer["metadata"]["namespace"] == namespace
    assert config["metadata"]["annotations"][INJECT_CA_FROM] == f"{namespace}/{certificate['metadata']['name']}"


# ------------------------------------------------------- namespace references


def test_every_namespace_reference_follows_a_namespace_change(tmp_path):
    """An operator changes `namespace:` in base/kustomization.yaml: every reference moves with it."""
    copied = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copied)
    base = copied / "base" / KUSTOMIZATION
    spec = yaml.safe_load(base.read_text())
    spec["namespace"] = "peerpods-elsewhere"
    base.write_text(yaml.safe_dump(spec))
    for overlay in PLATFORM_OVERLAYS:
        docs = render(overlay, ("runtimeclass",), deploy=copied)
        text = yaml.safe_dump_all(docs)
        assert NAMESPACE not in text, f"{overlay}: {NAMESPACE} is still named after the change"
        assert "peerpods-elsewhere" in policy_username(docs)
        assert "peerpods-elsewhere" in excluded_namespaces(docs)
        if overlay.startswith("kubernetes-"):
            assert_cert_manager_wiring(docs)
        else:
            assert scc_grants(docs) == {("privileged", "peerpods-elsewhere", ADAPTOR_SA)}


def policy_username(docs: list[Doc]) -> str:
    (condition,) = find(docs, "ValidatingAdmissionPolicy")["spec"]["matchConditions"]
    expression: str = condition["expression"]
    return expression


def excluded_namespaces(docs: list[Doc]) -> set[str]:
    hook = find(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    return {value for e in hook["namespaceSelector"]["matchExpressions"]
            if e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "NotIn" for value in e["values"]}


@pytest.mark.parametrize("overlay", PLATFORM_OVERLAYS)
def test_the_webhook_leaves_its_own_namespace_and_the_system_ones_alone(overlay):
    docs = render(overlay)
    namespace = find(docs, "Deployment", "peer-pods-webhook")["metadata"]["namespace"]
    assert {namespace, "kube-system", "kube-public", "kube-node-lease"} <= excluded_namespaces(docs)


@pytest.mark.parametrize("overlay", PLATFORM_OVERLAYS)
def test_the_node_policy_is_bound_and_matches_the_adaptors_service_account(overlay):
    docs = render(overlay)
    policy, binding = find(docs, "ValidatingAdmissionPolicy"), find(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    ds_pod = pod_spec(find(docs, "DaemonSet"))
    ds_namespace = find(docs, "DaemonSet")["metadata"]["namespace"]
    expected = f"request.userInfo.username == 'system:serviceaccount:{ds_namespace}:{ds_pod['serviceAccountName']}'"
    assert policy_username(docs) == expected
