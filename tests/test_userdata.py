"""Cloud-init user data: rendering, parsing, the path allow-list and size limits."""

from __future__ import annotations

import base64
import gzip

import pytest
import test_podconfig
import yaml

from cloudadaptor.podconfig import ForwarderConfig
from cloudadaptor.userdata import (
    ALLOWED_PATHS,
    APF_CONFIG_PATH,
    AUTH_JSON_PATH,
    AWS_USER_DATA_LIMIT,
    AZURE_USER_DATA_LIMIT,
    INITDATA_PATH,
    UserDataError,
    UserDataTooLarge,
    check_size,
    parse,
    parse_entries,
    render,
)

# A real pod's apf.json (TLS material, routes, neighbours), shared with the apf.json tests.
material, apf = test_podconfig.material, test_podconfig.apf


def test_allowed_paths_are_exactly_the_three_peerpod_files():
    assert ALLOWED_PATHS == {"/run/peerpod/apf.json", "/run/peerpod/auth.json", "/run/peerpod/initdata"}


def test_render_then_parse_round_trips(apf):
    files = {
        APF_CONFIG_PATH: apf.to_json(),
        AUTH_JSON_PATH: '{"auths": {"registry.example": {"auth": "dXNlcjpwYXNz"}}}',
        INITDATA_PATH: 'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"policy.rego" = """\npackage agent_policy\n"""\n',
    }
    text = render(files)
    assert text.startswith("#cloud-config\n")
    assert parse(text) == files
    assert ForwarderConfig.from_json(parse(text)[APF_CONFIG_PATH]) == apf


@pytest.mark.parametrize(
    "content",
    [
        "",
        "no trailing newline",
        "trailing spaces   \nand\ttabs\t\n",
        "  leading spaces\n\n\nblank lines\n\n",
        "---\n#cloud-config\n- not: yaml\n...\n",
        "unicode: é ✓ 日本\n",
        "'quotes' \"double\" \\ backslash: colon # hash\n",
        "\r\nwindows\r\n",
        "x" * 5000,
    ],
)
def test_render_parse_keeps_any_content_exactly(content):
    assert parse(render({INITDATA_PATH: content})) == {INITDATA_PATH: content}


def test_render_sets_private_permissions_for_apf_and_auth():
    doc = yaml.safe_load(render({APF_CONFIG_PATH: "{}", AUTH_JSON_PATH: "{}", INITDATA_PATH: ""}))
    perms = {e["path"]: e["permissions"] for e in doc["write_files"]}
    assert perms[APF_CONFIG_PATH] == "0600" and perms[AUTH_JSON_PATH] == "0600"


@pytest.mark.parametrize("path", ["/etc/passwd", "/run/peerpod/../../etc/shadow", "/run/peerpod/other.json", "run/peerpod/apf.json"])
def test_render_refuses_paths_outside_the_allow_list(path):
    with pytest.raises(ValueError, match="may not write"):
        render({APF_CONFIG_PATH: "{}", path: "x"})


def test_parse_accepts_plain_cloud_config_from_other_tools():
    text = (
        "#cloud-config\n"
        "package_update: true\n"
        "write_files:\n"
        "  - path: /run/peerpod/auth.json\n"
        "    owner: root:root\n"
        "    permissions: 0600\n"
        "    content: '{}'\n"
        "  - path: /etc/motd\n"
        "    content: |\n"
        "      hello\n"
    )
    entries = parse_entries(text)
    assert [(e.path, e.permissions) for e in entries] == [(AUTH_JSON_PATH, "0600"), ("/etc/motd", None)]
    assert parse(text) == {AUTH_JSON_PATH: "{}", "/etc/motd": "hello\n"}


def test_parse_without_write_files_is_empty():
    assert parse("#cloud-config\nruncmd: [ls]\n") == {}
    assert parse("#cloud-config\n") == {}


