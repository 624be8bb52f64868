"""The image builder's parts: cleanup stack, signals, progress display, SSH waits, inputs, wheel, retries."""

from __future__ import annotations

import http.server
import io
import os
import signal
import socket
import threading
import time
import zipfile
from pathlib import Path

import paramiko
import pytest
from buildworld import AGENT, make_payload, run_cli

from cloudadaptor import __version__
from cloudadaptor.imagebuild import inputs
from cloudadaptor.imagebuild.cleanup import CleanupError, CleanupStack, Terminated, interruptible
from cloudadaptor.imagebuild.common import BuildError, SshAccess, builder_backoff
from cloudadaptor.imagebuild.progress import Progress
from cloudadaptor.imagebuild.ssh import SshUnavailable, wait_for_ssh
from cloudadaptor.imagebuild.wheel import build_wheel, wheel_version
from cloudadaptor.retry import retry_call
from fakes.sshserver import FakeSshHost

# ------------------------------------------------------------------ cleanup stack


def test_cleanup_runs_every_undo_newest_first_even_after_one_fails_and_reports_the_failure():
    ran: list[str] = []
    stack = CleanupStack(report=lambda text: None)
    stack.push("disk", lambda: ran.append("disk"))
    stack.push("nic", lambda: (_ for _ in ()).throw(RuntimeError("nic still in use")))
    stack.push("vm", lambda: ran.append("vm"))
    with pytest.raises(CleanupError) as caught:
        with stack:
            pass
    assert ran == ["vm", "disk"]
    assert [(f.what, f.error) for f in caught.value.failures] == [("nic", "nic still in use")]
    assert "remove them by hand" in str(caught.value) and "nic: nic still in use" in str(caught.value)


def test_cleanup_after_a_failure_keeps_the_original_error_and_runs_failure_only_undos():
    ran: list[str] = []
    with pytest.raises(BuildError, match="boom"):
        with CleanupStack(report=lambda text: None) as stack:
            stack.push("vm", lambda: ran.append("vm"))
            stack.push("half-made image", lambda: ran.append("image"), on_success=False)
            raise BuildError("boom")
    assert ran == ["image", "vm"]


def test_failure_only_undos_are_skipped_on_success():
    ran: list[str] = []
    with CleanupStack(report=lambda text: None) as stack:
        stack.push("image", lambda: ran.append("image"), on_success=False)
        stack.push("vm", lambda: ran.append("vm"))
    assert ran == ["vm"]


def test_cleanup_runs_on_ctrl_c_and_lets_the_interrupt_through():
    ran: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with CleanupStack(report=lambda text: None) as stack:
            stack.push("vm", lambda: ran.append("vm"))
            raise KeyboardInterrupt
    assert ran == ["vm"]


def test_a_second_ctrl_c_during_cleanup_waits_until_every_undo_ran():
    ran: list[str] = []

    def slow_undo() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again while cleaning up
        time.sleep(0.05)
        ran.append("vm")

    with pytest.raises(KeyboardInterrupt):
        with CleanupStack(report=lambda text: None) as stack:
            stack.push("key", lambda: ran.append("key"))
            stack.push("vm", slow_undo)
    assert ran == ["vm", "key"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_cleanup_errors_after_an_interrupt_name_the_interrupt():
    with pytest.raises(CleanupError) as caught:
        with CleanupStack(report=lambda text: None) as stack:
            stack.push("vm", lambda: (_ for _ in ()).throw(RuntimeError("throttled")))
            raise Terminated
    assert isinstance(caught.value.cause, Terminated)
    assert str(caught.value).startswith("the build failed (terminated by SIGTERM), then")


def test_sigterm_becomes_terminated_inside_interruptible_only():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with interruptible():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) == before


