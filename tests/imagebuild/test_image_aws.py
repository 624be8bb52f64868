"""`image build aws` end to end: moto (server mode) for EC2, an in-process SSH server standing in for
the builder VM (it runs provision.py for real against a temporary root), a local Kubernetes API."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest
from buildworld import AGENT, CONFIGMAPS, NAMESPACE, assert_pod_vm_installed, make_payload, run_cli

from cloudadaptor import __version__
from cloudadaptor.imagebuild import progress as progress_module
from cloudadaptor.imagebuild.common import (
    TAG_AGENT_SHA256, TAG_BASE_IMAGE, TAG_BUILD, TAG_BUILDER_VERSION, TAG_BUILT_BY, TAG_PODVM_VERSION,
)
from cloudadaptor.providers.base import TAG_OWNER
from fakes.sshserver import FakeSshHost


@pytest.fixture
def builder_vm(aws) -> Iterator[FakeSshHost]:
    """The builder VM's SSH, serving the host key the builder instance's user data gives it (as cloud-init does)."""
    with FakeSshHost(host_key_source=aws.builder_host_key) as host:
        yield host


def build_args(aws, vm, root: Path, payload: Path, wheel: Path, *extra: str) -> list[str]:
    return ["build", "aws", "--base-image", aws.base_ami, "--agent-payload", str(payload), "--wheel", str(wheel),
            "--ssh-endpoint", f"127.0.0.1:{vm.port}", "--install-root", str(root), "--poll-interval", "0",
            "--ssh-timeout", "10s", *extra]


def tags_of(resource: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_build_provisions_over_ssh_creates_the_tagged_ami_updates_the_configmap_and_leaves_nothing(
        aws, builder_vm, vm_root, payload, wheel, kube):
    server, kubeconfig = kube
    started = time.monotonic()
    code, out, err = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel, "--update-configmap"),
                             aws.env(KUBECONFIG=str(kubeconfig)), aws.factory())
    elapsed = time.monotonic() - started
    assert code == 0, err
    image_id = out.strip()
    assert re.fullmatch(r"ami-[0-9a-f]+", image_id), out
    [image] = aws.images("peer-pod-ami")
    assert image["ImageId"] == image_id and image["State"] == "available"
    tags = tags_of(image)
    assert tags[TAG_BUILT_BY] == "cloud-api-adaptor image build"
    assert tags[TAG_BUILDER_VERSION] == __version__ and tags[TAG_PODVM_VERSION] == __version__
    assert tags[TAG_BASE_IMAGE] == aws.base_ami
    assert tags[TAG_AGENT_SHA256] == __import__("hashlib").sha256(AGENT).hexdigest()
    assert tags["cluster"] == "test-cluster", "TAGS go on the image too"
    snapshots = aws.ec2.describe_snapshots(SnapshotIds=[image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]])
    assert tags_of(snapshots["Snapshots"][0])[TAG_BUILT_BY] == "cloud-api-adaptor image build"
    assert aws.leftovers() == {}
    assert_pod_vm_installed(vm_root)
    assert [user for user, _ in builder_vm.logins] == ["ec2-user"]
    workdirs = set(re.findall(r"/tmp/peerpod-image\.\w+", " ".join(builder_vm.commands))) - {"/tmp/peerpod-image.XXXXXX"}
    assert len(workdirs) == 1 and not Path(workdirs.pop()).exists(), "seal removes the uploaded files"
    configmap = server.server.get(CONFIGMAPS, "peer-pods-cm", NAMESPACE)
    assert configmap["data"] == {"CLOUD_PROVIDER": "aws", "VXLAN_PORT": "9000", "PODVM_AMI_ID": image_id}
    assert "[6/10] provisioning" in err and "| ==> [7/7] enabling the units" in err, err
    print(f"\nAWS build against moto + loopback SSH: {elapsed:.2f}s")


def test_builder_vm_is_tagged_with_its_build_and_never_as_a_pod_vm(aws, builder_vm, vm_root, payload, wheel):
    code, _, err = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel), aws.env(), aws.factory())
    assert code == 0, err
    [reservation] = aws.ec2.describe_instances(Filters=[{"Name": "tag-key", "Values": [TAG_BUILD]}])["Reservations"]
    tags = tags_of(reservation["Instances"][0])
    assert tags["Name"].startswith("peerpod-image-builder-")
    assert TAG_OWNER not in tags, "the peerpod-controller would sweep a VM tagged as a pod VM"


def test_ssh_that_never_comes_up_fails_clearly_within_the_timeout_and_removes_everything(
        aws, vm_root, payload, wheel):
    port = closed_port()
    args = build_args(aws, type("Vm", (), {"port": port}), vm_root, payload, wheel)
    args[args.index("--ssh-timeout") + 1] = "1s"
    started = time.monotonic()
    code, out, err = run_cli(args, aws.env(), aws.factory())
    assert code == 1 and out == ""
    assert time.monotonic() - started < 10
    assert "did not answer within 1s" in err and f"127.0.0.1:{port}" in err, err
    assert aws.leftovers() == {} and aws.images("peer-pod-ami") == []


def test_provisioning_that_fails_half_way_names_the_step_and_removes_everything(
        aws, builder_vm, vm_root, payload, wheel):
    (vm_root / "etc").mkdir()
    (vm_root / "etc" / "systemd").write_text("a file where a directory must go\n")
    code, _, err = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel), aws.env(), aws.factory())
    assert code == 1
    assert "provisioning failed at step 6/7 (configuration and systemd units)" in err, err
    assert "Not a directory" in err, "the end of the remote output is shown"
    assert (vm_root / "usr/local/bin/kata-agent").exists(), "the steps before the failing one ran"
    assert aws.leftovers() == {} and aws.images("peer-pod-ami") == []


def test_image_that_fails_to_become_available_is_deregistered_with_its_snapshots(
        aws, builder_vm, vm_root, payload, wheel):
    def fail_images(ec2) -> None:
        def failed(parsed, **kwargs) -> None:
            for image in parsed.get("Images", []):
                if image.get("Name") == "peer-pod-ami":
                    image["State"] = "failed"
                    image["StateReason"] = {"Code": "Client.InternalError", "Message": "injected snapshot failure"}
        ec2.meta.events.register("after-call.ec2.DescribeImages", failed)

    code, _, err = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel), aws.env(), aws.factory(fail_images))
    assert code == 1
    assert "did not become available (state failed: injected snapshot failure)" in err, err
    assert aws.images("peer-pod-ami") == []
    made = [s for s in aws.ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
            if s.get("Description", "").startswith("Created by CreateImage(")]
    assert made == [], "the failed image's snapshot is deleted"
    assert aws.leftovers() == {}


def test_existing_image_is_an_error_before_any_resource_is_made(aws, builder_vm, vm_root, payload, wheel):
    aws.ec2.register_image(Name="peer-pod-ami")
    calls: list[str] = []
    factory = aws.factory(lambda ec2: ec2.meta.events.register("before-call.ec2.*", lambda model, **kw: calls.append(model.name)))
    code, _, err = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel), aws.env(), factory)
    assert code == 1 and "an image named peer-pod-ami already exists" in err and "--replace" in err
    assert "RunInstances" not in calls and "CreateKeyPair" not in calls
    assert builder_vm.logins == []


def test_replace_deletes_the_old_image_and_its_snapshots_and_builds_a_new_one(aws, builder_vm, vm_root, payload, wheel):
    code, out, _ = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel), aws.env(), aws.factory())
    old = out.strip()
    old_snapshot = aws.images("peer-pod-ami")[0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    code, out, err = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel, "--replace"), aws.env(), aws.factory())
    assert code == 0, err
    assert [i["ImageId"] for i in aws.images("peer-pod-ami")] == [out.strip()] != [old]
    assert old_snapshot not in {s["SnapshotId"] for s in aws.ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}


def test_keep_existing_prints_the_existing_image_and_builds_nothing(aws, builder_vm, vm_root, payload, wheel, kube):
    server, kubeconfig = kube
    existing = aws.ec2.register_image(Name="peer-pod-ami")["ImageId"]
    code, out, err = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel, "--keep-existing", "--update-configmap"),
                             aws.env(KUBECONFIG=str(kubeconfig)), aws.factory())
    assert code == 0, err
    assert out.strip() == existing and builder_vm.logins == []
    assert server.server.get(CONFIGMAPS, "peer-pods-cm", NAMESPACE)["data"]["PODVM_AMI_ID"] == existing


def test_ctrl_c_while_provisioning_removes_every_temporary_resource(
        aws, builder_vm, vm_root, payload, wheel, monkeypatch):
    remote = progress_module.Progress.remote

    def interrupted(self, line: str) -> None:
        remote(self, line)
        if "==> [3/7]" in line:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread while output streams

    monkeypatch.setattr(progress_module.Progress, "remote", interrupted)
    code, out, err = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel), aws.env(), aws.factory())
    assert code == 130 and out == ""
    assert "interrupted; temporary resources removed" in err
    assert aws.leftovers() == {} and aws.images("peer-pod-ami") == []


def test_cleanup_errors_are_reported_with_what_is_left_and_the_rest_is_still_removed(
        aws, builder_vm, vm_root, payload, wheel):
    def refuse_key_deletion(ec2) -> None:
        def refuse(params, **kwargs):
            from botocore.exceptions import ClientError
            raise ClientError({"Error": {"Code": "UnauthorizedOperation", "Message": "injected: not allowed"}},
                              "DeleteKeyPair")
        ec2.meta.events.register("before-call.ec2.DeleteKeyPair", refuse)

    code, out, err = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel), aws.env(),
                             aws.factory(refuse_key_deletion))
    assert code == 3, err
    assert re.search(r"key pair peerpod-image-builder-\w+: .*injected: not allowed", err), err
    assert list(aws.leftovers()) == ["key pairs"], "everything else was still removed"


def test_a_payload_without_the_agent_is_refused_before_anything_is_made(aws, builder_vm, vm_root, wheel, tmp_path):
    bad = make_payload(tmp_path / "bad.tar.gz", {"./usr/bin/something-else": b"x"})
    calls: list[str] = []
    factory = aws.factory(lambda ec2: ec2.meta.events.register("before-call.ec2.*", lambda model, **kw: calls.append(model.name)))
    code, _, err = run_cli(build_args(aws, builder_vm, vm_root, bad, wheel), aws.env(), factory)
    assert code == 1 and "no kata-agent binary in the archive" in err and "usr/bin/kata-agent" in err
    assert calls == []


def test_list_shows_built_images_and_delete_removes_the_image_and_its_snapshots(
        aws, builder_vm, vm_root, payload, wheel):
    aws.ec2.register_image(Name="not-ours")
    code, out, _ = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel), aws.env(), aws.factory())
    image_id = out.strip()
    snapshot = aws.images("peer-pod-ami")[0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    code, out, _ = run_cli(["list", "aws"], aws.env(), aws.factory())
    assert code == 0
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [[image_id, "peer-pod-ami"]]
    code, out, _ = run_cli(["delete", "aws"], aws.env(), aws.factory())
    assert code == 0 and out.strip() == f"deleted {image_id}"
    assert aws.images("peer-pod-ami") == []
    assert snapshot not in {s["SnapshotId"] for s in aws.ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    code, _, err = run_cli(["delete", "aws"], aws.env(), aws.factory())
    assert code == 1 and "no image named peer-pod-ami" in err


def test_without_a_base_image_the_newest_rhel9_of_red_hat_is_required(aws, builder_vm, vm_root, payload, wheel):
    args = build_args(aws, builder_vm, vm_root, payload, wheel)
    del args[args.index("--base-image"):args.index("--base-image") + 2]
    code, _, err = run_cli(args, aws.env(), aws.factory())
    assert code == 1 and "no RHEL 9 AMI of Red Hat (owner 309956199498" in err and "--base-image" in err
    assert aws.leftovers() == {}


def test_bad_settings_are_refused_with_one_line_per_key(aws, builder_vm, vm_root, payload, wheel):
    code, _, err = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel),
                           aws.env(AWS_SUBNET_ID="subnet-nope", AWS_SECRET_ACCESS_KEY=""), aws.factory())
    assert code == 2
    assert 'AWS_SUBNET_ID="subnet-nope"' in err and "AWS_SECRET_ACCESS_KEY" in err


def test_a_build_needs_an_agent_payload_from_the_flag_or_podvm_agent_payload(aws, builder_vm, vm_root, payload, wheel):
    args = build_args(aws, builder_vm, vm_root, payload, wheel)
    del args[args.index("--agent-payload"):args.index("--agent-payload") + 2]
    code, _, err = run_cli(args, aws.env(), aws.factory())
    assert code == 1 and "PODVM_AGENT_PAYLOAD" in err
    code, out, err = run_cli(args, aws.env(PODVM_AGENT_PAYLOAD=str(payload)), aws.factory())
    assert code == 0, err


def test_a_builder_vm_offering_another_host_key_is_refused_before_logging_in(aws, vm_root, payload, wheel):
    with FakeSshHost() as impostor:  # its own host key, not the one the build gave the instance
        args = build_args(aws, impostor, vm_root, payload, wheel)
        args[args.index("--ssh-timeout") + 1] = "1s"
        code, _, err = run_cli(args, aws.env(), aws.factory())
    assert code == 1 and "is not the one this build gave the VM" in err, err
    assert impostor.logins == [] and impostor.uploads == [] and impostor.commands == [], "nothing sent to an impostor"
    assert aws.leftovers() == {}


def test_the_builder_gets_its_own_host_key_through_user_data_and_only_that_key_is_accepted(
        aws, builder_vm, vm_root, payload, wheel):
    code, _, err = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel), aws.env(), aws.factory())
    assert code == 0, err
    pinned = aws.builder_host_key()
    assert pinned is not None and set(builder_vm.served_host_keys) == {pinned.fingerprint}
    assert builder_vm.logins, "logged in once the host key matched"


def test_a_bad_payload_sha256_is_refused_naming_the_key(aws, builder_vm, vm_root, payload, wheel):
    code, _, err = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel, "--agent-payload-sha256", "abc"),
                           aws.env(), aws.factory())
    assert code == 2 and "PODVM_AGENT_PAYLOAD_SHA256" in err, err
    code, _, err = run_cli(build_args(aws, builder_vm, vm_root, payload, wheel), aws.env(PODVM_AGENT_PAYLOAD_SHA256="0" * 64),
                           aws.factory())
    assert code == 1 and "refusing it" in err and builder_vm.logins == [], err
