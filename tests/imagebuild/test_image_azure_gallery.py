"""`image build azure --gallery`: the built image published as a confidential-VM-ready gallery image version,
against the fake ARM endpoint (real azure-mgmt clients, long-running operations), then the CVM start-up check."""

from __future__ import annotations

import pytest
from buildworld import run_cli
from test_image_azure import build_args

from cloudadaptor.imagebuild import azure_gallery
from cloudadaptor.imagebuild.azure_gallery import podvm_version
from fakes.sshserver import FakeSshHost

GALLERY = "peerpods_gallery"


@pytest.fixture
def builder_vm(azure):
    """The builder VM's SSH, serving the host key the VM's customData gives it (as in test_image_azure)."""
    with FakeSshHost(username="peerpod", host_key_source=azure.builder_host_key) as host:
        yield host


def _rg_path(azure) -> str:
    return f"/subscriptions/{azure.arm.subscription_id}/resourceGroups/{azure.resource_group}/providers/Microsoft.Compute"


def test_gallery_build_publishes_a_cvm_ready_version_and_leaves_no_builder_resources(
        azure, builder_vm, vm_root, payload, wheel):
    code, out, err = run_cli(build_args(builder_vm.port, vm_root, payload, wheel, "--gallery", GALLERY),
                             azure.env(), azure.factory())
    assert code == 0, err
    version_id = out.strip()
    version = podvm_version()
    assert version_id.endswith(f"/galleries/{GALLERY}/images/peer-pod-vmimage/versions/{version}"), version_id
    base = _rg_path(azure)
    assert azure.arm.resource(f"{base}/galleries/{GALLERY}")["properties"]["provisioningState"] == "Succeeded"
    definition = azure.arm.resource(f"{base}/galleries/{GALLERY}/images/peer-pod-vmimage")["properties"]
    assert definition["features"] == [{"name": "SecurityType", "value": "ConfidentialVmSupported"}]
    assert (definition["osState"], definition["hyperVGeneration"], definition["osType"]) == ("Generalized", "V2", "Linux")
    made = azure.arm.resource(version_id)["properties"]
    assert made["provisioningState"] == "Succeeded"
    assert made["storageProfile"]["source"]["id"].lower() == f"{base}/images/peer-pod-vmimage".lower()
    assert azure.leftovers() == {}, "no builder VM, NIC or disk left"
    assert azure.arm.count("PUT", f"/versions/{version}") == 1
    assert "publishing the gallery image version" in err


def test_a_second_publication_of_the_same_image_reuses_the_version(azure, builder_vm, vm_root, payload, wheel):
    args = build_args(builder_vm.port, vm_root, payload, wheel, "--gallery", GALLERY)
    code, first, err = run_cli(args, azure.env(), azure.factory())
    assert code == 0, err
    code, second, err = run_cli([*args, "--keep-existing"], azure.env(), azure.factory())
    assert code == 0, err
    assert first == second
    assert azure.arm.count("PUT", "/versions/") == 1, "the existing version is adopted, not re-created"


def test_an_existing_definition_that_cannot_back_a_cvm_is_refused_not_changed(azure, builder_vm, vm_root, payload, wheel):
    base = _rg_path(azure)
    azure.arm.state.resources[f"{base}/galleries/{GALLERY}".lower()] = {
        "id": f"{base}/galleries/{GALLERY}", "name": GALLERY, "location": azure.arm.location,
        "type": "Microsoft.Compute/galleries", "properties": {"provisioningState": "Succeeded"}}
    azure.arm.state.resources[f"{base}/galleries/{GALLERY}/images/peer-pod-vmimage".lower()] = {
        "id": f"{base}/galleries/{GALLERY}/images/peer-pod-vmimage", "name": "peer-pod-vmimage",
        "location": azure.arm.location, "type": "Microsoft.Compute/galleries/images",
        "properties": {"osType": "Linux", "osState": "Generalized", "hyperVGeneration": "V2",
                       "identifier": {"publisher": "p", "offer": "o", "sku": "s"}, "provisioningState": "Succeeded"}}
    code, out, err = run_cli(build_args(builder_vm.port, vm_root, payload, wheel, "--gallery", GALLERY),
                             azure.env(), azure.factory())
    assert code == 1 and out == ""
    assert "cannot back a confidential VM: it does not declare SecurityType=ConfidentialVmSupported" in err, err
    assert azure.arm.count("PUT", "/versions/") == 0 and azure.leftovers() == {}


def test_gallery_is_refused_for_aws_before_anything_is_built(aws, payload, wheel):
    code, out, err = run_cli(["build", "aws", "--agent-payload", str(payload), "--wheel", str(wheel),
                              "--gallery", GALLERY], aws.env(), aws.factory())
    assert code == 1 and "--gallery is for Azure" in err, err
    assert aws.leftovers() == {}


@pytest.mark.parametrize("given, expected", [("0.1.0", "0.1.0"), ("1.2.3.dev4", "1.2.3"), ("2.5", "2.5.0"), ("7", "7.0.0")])
def test_the_version_comes_from_the_pod_vm_version(given, expected):
    assert azure_gallery.podvm_version(given) == expected
