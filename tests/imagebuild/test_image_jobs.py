"""deploy/image-jobs: the aws-image-creation / azure-image-creation Jobs, their RBAC and their image.

Every manifest validates against the Kubernetes schemas (as tests/deploy does), the Jobs run a
command our CLI accepts with the settings the builder reads, and the Role allows patching
peer-pods-cm only."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cloudadaptor.cli import build_parser
from cloudadaptor.imagebuild import inputs, wheel

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "deploy" / "image-jobs"
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
NAMESPACE = "openshift-sandboxed-containers-operator"
JOB_NAMES = {"aws": "aws-image-creation", "azure": "azure-image-creation"}
OC_WAIT_TIMEOUT = 7 * 60

Doc = dict[str, Any]


def load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def build(directory: Path) -> list[Doc]:
    """The objects a kustomization yields (resources, recursively), with its namespace applied."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[Doc] = []
    for entry in spec.get("resources") or []:
        target = directory / entry
        docs += build(target) if target.is_dir() else load(target)
    for doc in docs:
        if spec.get("namespace") and "namespace" in doc["metadata"]:
            doc["metadata"]["namespace"] = spec["namespace"]
    return docs


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def job(cloud: str) -> Doc:
    return find(build(JOBS / cloud), "Job", JOB_NAMES[cloud])


@pytest.mark.parametrize("path", sorted(JOBS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(JOBS)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path):
    for doc in load(path):
        if doc.get("kind") == "Kustomization":
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_a_misspelt_job_field_would_be_caught():
    broken = copy.deepcopy(job("aws"))
    broken["spec"]["backofLimit"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("cloud", ["aws", "azure"])
def test_the_job_runs_image_build_for_its_cloud_with_the_peer_pods_settings(cloud):
    spec = job(cloud)["spec"]
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    argv = container["command"] + container["args"]
    assert argv[0] == "cloud-api-adaptor"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.image_command, args.cloud) == ("image", "build", cloud)
    assert args.update_configmap and args.keep_existing, "a retried Job reuses the image and updates the ConfigMap"
    sources = [next(iter(s.values()))["name"] for s in container["envFrom"]]
    assert sorted(sources) == ["peer-pods-cm", "peer-pods-secret"]
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "peerpod-image-builder"
    assert job(cloud)["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("cloud", ["aws", "azure"])
def test_retries_and_deadline_fit_the_seven_minute_wait_and_leave_time_to_clean_up(cloud):
    spec = job(cloud)["spec"]
    assert 0 < spec["backoffLimit"] <= 2, "a broken setting must not loop; one retry for a transient failure"
    assert OC_WAIT_TIMEOUT < spec["activeDeadlineSeconds"] <= 3600, "bounded, but longer than a slow image creation"
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 120, "SIGTERM at the deadline must leave time to delete the builder VM"


@pytest.mark.parametrize("cloud", ["aws", "azure"])
def test_the_job_has_no_ssh_key_mount(cloud):
    pod = job(cloud)["spec"]["template"]["spec"]
    assert "volumes" not in pod, "the builder makes (and deletes) its own key pair per build"
    env = {e["name"] for c in pod["containers"] for e in c.get("env", [])}
    assert not {"SSH_PUB_KEY_PATH", "SSH_PRIVATE_KEY_PATH"} & env


def test_the_service_account_may_patch_only_peer_pods_cm():
    docs = build(JOBS / "aws")
    role = find(docs, "Role", "peerpod-image-builder")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["peer-pods-cm"],
                              "verbs": ["patch"]}]
    binding = find(docs, "RoleBinding", "peerpod-image-builder")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "peerpod-image-builder"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "peerpod-image-builder", "namespace": NAMESPACE}]
    find(docs, "ServiceAccount", "peerpod-image-builder")
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_the_job_image_ships_the_pod_vm_files_and_wheel_where_the_builder_looks():
    text = (JOBS / "Containerfile").read_text()
    assert f"COPY images/podvm {inputs.SHIPPED_PODVM}" in text
    assert [line for line in text.splitlines() if line.startswith("COPY --from=") and line.endswith(f" {wheel.SHIPPED_WHEELS}")]
    assert "image build --help" in text, "the image checks that the command runs"
    kustomization = yaml.safe_load((JOBS / "aws" / "kustomization.yaml").read_text())
    assert kustomization["images"][0]["name"] == job("aws")["spec"]["template"]["spec"]["containers"][0]["image"]