# ------------------------------------------------------------------ progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_in_a_log_prints_steps_with_elapsed_time_and_every_remote_line():
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(["launch", "provision"], out, live=False, clock=clock)
    progress.step("launch")
    clock.now += 75
    progress.step("provision")
    progress.remote("==> [2/7] OS packages")
    progress.remote("installing")
    clock.now += 5
    progress.finish("image ami-1")
    assert out.getvalue().splitlines() == [
        "[1/2] launch  (elapsed 00:00)",
        "[2/2] provision  (elapsed 01:15)",
        "      | ==> [2/7] OS packages",
        "      | installing",
        "image ami-1  (total 01:20)",
    ]
    assert progress.durations == {"launch": 75, "provision": 5}
    assert progress.remote_step == "2/7 OS packages"


def test_progress_on_a_terminal_redraws_the_step_and_the_tail_of_the_remote_output():
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(["provision"], out, live=True, clock=clock, tail_lines=2)
    progress.step("provision")
    for line in ("==> [4/7] pod VM components", "one", "two", "three"):
        clock.now += 1
        progress.remote(line)
    screen = out.getvalue()
    last = screen.rsplit("\x1b[J", 1)[1]
    assert last.splitlines() == ["[1/1] provision  00:04  remote step 4/7 pod VM components", "      | two", "      | three"]
    assert "\x1b[3F" in screen, "the previous block is overwritten"
    assert progress.tail() == ["==> [4/7] pod VM components", "one", "two", "three"]


# ------------------------------------------------------------------ SSH


def test_wait_for_ssh_retries_refused_logins_until_the_key_is_installed():
    key = paramiko.RSAKey.generate(2048)
    with FakeSshHost(username="ec2-user", fail_logins=2) as vm:
        host = wait_for_ssh(SshAccess("127.0.0.1", vm.port, "ec2-user", key), timeout=10, interval=0.01)
        try:
            lines: list[str] = []
            assert host.run("echo out; echo err >&2; exit 7", lines.append, timeout=10) == 7
            assert lines == ["out", "err"]
        finally:
            host.close()
    assert len(vm.refused) == 2 and len(vm.logins) == 1


def test_a_pinned_host_key_is_required_and_any_other_is_refused_before_login():
    from cloudadaptor.imagebuild import buildkeys

    key = paramiko.RSAKey.generate(2048)
    with FakeSshHost() as vm:
        host = wait_for_ssh(SshAccess("127.0.0.1", vm.port, "u", key, vm.host_key), timeout=10, interval=0.01)
        host.close()
        assert len(vm.logins) == 1, "the right host key: logged in"
        with pytest.raises(SshUnavailable, match="is not the one this build gave the VM.*nothing was sent to it"):
            wait_for_ssh(SshAccess("127.0.0.1", vm.port, "u", key, buildkeys.new_host_key()), timeout=0.5, interval=0.05)
        with pytest.raises(SshUnavailable, match="host key"):  # another key type than the pinned one
            wait_for_ssh(SshAccess("127.0.0.1", vm.port, "u", key, paramiko.RSAKey.generate(1024)), timeout=0.5, interval=0.05)
    assert len(vm.logins) == 1, "no login with a wrong host key"


def test_the_host_key_cloud_config_installs_only_the_builds_key():
    import yaml

    from cloudadaptor.imagebuild import buildkeys

    key = buildkeys.new_host_key()
    document = yaml.safe_load(buildkeys.host_key_cloud_config(key))
    assert document["ssh_deletekeys"] is True and document["ssh_genkeytypes"] == []
    assert document["ssh_keys"]["ecdsa_public"] == buildkeys.public_line(key)
    installed = paramiko.ECDSAKey.from_private_key(__import__("io").StringIO(document["ssh_keys"]["ecdsa_private"]))
    assert installed.fingerprint == key.fingerprint


def test_wait_for_ssh_gives_up_at_its_timeout_naming_the_endpoint_and_the_last_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(SshUnavailable) as caught:
        wait_for_ssh(SshAccess("127.0.0.1", port, "ec2-user", paramiko.RSAKey.generate(1024)), timeout=0.3, interval=0.05)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"ec2-user@127.0.0.1:{port}" in message and "within 0.3s" in message and "refused" in message.lower()


