"""apf.json: the forwarder's configuration and the pod network, and how parsing names a bad field."""

from __future__ import annotations

import json

import pytest

from cloudadaptor.podconfig import (
    ApfConfigError,
    ForwarderConfig,
    PodInterface,
    PodNeighbour,
    PodNetworkConfig,
    PodRoute,
)
from cloudadaptor.tls import ServerTlsMaterial
from cloudadaptor.tlscerts import CertificateAuthority


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
    with pytest.raises(ApfConfigError) as info:
        ForwarderConfig.from_json(json.dumps(doc))
    assert named in str(info.value)


def test_forwarder_config_rejects_non_json():
    with pytest.raises(ApfConfigError, match="not valid JSON"):
        ForwarderConfig.from_json("{nope")
    with pytest.raises(ApfConfigError, match="JSON object"):
        ForwarderConfig.from_json("[]")
