"""AzureProvider with the real azure-mgmt clients against the fake ARM endpoint (HTTPS, LRO protocol)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time

import pytest

from cloudadaptor.providers.base import TAG_NODE, TAG_OWNER, TAG_POD, TAG_SANDBOX, InstanceSpec, ProviderError
from fakes.armserver import FakeArm, StaticTokenCredential, fast_provider

SANDBOX = "0123abcd" + "e" * 56
NAME = "podvm-web-0123abcd"


@pytest.fixture
async def make_provider(arm_env):
    made = []

    def make(credential=None, **changes):
        extra = {k: v for k, v in changes.items() if k.isupper()}
        tuning = {k: v for k, v in changes.items() if not k.isupper()}
        provider = fast_provider({**arm_env, **extra}, credential, **tuning)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.close()


@pytest.fixture
def provider(make_provider):
    return make_provider()


def spec(name: str = NAME, sandbox: str = SANDBOX, **changes) -> InstanceSpec:
    tags = {TAG_OWNER: "cloud-api-adaptor", TAG_NODE: "worker-1", TAG_SANDBOX: sandbox, TAG_POD: "default/web"}
    fields = dict(name=name, sandbox_id=sandbox, user_data="#cloud-config\nwrite_files: []\n",
                  client_token="token-" + sandbox[:8], tags=tags)
    return InstanceSpec(**{**fields, **changes})


def leftovers(arm: FakeArm) -> list[str]:
    return arm.ids("virtualMachines") + arm.ids("networkInterfaces") + arm.ids("disks")


# ---------------------------------------------------------------------- create / delete


async def test_create_puts_nic_in_subnet_then_ssh_only_vm_and_returns_its_private_ip(provider, arm, arm_seeded, ssh_key):
    instance = await provider.create_instance(spec())
    assert instance.name == NAME and instance.id.endswith(f"/virtualMachines/{NAME}")
    assert ipaddress.ip_address(instance.ips[0]) in ipaddress.ip_network(arm_seeded.subnet_prefix)
    vm = arm.resource(instance.id)["properties"]
    assert vm["provisioningState"] == "Succeeded"
    assert vm["hardwareProfile"]["vmSize"] == "Standard_B2als_v2"
    assert vm["storageProfile"]["imageReference"] == {"id": arm_seeded.image_id}
    assert vm["storageProfile"]["osDisk"]["deleteOption"] == "Delete"
    nic_ref = vm["networkProfile"]["networkInterfaces"][0]
    assert nic_ref["properties"]["deleteOption"] == "Delete"
    linux = vm["osProfile"]["linuxConfiguration"]
    assert vm["osProfile"]["adminUsername"] == "peerpod" and "adminPassword" not in vm["osProfile"]
    assert linux["disablePasswordAuthentication"] is True
    assert linux["ssh"]["publicKeys"][0]["keyData"] == ssh_key.read_text().strip()
    assert base64.b64decode(vm["userData"]).decode() == spec().user_data
    assert "securityProfile" not in vm, "DISABLECVM=true: an ordinary VM"
    nic = arm.resource(nic_ref["id"])["properties"]
    assert nic["networkSecurityGroup"]["id"] == arm_seeded.nsg_id
    assert nic["ipConfigurations"][0]["properties"]["subnet"]["id"] == arm_seeded.subnet_id


async def test_vm_and_nic_tags_have_no_slash_and_list_owned_gives_back_our_tag_names(provider, arm):
    instance = await provider.create_instance(spec())
    vm_tags = arm.resource(instance.id)["tags"]
    assert vm_tags["peerpods.io_sandbox-id"] == SANDBOX and not any("/" in k for k in vm_tags), vm_tags
    assert instance.tags[TAG_SANDBOX] == SANDBOX
    owned = await provider.list_owned({TAG_NODE: "worker-1", TAG_SANDBOX: SANDBOX})
    assert [(i.id, i.ips, i.tags[TAG_POD]) for i in owned] == [(instance.id, instance.ips, "default/web")]
    assert await provider.list_owned({TAG_NODE: "worker-2"}) == []


async def test_delete_removes_vm_nic_and_disk_and_a_second_delete_is_harmless(provider, arm):
    instance = await provider.create_instance(spec())
    assert len(leftovers(arm)) == 3
    await provider.delete_instance(instance.id)
    assert leftovers(arm) == []
    await provider.delete_instance(instance.id)


async def test_deleting_a_vm_arm_reports_as_404_resource_not_found_is_success(provider, arm):
    arm.state.missing_delete_status = 404
    instance = await provider.create_instance(spec())
    await provider.delete_instance(instance.id)
    await provider.delete_instance(instance.id)
    assert arm.count("DELETE", "virtualMachines", status=404) >= 1


async def test_delete_removes_the_nic_and_disk_a_deleted_vm_left_behind(provider, arm):
    arm.state.honour_delete_options = False  # the cloud detaches instead of deleting
    instance = await provider.create_instance(spec())
    await provider.delete_instance(instance.id)
    assert leftovers(arm) == []


async def test_delete_of_something_that_is_not_a_vm_id_says_so(provider):
    with pytest.raises(ProviderError, match="virtual machine id"):
        await provider.delete_instance("i-0123456789abcdef0")


# ---------------------------------------------------------------------- failures and retries


async def test_vm_put_refused_deletes_the_nic_already_made(provider, arm):
    arm.fail_next("PUT", "virtualMachines", status=409, code="SkuNotAvailable", message="no capacity")
    with pytest.raises(ProviderError) as err:
        await provider.create_instance(spec())
    assert "SkuNotAvailable" in str(err.value) and "removed" in str(err.value), str(err.value)
    assert arm.count("PUT", "networkInterfaces", status=201) == 1, "the NIC was created first"
    assert leftovers(arm) == []


async def test_vm_operation_failing_after_acceptance_deletes_vm_nic_and_disk(provider, arm):
    arm.fail_next("PUT", "virtualMachines", code="AllocationFailed", message="allocation failed", lro=True)
    with pytest.raises(ProviderError, match="AllocationFailed"):
        await provider.create_instance(spec())
    assert arm.count("PUT", "virtualMachines", status=201) == 1
    assert leftovers(arm) == []


async def test_nic_put_refused_fails_without_creating_a_vm(provider, arm):
    arm.fail_next("PUT", "networkInterfaces", status=400, code="SubnetIsFull", message="subnet full")
    with pytest.raises(ProviderError, match="SubnetIsFull"):
        await provider.create_instance(spec())
    assert arm.count("PUT", "virtualMachines") == 0
    assert leftovers(arm) == []


async def test_429_is_retried_after_the_retry_after_delay(provider, arm):
    arm.throttle(1, retry_after="1", method="PUT", kind="virtualMachines")
    began = time.monotonic()
    instance = await provider.create_instance(spec())
    elapsed = time.monotonic() - began
    assert arm.count("PUT", "virtualMachines", status=429) == 1
    assert arm.count("PUT", "virtualMachines", status=201) == 1
    assert elapsed >= 1.0, f"Retry-After: 1 not honoured (create took {elapsed:.2f}s)"
    assert arm.resource(instance.id) is not None


async def test_throttling_beyond_the_retry_budget_fails_and_cleans_up(make_provider, arm):
    provider = make_provider(retry_total=2)
    arm.throttle(10, retry_after="0", method="PUT", kind="virtualMachines")
    with pytest.raises(ProviderError, match="TooManyRequests"):
        await provider.create_instance(spec())
    assert arm.count("PUT", "virtualMachines", status=429) == 3, "1 try + retry_total=2 retries"
    assert leftovers(arm) == []


async def test_server_errors_are_retried(provider, arm):
    arm.fail_next("GET", "networkInterfaces", status=503, code="ServiceUnavailable", times=2)
    await provider.create_instance(spec())
    assert len(await provider.list_owned({TAG_SANDBOX: SANDBOX})) == 1


async def test_operations_still_in_progress_are_polled_until_done(provider, arm):
    arm.state.lro_polls = 3
    instance = await provider.create_instance(spec())
    assert arm.resource(instance.id)["properties"]["provisioningState"] == "Succeeded"
    assert arm.count("GET", "/operations/") >= 2 * 4, "NIC and VM: 3 InProgress polls + the final one each"


async def until(condition, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_cancelled_create_leaves_nothing_behind(provider, arm):
    arm.state.lro_polls_by_kind["virtualmachines"] = 10**9  # the VM never finishes provisioning
    task = asyncio.create_task(provider.create_instance(spec()))
    await until(lambda: arm.ids("virtualMachines"))
    arm.state.lro_polls_by_kind.clear()  # the cleanup's own operations complete
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(arm) == []
    for op in arm.state.operations.values():
        op.polls_left = 0  # let the abandoned poller finish


# ---------------------------------------------------------------------- idempotence


async def test_repeated_create_adopts_the_provisioned_vm(provider, arm):
    first = await provider.create_instance(spec())
    again = await provider.create_instance(spec())
    assert again == first
    assert arm.count("PUT", "virtualMachines") == 1


async def test_adopting_a_vm_whose_nic_cannot_be_read_is_a_provider_error(provider, arm):
    await provider.create_instance(spec())
    arm.fail_next("GET", "networkInterfaces", status=403, code="AuthorizationFailed", message="no read on NICs")
    with pytest.raises(ProviderError, match="looking up the NIC of VM .*AuthorizationFailed") as err:
        await provider.create_instance(spec())
    assert err.value.__cause__ is not None, "the SDK error stays chained as the cause"


async def test_vm_name_taken_by_another_sandbox_is_refused_and_left_alone(provider, arm):
    other = await provider.create_instance(spec(sandbox="99999999" + "f" * 56))
    with pytest.raises(ProviderError, match="already exists for sandbox 99999999"):
        await provider.create_instance(spec())
    assert arm.resource(other.id) is not None


async def test_nic_of_a_create_that_died_before_the_vm_is_listed_and_deleted(provider, arm):
    arm.fail_next("PUT", "virtualMachines", status=409, code="Conflict")
    provider_cleanup = provider._remove  # simulate a crash: no cleanup after the failure

    async def crash(rg, name):
        return []

    provider._remove = crash
    with pytest.raises(ProviderError):
        await provider.create_instance(spec())
    provider._remove = provider_cleanup
    assert arm.ids("virtualMachines") == [] and len(arm.ids("networkInterfaces")) == 1
    owned = await provider.list_owned({TAG_SANDBOX: SANDBOX})
    assert [i.name for i in owned] == [NAME]
    await provider.delete_instance(owned[0].id)
    assert leftovers(arm) == []


# ---------------------------------------------------------------------- user data, sizes, images


async def test_user_data_over_64_kib_is_refused_before_any_cloud_call(provider, arm):
    before = len(arm.requests)
    with pytest.raises(ProviderError, match=r"Azure user data is limited to 64 KiB; this pod's user data is 65537 bytes"):
        await provider.create_instance(spec(user_data="x" * 65537))
    assert len(arm.requests) == before


async def test_user_data_of_exactly_64_kib_is_accepted(provider, arm):
    instance = await provider.create_instance(spec(user_data="x" * 65536))
    assert len(base64.b64decode(arm.resource(instance.id)["properties"]["userData"])) == 65536


SIZE_TABLE = [
    # (arm_env, spec changes, expected size or "!" + the refusal)
    ({}, {}, "Standard_B2als_v2"),
    ({}, {"instance_type": "Standard_D4as_v5"}, "Standard_D4as_v5"),
    ({"AZURE_INSTANCE_SIZE": ""}, {}, "Standard_B2als_v2"),  # DISABLECVM=true default
    ({"AZURE_INSTANCE_SIZES": "Standard_B2als_v2,Standard_D2as_v5,Standard_D4as_v5"},
     {"vcpus": 2, "memory_mib": 6144}, "Standard_D2as_v5"),
    ({"AZURE_INSTANCE_SIZES": "Standard_B2als_v2,Standard_D2as_v5,Standard_D4as_v5"}, {"vcpus": 3}, "Standard_D4as_v5"),
    ({"AZURE_INSTANCE_SIZES": "Standard_B2als_v2,Standard_D2as_v5,Standard_D4as_v5"}, {}, "Standard_B2als_v2"),
    ({"AZURE_INSTANCE_SIZES": "Standard_B2als_v2,Standard_NC4as_T4_v3"}, {"gpus": 1}, "Standard_NC4as_T4_v3"),
    ({"AZURE_INSTANCE_SIZES": "Standard_B2als_v2,Standard_D2as_v5"}, {"instance_type": "Standard_D4as_v5"},
     "!is not in AZURE_INSTANCE_SIZES"),
    ({"AZURE_INSTANCE_SIZES": "Standard_B2als_v2,Standard_D2as_v5"}, {"vcpus": 8}, "!no allowed instance type fits 8 vCPU"),
    ({}, {"instance_type": "Standard_Huge_v9"}, "!Standard_Huge_v9 is not offered in eastus"),
]


@pytest.mark.parametrize("extra_env, changes, expected", SIZE_TABLE)
async def test_size_selection(make_provider, arm, extra_env, changes, expected):
    provider = make_provider(**extra_env)
    if not expected.startswith("!"):
        instance = await provider.create_instance(spec(**changes))
        assert arm.resource(instance.id)["properties"]["hardwareProfile"]["vmSize"] == expected
    else:
        with pytest.raises(ProviderError, match=expected[1:]):
            await provider.create_instance(spec(**changes))
        assert arm.count("PUT", "networkInterfaces") == 0


async def test_size_restricted_for_the_subscription_is_not_used(make_provider, arm):
    arm.add_size("Standard_F2s_v2", 2, 4, restricted=True)
    provider = make_provider()
    with pytest.raises(ProviderError, match="Standard_F2s_v2 is not offered"):
        await provider.create_instance(spec(instance_type="Standard_F2s_v2"))


@pytest.mark.parametrize("kind, field", [
    ("managed", "id"), ("gallery", "id"), ("shared", "sharedGalleryImageId"), ("community", "communityGalleryImageId"),
])
async def test_image_annotation_goes_to_the_image_reference_field_of_its_kind(provider, arm, arm_seeded, kind, field):
    image = {
        "managed": lambda: arm.add_image(arm_seeded.resource_group, "other-image"),
        "gallery": lambda: arm.add_gallery_image_version(arm_seeded.resource_group, "gal", "podvm", "1.0.0"),
        "shared": lambda: arm.add_shared_gallery_image("sharedgal-1234", "podvm", "1.0.0"),
        "community": lambda: arm.add_shared_gallery_image("peerpods-5678", "podvm", "1.0.0", community=True),
    }[kind]()
    instance = await provider.create_instance(spec(image=image))
    assert arm.resource(instance.id)["properties"]["storageProfile"]["imageReference"] == {field: image}


async def test_image_annotation_that_is_no_azure_image_id_is_refused(provider, arm):
    with pytest.raises(ProviderError, match="image annotation 'ami-0abc'.*managed image id"):
        await provider.create_instance(spec(image="ami-0abc"))
    assert leftovers(arm) == []


async def test_confidential_vm_profile_unless_disablecvm(make_provider, arm):
    provider = make_provider(DISABLECVM="false", ENABLE_SECURE_BOOT="true", AZURE_INSTANCE_SIZE="Standard_DC2as_v5")
    instance = await provider.create_instance(spec())
    vm = arm.resource(instance.id)["properties"]
    assert vm["securityProfile"] == {"securityType": "ConfidentialVM",
                                     "uefiSettings": {"secureBootEnabled": True, "vTpmEnabled": True}}
    assert vm["storageProfile"]["osDisk"]["managedDisk"]["securityProfile"] == {"securityEncryptionType": "VMGuestStateOnly"}


async def test_token_is_requested_for_the_configured_endpoint(make_provider, arm):
    credential = StaticTokenCredential()
    provider = make_provider(credential)
    await provider.create_instance(spec())
    assert set(credential.scopes) == {arm.base_url + "/.default"}


# ---------------------------------------------------------------------- ownership


async def test_delete_refuses_a_vm_outside_azure_resource_group_and_leaves_it(make_provider, arm):
    from cloudadaptor.providers.base import ForeignInstance

    arm.add_resource_group("someone-elses-rg")
    elsewhere = make_provider(AZURE_RESOURCE_GROUP="someone-elses-rg")
    theirs = await elsewhere.create_instance(spec())
    provider = make_provider()
    with pytest.raises(ForeignInstance, match="someone-elses-rg"):
        await provider.delete_instance(theirs.id)
    with pytest.raises(ForeignInstance, match="AZURE_RESOURCE_GROUP"):
        await provider.describe_instance(theirs.id)
    assert arm.resource(theirs.id)["properties"]["provisioningState"] == "Succeeded", "the VM must still exist"


async def test_describe_instance_reads_a_vm_in_our_group_with_its_tags(provider):
    instance = await provider.create_instance(spec())
    described = await provider.describe_instance(instance.id)
    assert described is not None and described.id == instance.id and described.tags[TAG_SANDBOX] == SANDBOX
    await provider.delete_instance(instance.id)
    assert await provider.describe_instance(instance.id) is None


async def test_the_image_annotation_must_be_in_podvm_images_when_it_is_set(make_provider, arm, arm_seeded):
    other = arm_seeded.image_id.replace("/images/", "/images/not-allowed-")
    provider = make_provider(PODVM_IMAGES=arm_seeded.image_id.upper())  # ids compare without case
    with pytest.raises(ProviderError, match="not in PODVM_IMAGES"):
        await provider.create_instance(spec(image=other))
    assert leftovers(arm) == [], "refused before any cloud write"
    instance = await provider.create_instance(spec(image=arm_seeded.image_id))
    assert arm.resource(instance.id)["properties"]["storageProfile"]["imageReference"] == {"id": arm_seeded.image_id}
async def test_a_warm_pool_of_azure_vms_fills_is_claimed_and_leaves_nothing_when_turned_off(provider, arm, tmp_path):
    from fakes.poolvm import cloud_round_trip

    await cloud_round_trip(provider, tmp_path / "state.db", "worker-1", {})
    assert arm.ids("virtualMachines") + arm.ids("networkInterfaces") + arm.ids("disks") == []


async def test_a_created_vm_reports_its_size_and_when_arm_accepted_it(provider):
    instance = await provider.create_instance(spec())
    assert instance.instance_type == "Standard_B2als_v2"
    assert instance.launched_in is not None and instance.launched_in >= 0.0
    await provider.delete_instance(instance.id)
