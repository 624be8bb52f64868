"""`image build azure` end to end: the real azure-mgmt clients against the fake ARM endpoint (with VM
deallocate/generalize and images), an in-process SSH server standing in for the builder VM (it runs
provision.py for real against a temporary root), a local Kubernetes API."""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

import paramiko
import pytest
import buildworld
from buildworld import CONFIGMAPS, NAMESPACE, assert_pod_vm_installed, run_cli

from cloudadaptor import __version__
from cloudadaptor.imagebuild.common import TAG_BASE_IMAGE, TAG_BUILDER_VERSION, TAG_BUILT_BY
from cloudadaptor.providers.azure.tags import azure_tag_name
from fakes.sshserver import FakeSshHost


@pytest.fixture
def builder_vm(azure) -> FakeSshHost:
    """The builder VM's SSH: only SSH_USERNAME gets in, serving the host key the VM's customData gives it
    (which key logged in is checked against the VM's osProfile after the build)."""
    with FakeSshHost(username="peerpod", host_key_source=azure.builder_host_key) as host:
        yield host


def login_key_of(vm: dict) -> paramiko.PKey:
    key_data = vm["properties"]["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["keyData"]
    return paramiko.RSAKey(data=base64.b64decode(key_data.split()[1]))


def deleted_builder_vm(azure) -> dict:
    [vm] = [r for r in azure.arm.state.deleted if r.get("type") == "Microsoft.Compute/virtualMachines"]
    return vm


def build_args(vm_port: int, root: Path, payload: Path, wheel: Path, *extra: str) -> list[str]:
    return ["build", "azure", "--agent-payload", str(payload), "--wheel", str(wheel),
            "--ssh-endpoint", f"127.0.0.1:{vm_port}", "--install-root", str(root), "--poll-interval", "0",
            "--ssh-timeout", "10s", *extra]


def test_build_deallocates_generalizes_and_creates_the_tagged_image_then_removes_vm_nic_and_disk(
        azure, builder_vm, vm_root, payload, wheel, kube):
    server, kubeconfig = kube
    started = time.monotonic()
    code, out, err = run_cli(build_args(builder_vm.port, vm_root, payload, wheel, "--update-configmap"),
                             azure.env(KUBECONFIG=str(kubeconfig)), azure.factory())
    elapsed = time.monotonic() - started
    assert code == 0, err
    image_id = out.strip()
    assert image_id.endswith("/providers/Microsoft.Compute/images/peer-pod-vmimage")
    assert "peer-pod-vmimage" in image_id
    image = azure.image("peer-pod-vmimage")
    assert image is not None and image["properties"]["provisioningState"] == "Succeeded"
    assert image["properties"]["storageProfile"]["osDisk"]["osState"] == "Generalized"
    assert image["properties"]["hyperVGeneration"] == "V2"
    tags = image["tags"]
    assert tags[azure_tag_name(TAG_BUILT_BY)] == "cloud-api-adaptor image build"
    assert tags[azure_tag_name(TAG_BUILDER_VERSION)] == __version__
    assert tags[azure_tag_name(TAG_BASE_IMAGE)] == "RedHat:RHEL:9-lvm-gen2:latest", "RHEL 9 is the default base"
    assert tags["cluster"] == "test-cluster"
    assert azure.leftovers() == {}
    assert_pod_vm_installed(vm_root)
    assert builder_vm.logins == [("peerpod", login_key_of(deleted_builder_vm(azure)).fingerprint)], \
        "logged in with the key pair made for this build"
    assert set(builder_vm.served_host_keys) == {buildworld.host_key_in(customdata_of(deleted_builder_vm(azure))).fingerprint}
    vm_puts = [p for m, p, _ in azure.arm.requests if m == "PUT" and "/virtualMachines/" in p]
    assert vm_puts and all("/peerpod-image-builder-" in p for p in vm_puts)
    assert azure.arm.count("POST", "/deallocate") == 1 and azure.arm.count("POST", "/generalize") == 1
    configmap = server.server.get(CONFIGMAPS, "peer-pods-cm", NAMESPACE)
    assert configmap["data"]["AZURE_IMAGE_ID"] == image_id and configmap["data"]["VXLAN_PORT"] == "9000"
    assert "waagent -deprovision+user" in err, "seal says what it would run on a real VM"
    print(f"\nAzure build against the fake ARM endpoint + loopback SSH: {elapsed:.2f}s")


def test_builder_vm_is_an_ordinary_vm_with_ssh_key_login_only(azure, builder_vm, vm_root, payload, wheel):
    code, _, err = run_cli(build_args(builder_vm.port, vm_root, payload, wheel), azure.env(DISABLECVM="false"),
                           azure.factory())
    assert code == 0, err
    vm = deleted_builder_vm(azure)
    props = vm["properties"]
    assert "securityProfile" not in props, "a managed image cannot come from a confidential VM"
    linux = props["osProfile"]["linuxConfiguration"]
    assert linux["disablePasswordAuthentication"] is True
    key_data = linux["ssh"]["publicKeys"][0]["keyData"]
    assert key_data.startswith("ssh-rsa ") and key_data != azure.public_key.read_text().strip(), \
        "the builder's own key pair, not the ssh-key-secret's"
    assert login_key_of(vm).get_bits() >= 3072
    assert buildworld.host_key_in(customdata_of(vm)) is not None, "cloud-init gets the build's host key"
    assert "userData" not in props
    assert props["storageProfile"]["imageReference"] == {
        "publisher": "RedHat", "offer": "RHEL", "sku": "9-lvm-gen2", "version": "latest"}


def test_ssh_that_never_comes_up_fails_clearly_and_removes_vm_nic_and_disk(azure, vm_root, payload, wheel):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = build_args(port, vm_root, payload, wheel)
    args[args.index("--ssh-timeout") + 1] = "1s"
    code, out, err = run_cli(args, azure.env(), azure.factory())
    assert code == 1 and out == ""
    assert "did not answer within 1s" in err and "peerpod@127.0.0.1" in err, err
    assert azure.leftovers() == {} and azure.image("peer-pod-vmimage") is None
    assert azure.arm.ids("virtualMachines") == [] and any(
        r.get("type") == "Microsoft.Compute/virtualMachines" for r in azure.arm.state.deleted), "a VM was made, then removed"


def test_provisioning_that_fails_half_way_names_the_step_and_removes_everything(
        azure, builder_vm, vm_root, payload, wheel):
    (vm_root / "usr").write_text("a file where a directory must go\n")
    code, _, err = run_cli(build_args(builder_vm.port, vm_root, payload, wheel), azure.env(), azure.factory())
    assert code == 1
    assert "provisioning failed at step 3/7 (kata-agent from the payload)" in err, err
    assert azure.leftovers() == {} and azure.image("peer-pod-vmimage") is None


def test_image_creation_that_fails_leaves_no_image_and_no_temporary_resource(azure, builder_vm, vm_root, payload, wheel):
    azure.arm.fail_next("PUT", "images", code="InternalOperationError", message="injected: image creation failed",
                        lro=True)
    code, _, err = run_cli(build_args(builder_vm.port, vm_root, payload, wheel), azure.env(), azure.factory())
    assert code == 1
    assert "creating image peer-pod-vmimage" in err and "injected: image creation failed" in err, err
    assert azure.image("peer-pod-vmimage") is None, "the failed image is deleted"
    assert azure.leftovers() == {}


def customdata_of(vm: dict) -> str:
    return base64.b64decode(vm["properties"]["osProfile"]["customData"]).decode()


def test_a_builder_vm_offering_another_host_key_is_refused_before_logging_in(azure, vm_root, payload, wheel):
    with FakeSshHost(username="peerpod") as impostor:  # its own host key, not the one the build gave the VM
        args = build_args(impostor.port, vm_root, payload, wheel)
        args[args.index("--ssh-timeout") + 1] = "1s"
        code, _, err = run_cli(args, azure.env(), azure.factory())
    assert code == 1 and "is not the one this build gave the VM" in err, err
    assert impostor.logins == [] and impostor.uploads == [] and impostor.commands == [], "nothing sent to an impostor"
    assert azure.leftovers() == {}


def test_the_build_needs_no_private_key_of_the_ssh_key_secret(azure, builder_vm, vm_root, payload, wheel):
    assert not list(azure.public_key.parent.glob("id_rsa")), "only the public key is there"
    code, _, err = run_cli(build_args(builder_vm.port, vm_root, payload, wheel), azure.env(), azure.factory())
    assert code == 0, err


def test_existing_image_needs_replace_which_swaps_it_for_a_new_one(azure, builder_vm, vm_root, payload, wheel):
    old = azure.arm.add_image(azure.resource_group, "peer-pod-vmimage")
    code, _, err = run_cli(build_args(builder_vm.port, vm_root, payload, wheel), azure.env(), azure.factory())
    assert code == 1 and "already exists" in err and azure.arm.count("PUT", "/virtualMachines/") == 0
    code, out, err = run_cli(build_args(builder_vm.port, vm_root, payload, wheel, "--replace"), azure.env(),
                             azure.factory())
    assert code == 0, err
    assert out.strip().lower() == old.lower()
    assert azure.image("peer-pod-vmimage")["properties"]["storageProfile"]["osDisk"]["osState"] == "Generalized"
    assert azure.arm.count("DELETE", "/images/peer-pod-vmimage") == 1


def test_list_and_delete(azure, builder_vm, vm_root, payload, wheel):
    azure.arm.add_image(azure.resource_group, "not-ours")
    code, out, _ = run_cli(build_args(builder_vm.port, vm_root, payload, wheel), azure.env(), azure.factory())
    image_id = out.strip()
    code, out, _ = run_cli(["list", "azure"], azure.env(), azure.factory())
    assert code == 0 and [line.split()[:2] for line in out.splitlines()[1:]] == [[image_id, "peer-pod-vmimage"]]
    code, out, _ = run_cli(["delete", "azure", "--id", image_id], azure.env(), azure.factory())
    assert code == 0 and out.strip() == f"deleted {image_id}"
    assert azure.image("peer-pod-vmimage") is None
