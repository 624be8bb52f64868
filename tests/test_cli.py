"""The `cloud-api-adaptor` command as operators run it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from cloudadaptor.cli import build_parser

SECRET = "wJalrXUtnFEMI-very-secret-value"


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_", "LOCAL_")) and k not in ("CLOUD_PROVIDER",)}
    return subprocess.run([sys.executable, "-m", "cloudadaptor.cli", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_version():
    result = run("version")
    assert result.returncode == 0 and result.stdout.startswith("cloud-api-adaptor ")


# Every command line an operator can type, with words its --help must carry (a flag or action of its own).
HELP = {
    (): ("serve", "peerpod-controller", "process-user-data", "wait-for-claim", "image", "version"),
    ("serve",): ("[CLOUD_PROVIDER]", "--proxy-timeout", "--grpc-endpoint"),
    ("config",): ("check",),
    ("config", "check"): ("[PROXY_TIMEOUT]", "--node-name"),
    ("aws",): ("open-ports",),
    ("aws", "open-ports"): ("--group-id", "--vxlan-port"),
    ("azure",): ("open-ports",),
    ("azure", "open-ports"): ("--nsg-id", "--prefix", "--vxlan-port"),
    ("forwarder",): ("--kata-agent-socket", "--config", "--port"),
    ("pod-network",): ("--config", "--podns"),
    ("process-user-data",): ("--source", "--imds-url", "--deadline", "--root"),
    ("wait-for-claim",): ("--config", "--root", "--port"),
    ("image",): ("build", "list", "delete"),
    ("image", "build"): ("--agent-payload", "--base-image", "--replace", "--keep-existing", "--update-configmap",
                         "--rebuild", "--cache-dir"),
    ("image", "list"): ("{aws,azure,local}", "--cache-dir"),
    ("image", "delete"): ("--name", "--id"),
    ("peerpod-controller",): ("[PEERPOD_CONTROLLER_INTERVAL]", "--sweep-grace", "--once"),
    ("webhook",): ("[WEBHOOK_ADDRESS]", "--tls-cert", "--tls-key", "--runtime-class"),
    ("probe",): ("--socket", "--timeout", "startup probe"),
    ("demo",): ("--pods", "--boot-delay", "--vm"),
    ("console",): ("POD|SANDBOX_ID", "--lines"),
    ("diagnose",): ("--output", "--log-lines"),
    ("version",): ("usage: cloud-api-adaptor version",),
}


def _command_lines(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    lines = {prefix}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                lines |= _command_lines(child, (*prefix, name))
    return lines


def test_the_help_table_covers_every_subcommand():
    assert _command_lines(build_parser()) == set(HELP), "a subcommand without a --help check (add it to HELP)"


@pytest.mark.parametrize("command", sorted(HELP), ids=lambda c: " ".join(c) or "(top)")
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(" ".join(("usage: cloud-api-adaptor", *command))), out
    for words in HELP[command]:
        assert words in out, f"{' '.join(command)} --help does not mention {words!r}:\n{out}"


def test_help_runs_as_a_process_without_importing_the_cloud_sdks():
    probe = ("import sys; from cloudadaptor.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('boto3', 'azure.mgmt.compute', 'kubernetes_asyncio', 'aiohttp') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", "SDKs are imported only when a command runs"
    result = run("--help")
    assert result.returncode == 0 and "usage: cloud-api-adaptor" in result.stdout


def test_serve_loads_no_other_subcommand_and_no_kubernetes_client_outside_a_cluster():
    # Idle memory of `serve` (bench: daemon RSS idle): the image builder, the pod VM
    # commands and the Kubernetes client stay out of the daemon unless it needs them.
    probe = ("import sys; from cloudadaptor.cli import build_parser; build_parser(['serve']); "
             "from cloudadaptor.k8s import cluster_configured; assert not cluster_configured({}); "
             "assert cluster_configured({'KUBECONFIG': '/k'}) and cluster_configured({'KUBERNETES_SERVICE_HOST': 'h'}); "
             "print(sorted(m for m in ('cloudadaptor.imagebuild.command', 'cloudadaptor.podvm.process_user_data', "
             "'cloudadaptor.podvm.forwarder', 'kubernetes_asyncio', 'yaml') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"serve imported other commands' modules: {result.stdout}"
    result = run("image", "--help")
    assert result.returncode == 0 and "build" in result.stdout, "the chosen subcommand is still mounted"


def test_the_daemon_and_its_probe_endpoint_import_no_http_framework_grpc_or_cloud_sdk():
    # Idle memory (bench: daemon RSS idle): /metrics, /healthz and /startup are served by the
    # standard library's HTTP server, gRPC only with GRPC_ENDPOINT, an SDK only with its provider.
    probe = ("import sys; import cloudadaptor.adaptor.daemon, cloudadaptor.probes; "
             "print(sorted(m for m in ('aiohttp', 'grpc', 'kubernetes_asyncio', 'boto3', 'botocore', 'azure', "
             "'cloudadaptor.adaptor.grpc_binding') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the daemon module imported: {result.stdout}"


def test_an_unknown_subcommand_exits_2_naming_the_choices():
    result = run("launch")
    assert result.returncode == 2
    assert "invalid choice: 'launch'" in result.stderr and "peerpod-controller" in result.stderr


def test_aws_open_ports_refuses_a_malformed_group_id_before_calling_aws():
    result = run("aws", "open-ports", "--group-id", "not-a-group")
    assert result.returncode == 2
    assert "security group id" in result.stderr, result.stderr


def test_azure_open_ports_without_settings_lists_the_problems():
    result = run("azure", "open-ports")
    assert result.returncode == 2
    assert result.stderr.startswith("configuration refused (")
    assert "AZURE_SUBSCRIPTION_ID" in result.stderr


def test_image_build_without_settings_exits_2_naming_the_action():
    result = run("image", "build", "azure")
    assert result.returncode == 2
    assert result.stderr.startswith("image build: configuration refused ("), result.stderr


def test_process_user_data_from_a_file_needs_the_file():
    result = run("process-user-data", "--source", "file")
    assert result.returncode == 2 and "--source file needs --file PATH" in result.stderr


def test_pod_network_without_apf_json_fails_naming_the_file(tmp_path):
    result = run("pod-network", "--config", str(tmp_path / "apf.json"))
    assert result.returncode == 1
    assert f"pod-network: cannot read {tmp_path / 'apf.json'}" in result.stderr


def test_config_check_prints_effective_settings_with_secrets_masked():
    result = run("config", "check", env={"CLOUD_PROVIDER": "local", "AWS_SECRET_ACCESS_KEY": SECRET, "PROXY_TIMEOUT": "90s"})
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "<hidden>" in lines["AWS_SECRET_ACCESS_KEY"]
    assert "90s" in lines["PROXY_TIMEOUT"] and "(env)" in lines["PROXY_TIMEOUT"]
    assert "9000" in lines["VXLAN_PORT"] and "(default)" in lines["VXLAN_PORT"]
    assert "LOCAL_CLOUD_CIDR" in lines, "provider keys are listed too"


def test_config_check_lists_every_problem_and_exits_nonzero():
    result = run("config", "check", env={"CLOUD_PROVIDER": "local", "VXLAN_PORT": "99999", "PROXY_TIMEOUT": "ten minutes",
                                          "TLS_MIN_VERSION": "1.0", "LOCAL_CLOUD_CIDR": "not-a-cidr", "AWS_SECRET_ACCESS_KEY": SECRET})
    assert result.returncode == 1
    for key in ("VXLAN_PORT", "PROXY_TIMEOUT", "TLS_MIN_VERSION", "LOCAL_CLOUD_CIDR"):
        assert key in result.stderr, f"{key} missing from:\n{result.stderr}"
    assert "99999" in result.stderr and SECRET not in result.stdout + result.stderr


def test_unknown_cloud_provider_names_the_valid_ones():
    result = run("config", "check", env={"CLOUD_PROVIDER": "gcp"})
    assert result.returncode == 1
    assert "CLOUD_PROVIDER" in result.stderr and "gcp" in result.stderr and "local" in result.stderr


def test_serve_refuses_bad_configuration_before_doing_anything(tmp_path):
    result = run("serve", "--state-dir", str(tmp_path), env={"CLOUD_PROVIDER": "local", "PROXY_TIMEOUT": "15m"})
    assert result.returncode == 2
    assert "PROXY_TIMEOUT" in result.stderr and "600" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_flags_override_the_environment():
    result = run("config", "check", "--proxy-timeout", "45s", env={"CLOUD_PROVIDER": "local", "PROXY_TIMEOUT": "5m"})
    line = next(line for line in result.stdout.splitlines() if line.startswith("PROXY_TIMEOUT"))
    assert "45s" in line and "(flag)" in line


def test_config_check_warns_without_allow_lists_and_keeps_exit_code_zero():
    result = run("config", "check", env={"CLOUD_PROVIDER": "local"})
    assert result.returncode == 0, result.stderr
    assert "warning: no allow-list" in result.stdout and "PODVM_IMAGES" in result.stdout
    assert "configuration OK" in result.stdout
    limited = run("config", "check", env={"CLOUD_PROVIDER": "local", "PODVM_IMAGES": "podvm.img"})
    assert limited.returncode == 0 and "no allow-list" not in limited.stdout


def test_config_check_names_keys_of_the_go_original_that_are_ignored():
    env = {"CLOUD_PROVIDER": "local", "PODVM_INSTANCE_TYPES": "small", "TUNNEL_TYPE": "vxlan",
           "REMOTE_HYPERVISOR_ENDPOINT": "/run/peerpod/hypervisor.sock", "PAUSE_IMAGE": ""}
    result = run("config", "check", env=env)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warned) == 2, warned
    assert any("TUNNEL_TYPE" in line and "ignored" in line for line in warned)
    assert any("REMOTE_HYPERVISOR_ENDPOINT" in line and "SOCKET" in line for line in warned)


def test_a_go_key_we_declare_is_not_reported():
    from cloudadaptor.configwarnings import GO_KEYS, config_warnings

    key = next(iter(GO_KEYS))
    env = {key: "x", "PODVM_IMAGES": "a"}
    assert config_warnings(env, declared=set()) and config_warnings(env, declared={key}) == []
