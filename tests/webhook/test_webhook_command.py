"""`cloud-api-adaptor webhook` as the Deployment runs it: settings from env/flags, HTTPS, clean stop."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sys

import aiohttp

from cloudadaptor.webhook.mutate import ANN_VCPUS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK_", "TARGET_"))}
    return {**base, **extra}


async def test_the_webhook_command_serves_reviews_over_https_and_stops_on_sigterm(tls):
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloudadaptor.cli", "webhook", "--address", f"127.0.0.1:{port}",
        "--tls-cert", str(tls.cert_file), "--tls-key", str(tls.key_file),
        env=clean_env(TARGET_RUNTIME_CLASS="kata-remote-cc"), stderr=asyncio.subprocess.PIPE)
    try:
        url = f"https://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(url + "/healthz", ssl=tls.client_context()) as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
                "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE", "namespace": "apps",
                "object": {"metadata": {"name": "p"}, "spec": {"runtimeClassName": "kata-remote-cc", "containers": [
                    {"name": "a", "image": "i", "resources": {"limits": {"cpu": "3"}}}]}}}}
            async with session.post(url + "/mutate-pods", json=review, ssl=tls.client_context()) as response:
                answer = await response.json()
        patch = json.loads(base64.b64decode(answer["response"]["patch"]))
        assert {"op": "add", "path": "/metadata/annotations", "value": {ANN_VCPUS: "3"}} in patch, "TARGET_RUNTIME_CLASS from env is honoured"
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode()


async def test_missing_certificates_are_refused_naming_the_keys(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloudadaptor.cli", "webhook", "--tls-cert", str(tmp_path / "nope.crt"),
        env=clean_env(WEBHOOK_TLS_KEY_FILE=str(tmp_path / "nope.key"), WEBHOOK_ADDRESS="everywhere"),
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    text = err.decode()
    for key in ("WEBHOOK_TLS_CERT_FILE", "WEBHOOK_TLS_KEY_FILE", "WEBHOOK_ADDRESS"):
        assert key in text, f"{key} missing from:\n{text}"


async def test_a_bad_log_format_is_refused_naming_the_key(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloudadaptor.cli", "webhook",
        env=clean_env(LOG_FORMAT="yaml"), stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "LOG_FORMAT" in err.decode() and "json" in err.decode(), err.decode()