def test_a_remote_command_past_its_time_limit_is_an_error():
    key = paramiko.RSAKey.generate(2048)
    with FakeSshHost() as vm:
        host = wait_for_ssh(SshAccess("127.0.0.1", vm.port, "u", key), timeout=10, interval=0.01)
        try:
            started = time.monotonic()
            with pytest.raises(BuildError, match="still running after its time limit"):
                host.run("sleep 30", lambda line: None, timeout=0.2)
            assert time.monotonic() - started < 5
        finally:
            host.close()
    assert vm.statuses == [137], "the command is killed when its channel closes (as sshd hangs up)"


# ------------------------------------------------------------------ inputs


@pytest.fixture
def https_files(tmp_path, monkeypatch):
    """(directory served, base URL): an HTTPS server on loopback with a throw-away CA the download trusts."""
    import ssl

    from cloudadaptor.tlscerts import CertificateAuthority

    served = tmp_path / "served"
    served.mkdir()
    ca = CertificateAuthority.create("payload test CA")
    cert, key = ca.issue("127.0.0.1", server=True, ip_addresses=["127.0.0.1"])
    for name, text in (("ca.pem", ca.cert_pem), ("server.pem", cert), ("server.key", key)):
        (tmp_path / name).write_text(text)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def sha256_of(path) -> str:
    return __import__("hashlib").sha256(path.read_bytes()).hexdigest()


def test_payload_is_downloaded_from_an_https_url_with_its_sha256(tmp_path, https_files):
    served, base_url = https_files
    archive = make_payload(served / "payload.tar.gz")
    url = f"{base_url}/payload.tar.gz"
    fetched = inputs.fetch_payload(url, tmp_path, expect_sha256=sha256_of(archive))
    assert fetched.read_bytes() == archive.read_bytes()
    with pytest.raises(BuildError, match="download failed: HTTP 404") as caught:
        inputs.fetch_payload(url.replace("payload", "missing") + "?X-Amz-Signature=s3cr3t", tmp_path, expect_sha256="0" * 64)
    assert "s3cr3t" not in str(caught.value), "a presigned URL's signature stays out of messages"


def test_a_downloaded_payload_with_another_sha256_is_refused(tmp_path, https_files, wheel):
    served, base_url = https_files
    make_payload(served / "payload.tar.gz")
    with pytest.raises(BuildError, match="sha256 is [0-9a-f]{64}, not 1{64} .PODVM_AGENT_PAYLOAD_SHA256.; refusing it"):
        inputs.gather(f"{base_url}/payload.tar.gz", wheel, None, tmp_path, "1" * 64)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/payload.tar.gz", "ftp://downloads.example.com/payload.tar"])
def test_a_payload_url_that_is_not_https_is_refused_before_any_download(tmp_path, url):
    with pytest.raises(BuildError, match="only https URLs or local paths"):
        inputs.fetch_payload(url, tmp_path, expect_sha256="0" * 64)


def test_a_payload_download_without_an_expected_sha256_is_refused(tmp_path):
    with pytest.raises(BuildError, match="PODVM_AGENT_PAYLOAD_SHA256"):
        inputs.fetch_payload("https://downloads.example.com/payload.tar.gz", tmp_path)


def test_a_local_payload_is_checked_against_its_sha256_when_one_is_given(tmp_path, payload, wheel):
    assert inputs.gather(str(payload), wheel, None, tmp_path, sha256_of(payload)).payload == payload
    with pytest.raises(BuildError, match="refusing it"):
        inputs.gather(str(payload), wheel, None, tmp_path, "f" * 64)
    assert inputs.parse_sha256("sha256:" + "AB" * 32) == "ab" * 32
    with pytest.raises(ValueError, match="64 hex digits"):
        inputs.parse_sha256("abc")


