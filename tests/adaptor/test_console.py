"""Console tails: the last lines of a VM's console, never a secret it might echo."""

from __future__ import annotations

import pytest

from cloudadaptor.adaptor.console import REDACTED, console_tail, scrub, secret_lines, tail
from cloudadaptor.adaptor.lifecycle import LifecycleError
from cloudadaptor.dev.shim import shim_annotations
from cloudadaptor.providers.base import ProviderBase
from cloudadaptor.ttrpc.errors import Code

KEY_BODY = ["MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7", "q2Jm9sZWN0cm9uaWNzZWNyZXRrZXltYXRlcmlhbGhlcmU0MjQy"]
PEM = "-----BEGIN PRIVATE KEY-----\n" + "\n".join(KEY_BODY) + "\n-----END PRIVATE KEY-----\n"
AUTH = '{"auths": {"registry.example": {"auth": "dXNlcjpodW50ZXIyLXN1cGVyLXNlY3JldA=="}}}'


def test_scrub_removes_key_blocks_credential_fields_and_known_secret_lines():
    user_data = f"#cloud-config\nwrite_files:\n- content: {PEM!r}\n- content: '{AUTH}'\n"
    secrets = secret_lines(user_data)
    assert set(KEY_BODY) <= secrets and "dXNlcjpodW50ZXIyLXN1cGVyLXNlY3JldA==" in secrets
    console = (f"boot ok\ncat apf.json\n{PEM}partial: {KEY_BODY[1]}\n{AUTH}\n"
               "-----BEGIN RSA PRIVATE KEY-----\ntruncated key without an end")
    shown = scrub(console, secrets)
    for secret in [*KEY_BODY, "dXNlcjpodW50ZXIyLXN1cGVyLXNlY3JldA==", "truncated key"]:
        assert secret not in shown, f"{secret!r} leaked: {shown}"
    assert "boot ok" in shown and REDACTED in shown


def test_tail_keeps_the_last_non_empty_lines_and_cuts_long_ones():
    text = "\n".join(f"line {n}" for n in range(100)) + "\n\n\x1b[0m" + "x" * 1000
    lines = tail(scrub(text), 3)
    assert lines[:2] == ["line 98", "line 99"] and lines[2].endswith("...") and len(lines[2]) == 300


async def test_console_tail_says_why_when_the_provider_cannot_read_it(provider):
    assert await console_tail(provider, "i-none") == "console not available: fake VM i-none has no console"

    class NoConsole(ProviderBase):
        name = "plain"

    assert "the plain provider cannot read VM consoles" in await console_tail(NoConsole(), "i-1")  # type: ignore[arg-type]


async def test_agent_never_answering_attaches_the_scrubbed_console_to_the_error(lifecycle_factory, provider, netns_file,
                                                                                unused_tcp_port, caplog):
    lifecycle = lifecycle_factory(agent_port=unused_tcp_port, proxy_timeout=0.3)
    sandbox = "9" * 64
    await lifecycle.create(sandbox, shim_annotations("web", "prod"), netns_file)
    user_data = lifecycle.store.get(sandbox).user_data
    key_line = next(iter(secret_lines(user_data)), None)
    provider.consoles["i-fake-1"] = f"[  1.0] kernel\n[  2.0] forwarder: bad config\n{key_line}\n[  3.0] giving up\n"
    with pytest.raises(LifecycleError) as err:
        await lifecycle.start(sandbox)
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert "console" not in err.value.message, "the shim's error is unchanged"
    assert "forwarder: bad config" in err.value.console and "giving up" in err.value.console
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "forwarder: bad config" in logged
    if key_line:  # with TLS on, the user data holds the VM's key: it never shows
        assert key_line not in err.value.console and key_line not in logged
