"""AzureProvider.verify(): each bad key against the fake ARM endpoint gives one line naming it."""

from __future__ import annotations

import pytest
from azure.core.exceptions import ClientAuthenticationError

from cloudadaptor.adaptor.daemon import Daemon, StartupError
from cloudadaptor.config import load_settings
from fakes.armserver import StaticTokenCredential, fast_provider

OTHER_SUB = "11111111-1111-4111-8111-111111111111"


@pytest.fixture
async def verify(arm_env):
    providers = []

    async def run(credential=None, **changes: str) -> list[str]:
        provider = fast_provider({**arm_env, **changes}, credential)
        providers.append(provider)
        return await provider.verify()

    yield run
    for provider in providers:
        await provider.close()


class FailingCredential:
    def get_token(self, *scopes, **kwargs):
        raise ClientAuthenticationError("AADSTS7000215: Invalid client secret provided.")


def only(lines: list[str], key: str) -> str:
    assert len(lines) == 1 and lines[0].startswith(key), f"expected one problem naming {key}, got {lines}"
    assert "\n" not in lines[0]
    return lines[0]


async def test_good_configuration_has_no_problems(verify):
    assert await verify() == []


async def test_credential_that_cannot_get_a_token(verify):
    line = only(await verify(FailingCredential(), AZURE_CLIENT_ID="cid", AZURE_TENANT_ID="tid",
                             AZURE_CLIENT_SECRET="hunter2-secret"), "AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET")
    assert "cannot get a token" in line and "AADSTS7000215" in line and "hunter2-secret" not in line


async def test_token_rejected_by_the_endpoint(verify, arm):
    line = only(await verify(StaticTokenCredential("expired-token")), "credentials (DefaultAzureCredential")
    assert f"{arm.base_url} refused the token" in line and "InvalidAuthenticationToken" in line


async def test_unknown_subscription(verify, arm_seeded, arm):
    ids = {k: v.replace(arm.subscription_id, OTHER_SUB) for k, v in
           {"AZURE_SUBNET_ID": arm_seeded.subnet_id, "AZURE_NSG_ID": arm_seeded.nsg_id, "AZURE_IMAGE_ID": arm_seeded.image_id}.items()}
    line = only(await verify(AZURE_SUBSCRIPTION_ID=OTHER_SUB, **ids), f"AZURE_SUBSCRIPTION_ID={OTHER_SUB}")
    assert "subscription not found" in line


async def test_missing_resource_group(verify):
    line = only(await verify(AZURE_RESOURCE_GROUP="no-such-rg"), "AZURE_RESOURCE_GROUP=no-such-rg")
    assert "resource group not found" in line and "ResourceGroupNotFound" in line


async def test_missing_subnet(verify, arm_seeded):
    subnet = arm_seeded.subnet_id.replace("/subnets/worker", "/subnets/gone")
    assert "subnet not found" in only(await verify(AZURE_SUBNET_ID=subnet), f"AZURE_SUBNET_ID={subnet}")


async def test_missing_nsg(verify, arm_seeded):
    nsg = arm_seeded.nsg_id + "-gone"
    assert "network security group not found" in only(await verify(AZURE_NSG_ID=nsg), f"AZURE_NSG_ID={nsg}")


@pytest.mark.parametrize("image", [
    "managed", "/SharedGalleries/nogal/Images/podvm/Versions/1.0.0", "/CommunityGalleries/nogal/Images/podvm/Versions/1",
])
async def test_missing_image(verify, arm_seeded, image):
    image = arm_seeded.image_id + "-gone" if image == "managed" else image
    assert "image not found" in only(await verify(AZURE_IMAGE_ID=image), f"AZURE_IMAGE_ID={image}")


async def test_managed_image_in_another_region(verify, arm, arm_seeded):
    image = arm.add_image(arm_seeded.resource_group, "westus-image", location="westus")
    line = only(await verify(AZURE_IMAGE_ID=image), f"AZURE_IMAGE_ID={image}")
    assert "the image is in westus, expected AZURE_REGION eastus" in line


async def test_size_not_offered_in_the_region(verify):
    line = only(await verify(AZURE_INSTANCE_SIZE="Standard_X1_v9"), "AZURE_INSTANCE_SIZE=Standard_X1_v9")
    assert "not offered in eastus" in line


