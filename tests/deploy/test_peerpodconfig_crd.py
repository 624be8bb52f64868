"""The PeerPodConfig CRD: a valid structural schema that refuses what it can, and the docs' example."""

from __future__ import annotations

import copy

import jsonschema
import pytest

from cloudadaptor.k8s import peerpodconfig
from rendering import DEPLOY, crd_schema, find, load_docs

EXAMPLE = DEPLOY / "examples" / "peerpodconfig-openshift.yaml"


def example() -> dict:
    return find(load_docs(EXAMPLE), "PeerPodConfig")


def test_the_crd_matches_the_code():
    crd = find(load_docs(DEPLOY / "base" / "peerpodconfig-crd.yaml"), "CustomResourceDefinition")
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{peerpodconfig.PLURAL}.confidentialcontainers.org"
    assert (spec["group"], spec["scope"], spec["names"]["kind"]) == ("confidentialcontainers.org", "Namespaced", "PeerPodConfig")
    [version] = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    limit = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["limit"]
    assert limit["pattern"] == peerpodconfig.LIMIT_PATTERN.pattern
    assert limit["maxLength"] == peerpodconfig.MAX_LIMIT_DIGITS


def test_the_openapi_schema_is_a_valid_schema():
    jsonschema.Draft7Validator.check_schema(crd_schema("PeerPodConfig"))


def test_the_docs_example_is_accepted_exactly_as_the_docs_show_it():
    doc = example()
    assert doc == {
        "apiVersion": "confidentialcontainers.org/v1alpha1", "kind": "PeerPodConfig",
        "metadata": {"name": "peerpodconfig-openshift", "namespace": "openshift-sandboxed-containers-operator"},
        "spec": {"cloudSecretName": "peer-pods-secret", "configMapName": "peer-pods-cm", "limit": "10",
                 "nodeSelector": {"node-role.kubernetes.io/kata-oc": ""}},
    }
    jsonschema.validate(doc, crd_schema("PeerPodConfig"))


@pytest.mark.parametrize("change, field", [
    ({"limit": "ten"}, "limit"),
    ({"limit": "-1"}, "limit"),
    ({"limit": ""}, "limit"),
    ({"limit": 3}, "limit"),
    ({"limit": "1234567"}, "limit"),
    ({"nodeSelector": {}}, "nodeSelector"),
    ({"nodeSelector": {"kata": "not valid"}}, "nodeSelector"),
    ({"nodeSelector": None}, "nodeSelector"),
])
def test_the_schema_refuses_a_bad_spec(change, field):
    doc = copy.deepcopy(example())
    for key, value in change.items():
        if value is None:
            del doc["spec"][key]
        else:
            doc["spec"][key] = value
    with pytest.raises(jsonschema.ValidationError) as err:
        jsonschema.validate(doc, crd_schema("PeerPodConfig"))
    assert field in err.value.json_path or field in err.value.message, err.value