def test_gather_checks_payload_and_wheel_before_anything_else(tmp_path, payload, wheel):
    gathered = inputs.gather(str(payload), wheel, None, tmp_path)
    assert gathered.podvm_dir == inputs.SOURCE_PODVM and gathered.wheel_version == __version__
    assert gathered.agent_sha256 == __import__("hashlib").sha256(AGENT).hexdigest()
    with pytest.raises(BuildError, match="no such file"):
        inputs.gather(str(tmp_path / "nope.tar"), wheel, None, tmp_path)
    with pytest.raises(BuildError, match="--wheel: .* is not a wheel file name"):
        inputs.gather(str(payload), payload, None, tmp_path)
    with pytest.raises(BuildError, match="pass --podvm-files"):
        inputs.gather(str(payload), wheel, tmp_path, tmp_path)


def test_the_wheel_holds_the_package_and_its_metadata_and_is_reproducible(tmp_path):
    first = build_wheel(tmp_path / "a")
    second = build_wheel(tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    assert wheel_version(first) == __version__
    with zipfile.ZipFile(first) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"cloudadaptor-{__version__}.dist-info/METADATA").decode()
    assert {"cloudadaptor/cli.py", "cloudadaptor/podvm/forwarder.py"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "Requires-Dist: pyroute2" in metadata


# ------------------------------------------------------------------ retries and CLI


def test_retry_call_retries_only_the_retryable_error_until_it_passes():
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("DependencyViolation")
        return "done"

    assert retry_call(flaky, timeout=5, backoff=builder_backoff(0), retryable=lambda e: "Dependency" in str(e)) == "done"
    assert len(attempts) == 3
    with pytest.raises(ValueError):
        retry_call(lambda: (_ for _ in ()).throw(ValueError("other")), timeout=5, backoff=builder_backoff(0),
                   retryable=lambda e: isinstance(e, RuntimeError))


def test_replace_and_keep_existing_exclude_each_other():
    from cloudadaptor.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["image", "build", "aws", "--replace", "--keep-existing"])
    args = build_parser().parse_args(["image", "build", "azure", "--ssh-endpoint", "127.0.0.1:2222", "--ssh-timeout", "90s"])
    assert args.ssh_endpoint == ("127.0.0.1", 2222) and args.ssh_timeout == 90.0


def test_update_configmap_without_kubernetes_fails_clearly(tmp_path, payload, wheel):
    from cloudadaptor.imagebuild import configmap

    with pytest.raises(BuildError, match="no Kubernetes configuration"):
        configmap.update({}, "ns", "PODVM_AMI_ID", "ami-1")
    with pytest.raises(BuildError, match="KUBECONFIG"):
        configmap.update({"KUBECONFIG": str(tmp_path / "missing")}, "ns", "PODVM_AMI_ID", "ami-1")


def test_configuration_problems_reach_the_operator_as_one_line_each(tmp_path):
    def factory(cloud, env, args):
        from cloudadaptor.imagebuild import azure

        azure.load_config(env)

    code, out, err = run_cli(["build", "azure"], {"AZURE_REGION": "East US", "AZURE_SUBSCRIPTION_ID": "nope"}, factory)
    assert code == 2 and out == ""
    assert "AZURE_SUBSCRIPTION_ID=\"nope\"" in err and "AZURE_RESOURCE_GROUP is not set" in err


def test_payload_urls_are_recorded_without_credentials_or_query():
    from cloudadaptor.imagebuild.common import TAG_AGENT_PAYLOAD, BuildInputs, image_tags, source_label

    url = "https://user:pw@downloads.example.com:8443/podvm/payload.tar.gz?X-Amz-Signature=s3cr3t#x"
    assert source_label(url) == "https://downloads.example.com:8443/podvm/payload.tar.gz"
    assert source_label("/srv/payload.tar.gz") == "/srv/payload.tar.gz"
    inputs_ = BuildInputs(Path("."), Path("w.whl"), "1", Path("p"), url, "0" * 64)
    assert image_tags(inputs_, "ami-1", "b1", {})[TAG_AGENT_PAYLOAD] == "payload.tar.gz"
