"""CreateVM's initdata and registry credentials: validated before anything is recorded, within the provider's limit."""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os

import pytest

from cloudadaptor import initdata, userdata
from cloudadaptor.adaptor.hooks import PodCredentials
from cloudadaptor.adaptor.lifecycle import LifecycleError
from cloudadaptor.dev.shim import shim_annotations
from cloudadaptor.ttrpc.errors import Code
from test_initdata import MALFORMED

SANDBOX = "b" * 64
ANN = "io.katacontainers.config.hypervisor.cc_init_data"
DOC = b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"policy.rego" = "package default"\n'
POD_DOC = b'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"policy.rego" = "package pod"\n'
AUTH = json.dumps({"auths": {"registry.example": {"auth": "dXNlcjpzM2NyM3Q="}}}).encode()


def b64gz(document: bytes) -> str:
    return base64.b64encode(gzip.compress(document)).decode()


class Credentials:
    """A PodCredentials that answers fixed bytes and records who asked."""

    def __init__(self, auth: bytes | None) -> None:
        self.auth, self.asked = auth, []

    async def registry_auth(self, pod_namespace: str, pod_name: str) -> bytes | None:
        self.asked.append((pod_namespace, pod_name))
        return self.auth


_IS_CREDENTIALS: type[PodCredentials] = Credentials  # checked by mypy in test_lint


def _files(lifecycle) -> dict[str, str]:
    return userdata.parse(lifecycle.store.get(SANDBOX).user_data)


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_each_malformed_initdata_is_refused_leaving_no_record_and_no_vm(lifecycle_factory, provider, netns_file, name):
    encoded, words = MALFORMED[name]
    lifecycle = lifecycle_factory(agent_port=1)
    if not encoded:  # an empty annotation means "no initdata" (the shim's default): pad it to a non-empty nothing
        encoded, words = "====", "not valid base64"
    annotations = shim_annotations("web", "prod", {ANN: encoded})
    with pytest.raises(LifecycleError) as err:
        await lifecycle.create(SANDBOX, annotations, netns_file)
    assert err.value.code == Code.INVALID_ARGUMENT and words in err.value.message, err.value.message
    assert ANN in err.value.message, "the message names where the initdata came from"
    assert lifecycle.store.all() == [] and provider.created == []


async def test_the_annotation_overrides_the_default_and_the_default_applies_without_it(lifecycle_factory, netns_file):
    lifecycle = lifecycle_factory(agent_port=1, initdata=initdata.decode(b64gz(DOC)))
    await lifecycle.create(SANDBOX, shim_annotations("web", "prod", {ANN: b64gz(POD_DOC)}), netns_file)
    assert initdata.decode(_files(lifecycle)[userdata.INITDATA_PATH]).document == POD_DOC
    other = "c" * 64
    await lifecycle.create(other, shim_annotations("api", "prod"), netns_file)
    carried = userdata.parse(lifecycle.store.get(other).user_data)[userdata.INITDATA_PATH]
    assert initdata.decode(carried).document == DOC


async def test_without_initdata_the_user_data_carries_none(lifecycle_factory, netns_file):
    lifecycle = lifecycle_factory(agent_port=1)
    await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    assert set(_files(lifecycle)) == {userdata.APF_CONFIG_PATH}


async def test_initdata_over_the_providers_limit_is_refused_naming_the_sizes(lifecycle_factory, provider, netns_file):
    provider.limit = 16384
    noise = base64.b64encode(os.urandom(20000)).decode()  # incompressible
    big = DOC + f'"aa.toml" = "{noise}"\n'.encode()
    lifecycle = lifecycle_factory(agent_port=1)
    with pytest.raises(LifecycleError) as err:
        await lifecycle.create(SANDBOX, shim_annotations("web", "prod", {ANN: b64gz(big)}), netns_file)
    assert err.value.code == Code.INVALID_ARGUMENT and "limit is 16384 bytes" in err.value.message, err.value.message
    assert "encoded initdata" in err.value.message and lifecycle.store.all() == []


async def test_registry_credentials_become_auth_json(lifecycle_factory, netns_file):
    credentials = Credentials(AUTH)
    lifecycle = lifecycle_factory(agent_port=1, credentials=credentials)
    await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    assert credentials.asked == [("prod", "web")]
    assert json.loads(_files(lifecycle)[userdata.AUTH_JSON_PATH]) == json.loads(AUTH)


async def test_credentials_that_do_not_fit_are_left_out_with_one_warning(lifecycle_factory, provider, netns_file, caplog):
    provider.limit = 16384
    huge = json.dumps({"auths": {f"r{i}.example": {"auth": "x" * 60} for i in range(300)}}).encode()
    lifecycle = lifecycle_factory(agent_port=1, credentials=Credentials(huge))
    with caplog.at_level(logging.WARNING):
        await lifecycle.create(SANDBOX, shim_annotations("web", "prod"), netns_file)
    assert userdata.AUTH_JSON_PATH not in _files(lifecycle), "the pod still starts, without credentials"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pod prod/web" in warnings[0] and "16384" in warnings[0], warnings
    assert "xxxx" not in warnings[0]
