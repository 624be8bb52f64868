"""Azure keys, resource ids, tag names and VM bodies (pure: no endpoint)."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import pytest

from cloudadaptor.config import ConfigError
from cloudadaptor.providers.base import load_provider
from cloudadaptor.providers import base
from cloudadaptor.providers.azure import config as azconfig
from cloudadaptor.providers.azure import tags, vms

SUB = "00000000-0000-4000-8000-000000000001"
RG_ID = f"/subscriptions/{SUB}/resourceGroups/rg"
SUBNET = f"{RG_ID}/providers/Microsoft.Network/virtualNetworks/vnet/subnets/worker"
NSG = f"{RG_ID}/providers/Microsoft.Network/networkSecurityGroups/nsg"
IMAGE = f"{RG_ID}/providers/Microsoft.Compute/images/peer-pod-vmimage"
SECRET = "s3cr3t-value-never-shown"


def env(**changes: str) -> dict[str, str]:
    values = {
        "CLOUD_PROVIDER": "azure", "AZURE_SUBSCRIPTION_ID": SUB, "AZURE_REGION": "eastus",
        "AZURE_RESOURCE_GROUP": "rg", "AZURE_SUBNET_ID": SUBNET, "AZURE_NSG_ID": NSG, "AZURE_IMAGE_ID": IMAGE,
    }
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def build(**changes: str) -> azconfig.AzureConfig:
    _, config = load_provider(env(**changes))
    assert isinstance(config, azconfig.AzureConfig)
    return config


def problems_of(**changes: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        build(**changes)
    return [str(p) for p in err.value.problems]


def test_openshift_example_configuration_parses():
    config = build(AZURE_INSTANCE_SIZE="Standard_B2als_v2", DISABLECVM="true", VXLAN_PORT="9000",
                   AZURE_CLIENT_ID="cid", AZURE_TENANT_ID="tid", AZURE_CLIENT_SECRET=SECRET)
    assert (config.size, config.disable_cvm, config.vxlan_port) == ("Standard_B2als_v2", True, 9000)
    assert config.subnet.names == ("vnet", "worker") and config.nsg.name == "nsg"
    assert config.image.kind == "managed"
    assert config.ssh_username == "peerpod" and config.ssh_pub_key_path == Path("/root/.ssh/id_rsa.pub")
    assert config.arm_endpoint == "https://management.azure.com"
    assert config.credential_scope == "https://management.azure.com/.default"
    assert SECRET not in repr(config)


@pytest.mark.parametrize("key", ["AZURE_SUBSCRIPTION_ID", "AZURE_REGION", "AZURE_RESOURCE_GROUP", "AZURE_SUBNET_ID"])
def test_missing_required_key_is_named(key):
    assert any(p.startswith(f"{key} is not set") for p in problems_of(**{key: None}))


@pytest.mark.parametrize("key, value, expected", [
    ("AZURE_SUBSCRIPTION_ID", "my-sub", "expected a GUID"),
    ("AZURE_REGION", "east/us", "expected an Azure region name"),
    ("AZURE_RESOURCE_GROUP", "rg/x", "expected a resource group name"),
    ("AZURE_SUBNET_ID", "subnet-123", "expected a subnet id"),
    ("AZURE_NSG_ID", SUBNET, "expected a network security group id"),
    ("AZURE_IMAGE_ID", "ami-0123", "expected a managed image id"),
    ("SSH_USERNAME", "root", "Azure allows"),
    ("ENABLE_SECURE_BOOT", "yes", "expected true or false"),
    ("AZURE_RESOURCE_MANAGER_ENDPOINT", "http://127.0.0.1:8443", "expected an https:// URL"),
])
def test_bad_value_is_refused_naming_key_value_and_expectation(key, value, expected):
    lines = problems_of(**{key: value})
    assert any(line.startswith(f'{key}="{value}"') and expected in line for line in lines), lines


def test_client_secret_needs_client_and_tenant_id_and_is_never_shown():
    lines = problems_of(AZURE_CLIENT_SECRET=SECRET)
    assert lines == ["AZURE_CLIENT_ID is not set: required when AZURE_CLIENT_SECRET is set",
                     "AZURE_TENANT_ID is not set: required when AZURE_CLIENT_SECRET is set"]


def test_subnet_in_another_subscription_is_refused():
    other = SUBNET.replace(SUB, "11111111-1111-4111-8111-111111111111")
    assert any(line.startswith("AZURE_SUBNET_ID=") and "AZURE_SUBSCRIPTION_ID" in line
               for line in problems_of(AZURE_SUBNET_ID=other))


@pytest.mark.parametrize("changes, size, sizes", [
    ({}, "Standard_DC2as_v5", ()),  # confidential VM by default: a CVM size
    ({"DISABLECVM": "true"}, "Standard_B2als_v2", ()),
    ({"PODVM_INSTANCE_TYPE": "Standard_D2as_v5"}, "Standard_D2as_v5", ()),
    ({"PODVM_INSTANCE_TYPE": "Standard_D2as_v5", "AZURE_INSTANCE_SIZE": "Standard_D4as_v5"}, "Standard_D4as_v5", ()),
    ({"AZURE_INSTANCE_SIZES": "Standard_D4as_v5, Standard_D2as_v5"}, "Standard_D4as_v5",
     ("Standard_D4as_v5", "Standard_D2as_v5")),
    ({"PODVM_INSTANCE_TYPES": "Standard_D2as_v5"}, "Standard_D2as_v5", ("Standard_D2as_v5",)),
])
def test_default_size_and_allow_list(changes, size, sizes):
    config = build(**changes)
    assert (config.size, config.sizes) == (size, sizes)


def test_default_size_outside_the_allow_list_is_refused():
    lines = problems_of(AZURE_INSTANCE_SIZE="Standard_B2als_v2", AZURE_INSTANCE_SIZES="Standard_D2as_v5")
    assert lines == ['AZURE_INSTANCE_SIZE="Standard_B2als_v2": expected one of AZURE_INSTANCE_SIZES: Standard_D2as_v5']


def test_sovereign_endpoint_sets_the_token_scope():
    config = build(AZURE_RESOURCE_MANAGER_ENDPOINT="https://management.usgovcloudapi.net/")
    assert config.credential_scope == "https://management.usgovcloudapi.net/.default"


def test_azure_is_registered_and_its_keys_are_in_config_check():
    from cloudadaptor.config import check

    assert "azure" in base.provider_names()
    rows, problems = check(env(AZURE_CLIENT_ID="cid", AZURE_TENANT_ID="tid", AZURE_CLIENT_SECRET=SECRET))
    shown = {key: value for key, value, _ in rows}
    assert shown["AZURE_SUBNET_ID"] == SUBNET and shown["AZURE_CLIENT_SECRET"] == "<hidden>"
    assert problems == []


# ------------------------------------------------------------------ image ids


@pytest.mark.parametrize("image_id, kind, field", [
    (IMAGE, "managed", "id"),
    (f"{RG_ID}/providers/Microsoft.Compute/galleries/g/images/podvm/versions/1.2.3", "gallery", "id"),
    ("/SharedGalleries/abc-123/Images/podvm/Versions/1.2.3", "shared", "sharedGalleryImageId"),
    ("/CommunityGalleries/peerpods-4f2c/Images/podvm/Versions/latest", "community", "communityGalleryImageId"),
])
def test_image_id_kind_selects_the_image_reference_field(image_id, kind, field):
    image = azconfig.parse_image_id(image_id)
    assert image.kind == kind and image.reference() == {field: image_id}


@pytest.mark.parametrize("bad", ["", "peer-pod-vmimage", f"{RG_ID}/providers/Microsoft.Compute/galleries/g/images/podvm",
                                 "Canonical:0001-com-ubuntu:22_04:latest"])
def test_unknown_image_id_shapes_are_refused(bad):
    with pytest.raises(ValueError, match="managed image id"):
        azconfig.parse_image_id(bad)


# ------------------------------------------------------------------ tags


def test_tag_names_map_slash_and_forbidden_characters_and_back():
    ours = {base.TAG_NODE: "worker-1", base.TAG_SANDBOX: "abc", "team/app?x": "v"}
    mapped = tags.to_azure_tags(ours)
    assert mapped == {"peerpods.io_node": "worker-1", "peerpods.io_sandbox-id": "abc", "team_app_x": "v"}
    assert tags.from_azure_tags(mapped) == {base.TAG_NODE: "worker-1", base.TAG_SANDBOX: "abc", "team_app_x": "v"}
    assert tags.matches(mapped, {base.TAG_NODE: "worker-1"}) and not tags.matches(mapped, {base.TAG_NODE: "other"})


# ------------------------------------------------------------------ VM body


def body(config: azconfig.AzureConfig, **changes):
    fields = dict(name="podvm-x-1", size="Standard_B2als_v2", image=config.image, nic_id="nic-id",
                  ssh_public_key="ssh-rsa AAAA k\n", user_data="#cloud-config\n", tags={base.TAG_NODE: "n"})
    return vms.vm_body(config, **{**fields, **changes})["properties"]


def test_vm_body_ssh_only_user_data_base64_and_dependents_deleted_with_vm():
    props = body(build(DISABLECVM="true", ROOT_VOLUME_SIZE="30"))
    linux = props["osProfile"]["linuxConfiguration"]
    assert linux == {"disablePasswordAuthentication": True, "ssh": {"publicKeys": [
        {"path": "/home/peerpod/.ssh/authorized_keys", "keyData": "ssh-rsa AAAA k"}]}}
    assert base64.b64decode(props["userData"]) == b"#cloud-config\n"
    assert props["storageProfile"]["osDisk"]["deleteOption"] == "Delete"
    assert props["storageProfile"]["osDisk"]["diskSizeGB"] == 30
    assert props["networkProfile"]["networkInterfaces"][0]["properties"]["deleteOption"] == "Delete"
    assert "securityProfile" not in props


@pytest.mark.parametrize("changes, profile, encrypted", [
    ({}, {"securityType": "ConfidentialVM", "uefiSettings": {"secureBootEnabled": False, "vTpmEnabled": True}}, True),
    ({"ENABLE_SECURE_BOOT": "true"},
     {"securityType": "ConfidentialVM", "uefiSettings": {"secureBootEnabled": True, "vTpmEnabled": True}}, True),
    ({"DISABLECVM": "true", "ENABLE_SECURE_BOOT": "true"},
     {"securityType": "TrustedLaunch", "uefiSettings": {"secureBootEnabled": True, "vTpmEnabled": True}}, False),
    ({"DISABLECVM": "true"}, None, False),
])
def test_security_profile_follows_disablecvm_and_secure_boot(changes, profile, encrypted):
    props = body(build(**changes))
    assert props.get("securityProfile") == profile
    assert ("securityProfile" in props["storageProfile"]["osDisk"]["managedDisk"]) is encrypted


# ------------------------------------------------------------------ size catalog


def sku(name, vcpus, memory_gb, gpus=0, region="eastus", restricted=False, kind="virtualMachines"):
    """A resource SKU as ARM's JSON has it."""
    caps = [{"name": "vCPUs", "value": str(vcpus)}, {"name": "MemoryGB", "value": str(memory_gb)},
            {"name": "GPUs", "value": str(gpus)}]
    restrictions = [{"type": "Location", "values": [region]}] if restricted else []
    return {"name": name, "resourceType": kind, "locations": [region], "capabilities": caps, "restrictions": restrictions}