async def test_allow_list_entry_not_offered_in_the_region(verify):
    line = only(await verify(AZURE_INSTANCE_SIZES="Standard_B2als_v2,Standard_X1_v9"), "AZURE_INSTANCE_SIZES=")
    assert line.endswith("not offered in eastus: Standard_X1_v9")


async def test_region_without_any_size(verify):
    line = only(await verify(AZURE_REGION="westeurope", AZURE_IMAGE_ID=""), "AZURE_REGION=westeurope")
    assert "no VM sizes are offered there" in line


async def test_unreadable_ssh_public_key(verify, tmp_path):
    line = only(await verify(SSH_PUB_KEY_PATH=str(tmp_path / "missing.pub")), "SSH_PUB_KEY_PATH=")
    assert "cannot read" in line


async def test_file_that_is_no_ssh_public_key(verify, tmp_path):
    (tmp_path / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    line = only(await verify(SSH_PUB_KEY_PATH=str(tmp_path / "id_rsa")), "SSH_PUB_KEY_PATH=")
    assert "does not hold an SSH public key" in line


async def test_public_ip_is_refused_as_unsupported(verify):
    assert "not supported" in only(await verify(USE_PUBLIC_IP="true"), "USE_PUBLIC_IP=true")


async def test_several_bad_keys_are_all_reported(verify, arm_seeded):
    lines = await verify(AZURE_NSG_ID=arm_seeded.nsg_id + "-gone", AZURE_INSTANCE_SIZE="Standard_X1_v9")
    assert [line.split("=")[0] for line in lines] == ["AZURE_NSG_ID", "AZURE_INSTANCE_SIZE"]


async def test_daemon_refuses_to_start_naming_the_bad_key(arm_env, arm_seeded, tmp_path):
    arm_env = {**arm_env, "AZURE_SUBNET_ID": arm_seeded.subnet_id + "-gone", "STATE_DIR": str(tmp_path),
           "SOCKET": str(tmp_path / "hv.sock"), "PODS_DIR": str(tmp_path / "pods")}
    provider = fast_provider(arm_env)
    daemon = Daemon(load_settings(arm_env), provider=provider)
    try:
        with pytest.raises(StartupError, match=r"^azure: AZURE_SUBNET_ID=.*subnet not found"):
            await daemon.start()
        assert not (tmp_path / "hv.sock").exists()
    finally:
        await daemon.close()


async def test_verify_learns_an_address_in_the_vm_subnet_for_the_worker_address_hint(arm_env):
    provider = fast_provider(arm_env)
    try:
        assert provider.network_hint() is None, "no I/O before verify"
        assert await provider.verify() == []
        assert provider.network_hint() == "203.0.113.4"
    finally:
        await provider.close()


@pytest.mark.parametrize("disablecvm", ["false", None])
async def test_confidential_vms_refuse_a_managed_image_saying_what_to_build(verify, arm_env, arm_seeded, disablecvm):
    changes = {"AZURE_INSTANCE_SIZE": "Standard_DC2as_v5", "AZURE_INSTANCE_SIZES": ""}
    if disablecvm is None:
        arm_env.pop("DISABLECVM")
    else:
        changes["DISABLECVM"] = disablecvm
    lines = [line for line in await verify(**changes) if not line.startswith("AZURE_INSTANCE_SIZE")]
    line = only(lines, f"AZURE_IMAGE_ID={arm_seeded.image_id}")
    assert "a managed image cannot boot a confidential VM" in line
    assert "image build azure --gallery NAME" in line and "DISABLECVM=true" in line


async def test_confidential_vms_accept_a_gallery_image_version(verify, arm, arm_seeded):
    rg_path = arm_seeded.image_id.rsplit("/images/", 1)[0]
    version_id = f"{rg_path}/galleries/g1/images/podvm/versions/0.1.0"
    for path, kind in ((f"{rg_path}/galleries/g1", "galleries"), (f"{rg_path}/galleries/g1/images/podvm", "galleries/images"),
                       (version_id, "galleries/images/versions")):
        arm.state.resources[path.lower()] = {"id": path, "name": path.rsplit("/", 1)[1], "location": arm.location,
                                             "type": f"Microsoft.Compute/{kind}",
                                             "properties": {"provisioningState": "Succeeded"}}
    lines = await verify(DISABLECVM="false", AZURE_IMAGE_ID=version_id)
    assert not [line for line in lines if line.startswith("AZURE_IMAGE_ID")], lines
