"""The `cloud-api-adaptor` command as operators run it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SECRET = "wJalrXUtnFEMI-very-secret-value"


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_", "LOCAL_")) and k not in ("CLOUD_PROVIDER",)}
    return subprocess.run([sys.executable, "-m", "cloudadaptor.cli", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_version():
    result = run("version")
    assert result.returncode == 0 and result.stdout.startswith("cloud-api-adaptor ")


@pytest.mark.parametrize("command", [[], ["serve"], ["config", "check"], ["forwarder"], ["process-user-data"], ["pod-network"], ["demo"]])
def test_every_subcommand_has_help(command):
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: cloud-api-adaptor" in result.stdout


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