def test_catalog_keeps_vm_sizes_offered_in_the_region_only():
    catalog = vms.catalog_from_skus([
        sku("Standard_B2als_v2", 2, 4), sku("Standard_E2s_v5", 2, 16, region="westus"),
        sku("Standard_F2s_v2", 2, 4, restricted=True), sku("Premium_LRS", 0, 0, kind="disks"),
        sku("Standard_NC4as_T4_v3", 4, 28, gpus=1), sku("Standard_A0", 1, 0.75),
    ], "eastus")
    assert sorted(catalog) == ["Standard_A0", "Standard_B2als_v2", "Standard_NC4as_T4_v3"]
    assert dataclasses.astuple(catalog["Standard_NC4as_T4_v3"]) == ("Standard_NC4as_T4_v3", 4, 28672, 1)
    assert catalog["Standard_A0"].memory_mib == 768


def test_shipped_azure_overlay_example_parses():
    import yaml

    root = Path(__file__).resolve().parents[2] / "deploy" / "overlays" / "azure"
    assert root.is_dir(), "deploy/overlays/azure ships the example peer-pods-cm/secret"
    merged: dict[str, str] = {}
    for name in ("peer-pods-cm.yaml", "peer-pods-secret.yaml"):
        doc = yaml.safe_load((root / name).read_text())
        merged.update({k: str(v) for k, v in (doc.get("data") or doc.get("stringData") or {}).items()})
    _, config = load_provider(merged)
    assert isinstance(config, azconfig.AzureConfig)
    assert config.size in config.sizes and config.disable_cvm
