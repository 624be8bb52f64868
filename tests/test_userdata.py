"""Cloud-init user data: rendering, parsing, the path allow-list and size limits."""

from __future__ import annotations

import base64
import gzip
import json

import pytest
import yaml

from cloudadaptor.tls import CertificateAuthority, ServerTlsMaterial
from cloudadaptor.userdata import (
    ALLOWED_PATHS,
    APF_CONFIG_PATH,
    AUTH_JSON_PATH,
    AWS_USER_DATA_LIMIT,
    AZURE_USER_DATA_LIMIT,
    INITDATA_PATH,
    ForwarderConfig,
    PodInterface,
    PodNeighbour,
    PodNetworkConfig,
    PodRoute,
    UserDataError,
    UserDataTooLarge,
    check_size,
    parse,
    parse_entries,
    render,
)


@pytest.fixture(scope="module")
def material() -> ServerTlsMaterial:
    ca = CertificateAuthority.create()
    cert, key = ca.issue("podvm-web-12345678", server=True, dns_names=["podvm-web-12345678"])
    return ServerTlsMaterial(cert, key, ca.cert_pem)


@pytest.fixture
def apf(material) -> ForwarderConfig:
    return ForwarderConfig(
        sandbox_id="12345678abcdef",
        pod_name="web",
        pod_namespace="default",
        tls=material,
        network=POD_NETWORK,
    )


POD_NETWORK = PodNetworkConfig(
    pod=PodInterface(
        name="eth0", mac="02:00:00:00:00:07", mtu=1450, addresses=("198.51.100.7/24", "2001:db8::7/64"),
        routes=(PodRoute("169.254.1.1/32", scope=253), PodRoute("0.0.0.0/0", gateway="169.254.1.1", metric=10)),
        neighbours=(PodNeighbour("169.254.1.1", "ee:ee:ee:ee:ee:ee"),),
    ),
    worker_ip="192.0.2.1", vni=555001, vxlan_port=9000,
)


def test_allowed_paths_are_exactly_the_three_peerpod_files():
    assert ALLOWED_PATHS == {"/run/peerpod/apf.json", "/run/peerpod/auth.json", "/run/peerpod/initdata"}


def test_forwarder_config_json_round_trip(apf):
    assert ForwarderConfig.from_json(apf.to_json()) == apf


def test_pod_network_serializes_flat_for_the_vm(apf):
    doc = json.loads(apf.to_json())["network"]
    assert doc["interface"] == "eth0" and doc["vni"] == 555001 and doc["vxlan_port"] == 9000
    assert doc["addresses"] == ["198.51.100.7/24", "2001:db8::7/64"]
    assert doc["routes"][0] == {"dst": "169.254.1.1/32", "gateway": None, "scope": 253, "src": None,
                                "metric": None, "onlink": False}
    assert doc["neighbours"] == [{"address": "169.254.1.1", "mac": "ee:ee:ee:ee:ee:ee"}]


def test_pod_network_vxlan_port_defaults_to_9000():
    doc = POD_NETWORK.to_dict()
    del doc["vxlan_port"]
    assert PodNetworkConfig.from_dict(doc).vxlan_port == 9000


def test_forwarder_config_repr_never_shows_the_key(apf, material):
    assert "PRIVATE KEY" not in repr(apf)
    assert material.key_pem in json.loads(apf.to_json())["tls"]["key_pem"]


def test_forwarder_config_without_tls_or_network():
    cfg = ForwarderConfig("sid", "p", "ns")
    back = ForwarderConfig.from_json(cfg.to_json())
    assert back == cfg and back.tls is None and back.network is None and back.listen_port == 15150


def test_forwarder_config_ignores_unknown_fields():
    doc = json.loads(ForwarderConfig("sid", "p", "ns").to_json())
    doc["added_in_a_later_version"] = True
    assert ForwarderConfig.from_json(json.dumps(doc)).sandbox_id == "sid"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"listen_port": "15150"}, "'listen_port'"),
        ({"listen_port": 70000}, "'listen_port'"),
        ({"listen_port": True}, "'listen_port'"),
        ({"pod_name": 7}, "'pod_name'"),
        ({"sandbox_id": None}, "'sandbox_id'"),
        ({"tls_min_version": "1.1"}, "'tls_min_version'"),
        ({"tls": "pem"}, "'tls'"),
        ({"tls": {"cert_pem": "x", "key_pem": "", "client_ca_pem": "y"}}, "'tls.key_pem'"),
        ({"network": [1, 2]}, "'network'"),
        ({"network": {**POD_NETWORK.to_dict(), "vni": 0}}, "'network.vni'"),
        ({"network": {**POD_NETWORK.to_dict(), "vni": 2**24}}, "'network.vni'"),
        ({"network": {**POD_NETWORK.to_dict(), "vxlan_port": 0}}, "'network.vxlan_port'"),
        ({"network": {**POD_NETWORK.to_dict(), "mac": "02:00"}}, "'network.mac'"),
        ({"network": {**POD_NETWORK.to_dict(), "mtu": "1500"}}, "'network.mtu'"),
        ({"network": {**POD_NETWORK.to_dict(), "worker_ip": None}}, "'network.worker_ip'"),
        ({"network": {**POD_NETWORK.to_dict(), "interface": "a-very-long-ifname"}}, "'network.interface'"),
        ({"network": {**POD_NETWORK.to_dict(), "addresses": ["198.51.100.7"]}}, "'network.addresses[0]'"),
        ({"network": {**POD_NETWORK.to_dict(), "routes": [{"dst": "0.0.0.0/0", "gateway": "x"}]}}, "'network.routes[0]'"),
        ({"network": {**POD_NETWORK.to_dict(), "neighbours": [{"address": "10.0.0.1"}]}}, "'network.neighbours[0]'"),
    ],
)
def test_forwarder_config_errors_name_the_bad_field(change, named):
    doc = json.loads(ForwarderConfig("sid", "p", "ns").to_json())
    doc.update(change)
    with pytest.raises(UserDataError) as info:
        ForwarderConfig.from_json(json.dumps(doc))
    assert named in str(info.value)


def test_forwarder_config_rejects_non_json():
    with pytest.raises(UserDataError, match="not valid JSON"):
        ForwarderConfig.from_json("{nope")
    with pytest.raises(UserDataError, match="JSON object"):
        ForwarderConfig.from_json("[]")


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