def test_parse_decodes_b64_and_gzip_b64_content():
    payload = '{"auths": {}}\n'
    b64 = base64.b64encode(payload.encode()).decode()
    gz = base64.b64encode(gzip.compress(payload.encode())).decode()
    text = (
        "#cloud-config\nwrite_files:\n"
        f"- path: {AUTH_JSON_PATH}\n  encoding: b64\n  content: {b64}\n"
        f"- path: {INITDATA_PATH}\n  encoding: gz+b64\n  content: {gz}\n"
    )
    assert parse(text) == {AUTH_JSON_PATH: payload, INITDATA_PATH: payload}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("#!/bin/bash\necho hi\n", "not cloud-config"),
        ("write_files: []\n", "not cloud-config"),
        ("", "not cloud-config"),
        ("#cloud-config\nwrite_files: [\n", "not valid YAML"),
        ("#cloud-config\n- a\n- b\n", "mapping"),
        ("#cloud-config\nwrite_files: {path: x}\n", "expected a list"),
        ("#cloud-config\nwrite_files:\n- content: x\n", "write_files[0]"),
        ("#cloud-config\nwrite_files:\n- path: /x\n  encoding: b64\n  content: '!!!'\n", "write_files[0].content"),
        ("#cloud-config\nwrite_files:\n- path: /x\n  encoding: rot13\n  content: x\n", "write_files[0].encoding"),
    ],
)
def test_parse_rejects_malformed_user_data_clearly(text, message):
    with pytest.raises(UserDataError) as info:
        parse(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_rendered_user_data_of_a_real_pod_fits_aws(apf):
    text = render({APF_CONFIG_PATH: apf.to_json(), INITDATA_PATH: "x" * 4096})
    check_size(text, AWS_USER_DATA_LIMIT, "AWS")
    size = len(text.encode("utf-8"))
    # Room to spare, not a near miss: certificates, routes and a 4 KiB initdata leave over a quarter free.
    assert size < AWS_USER_DATA_LIMIT * 3 // 4, f"a typical pod's user data is {size} bytes of {AWS_USER_DATA_LIMIT}"
    assert parse(text)[APF_CONFIG_PATH] == apf.to_json(), "what fits is the whole configuration"


def test_size_over_the_aws_limit_is_refused_with_size_limit_and_provider():
    text = render({INITDATA_PATH: "x" * 20000})
    with pytest.raises(UserDataTooLarge) as info:
        check_size(text, AWS_USER_DATA_LIMIT, "AWS")
    message = str(info.value)
    assert "AWS user data is limited to 16 KiB" in message
    assert str(len(text.encode())) in message
    assert (info.value.size, info.value.limit) == (len(text.encode()), 16384)


def test_size_limits_count_bytes_not_characters():
    text = "é" * 9000  # 18000 bytes in UTF-8
    with pytest.raises(UserDataTooLarge):
        check_size(text, AWS_USER_DATA_LIMIT, "AWS")
    check_size(text, AZURE_USER_DATA_LIMIT, "Azure")
    check_size("x" * AWS_USER_DATA_LIMIT, AWS_USER_DATA_LIMIT, "AWS")  # exactly at the limit is fine
    with pytest.raises(UserDataTooLarge, match="Azure user data is limited to 64 KiB"):
        check_size("x" * (AZURE_USER_DATA_LIMIT + 1), AZURE_USER_DATA_LIMIT, "Azure")


def _awkward_texts(apf_json: str) -> list[str]:
    """Contents that exercise the emitters' choices: literal blocks with every chomping, quoting, unicode."""
    import random
    import string

    rng = random.Random(16)
    alphabet = string.printable + "é☃\u00a0\u2028\ufeff" + "\n" * 6
    texts = ["", "\n", "\n\n", " leading", "trailing ", "0600", "yes", "- item", "a: b", "#x", "...", "---",
             "x" * 81, apf_json]
    for _ in range(400):
        body = "".join(rng.choice(alphabet) for _ in range(rng.choice([1, 5, 81, 300])))
        texts.append(body + rng.choice(["", "\n", "\n\n", "\n\n\n", " \n", "\t"]))
    return texts


def test_libyaml_writes_and_reads_user_data_exactly_as_pyyaml_does(apf):
    from cloudadaptor import userdata

    assert hasattr(yaml, "CSafeDumper") and hasattr(yaml, "CSafeLoader"), "PyYAML's wheels carry libyaml"
    texts = _awkward_texts(apf.to_json())
    for i in range(0, len(texts), 3):
        doc = {"write_files": [{"path": APF_CONFIG_PATH, "content": t, "permissions": "0600"} for t in texts[i:i + 3]]}
        compiled, pure = userdata._dump(doc), userdata._dump(doc, compiled=False)
        assert compiled == pure
        assert userdata._load(compiled) == userdata._load(pure, compiled=False) == doc


def test_a_document_libyaml_refuses_gets_pyyamls_message():
    with pytest.raises(UserDataError) as compiled:
        parse("#cloud-config\nwrite_files: [\n")
    with pytest.raises(yaml.YAMLError) as pure:
        yaml.safe_load("#cloud-config\nwrite_files: [\n")
    assert str(compiled.value) == f"user data is not valid YAML: {' '.join(str(pure.value).split())}"
