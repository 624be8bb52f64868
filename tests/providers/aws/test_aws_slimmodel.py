"""The daemon's EC2 client on slim model data (cloudadaptor/providers/aws/slimmodel.py).

The list of operations is checked against the package's source; the cache is
made by a real child process from the installed botocore, reused, remade when
damaged, and a failure falls back to botocore's full model.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from awsworld import Ec2World, spec_for
from botocore import xform_name

from cloudadaptor.providers.aws import slimmodel
from cloudadaptor.providers.aws.client import make_ec2_client
from cloudadaptor.providers.aws.config import AwsConfig

PACKAGE = Path(slimmodel.__file__).parent
LOGGER = slimmodel.__name__


@pytest.fixture(scope="module")
def full_model() -> dict[str, Any]:
    """botocore's full EC2 model: python method names, paginators and waiters → operation."""
    loader = botocore.session.get_session().get_component("data_loader")
    service = loader.load_service_model("ec2", "service-2")
    waiters = loader.load_service_model("ec2", "waiters-2")["waiters"]
    return {
        "methods": {xform_name(op): op for op in service["operations"]},
        "waiters": {xform_name(name): spec["operation"] for name, spec in waiters.items()},
    }


def operations_used(source: str, model: dict[str, Any]) -> set[str]:
    """EC2 operations ``source`` reaches: client methods (called or passed), paginators, waiters."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in model["methods"]:
            found.add(model["methods"][node.attr])
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("get_paginator", "get_waiter")):
            [name] = node.args
            assert isinstance(name, ast.Constant), f"{ast.unparse(node)}: name the paginator or waiter literally"
            table = model["methods"] if node.func.attr == "get_paginator" else model["waiters"]
            found.add(table[name.value])
    return found


def test_the_scanner_finds_methods_paginators_and_waiters(full_model: dict[str, Any]):
    source = ("ec2.create_vpc(CidrBlock='x')\nrun(ec2.get_console_output)\n"
              "ec2.get_paginator('describe_subnets')\nself.ec2.get_waiter('image_available').wait()\n"
              "instances.describe_instance(ec2, 'i-1')\n")
    assert operations_used(source, full_model) == {"CreateVpc", "GetConsoleOutput", "DescribeSubnets", "DescribeImages"}


def test_every_ec2_operation_the_package_uses_is_in_the_list_and_no_other(full_model: dict[str, Any]):
    used: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for op in operations_used(path.read_text(), full_model):
            used.setdefault(op, []).append(path.name)
    missing = {op: files for op, files in used.items() if op not in slimmodel.EC2_OPERATIONS}
    assert not missing, f"add to slimmodel.EC2_OPERATIONS: {missing}"
    assert sorted(slimmodel.EC2_OPERATIONS) == sorted(used), "slimmodel.EC2_OPERATIONS lists operations nothing calls"


def _made(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "made in" in r.getMessage()]


def test_the_slim_model_is_made_once_then_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger=LOGGER)
    first = slimmodel.slim_model_dir(tmp_path)
    assert first is not None and first.parent == tmp_path
    assert first.name.startswith(f"botocore-{botocore.__version__}-")
    assert len(_made(caplog)) == 1
    service = json.loads(next(first.glob("ec2/*/service-2.json")).read_text())
    assert sorted(service["operations"]) == sorted(slimmodel.EC2_OPERATIONS)
    assert "InstanceType" in service["shapes"] and "NatGateway" not in service["shapes"]  # reached / not reached
    endpoints = json.loads((first / "endpoints.json").read_text())
    assert {s for p in endpoints["partitions"] for s in p["services"]} <= set(slimmodel.ENDPOINT_SERVICES)
    inode = first.stat().st_ino
    caplog.clear()

    again = slimmodel.slim_model_dir(tmp_path)
    assert again == first and again.stat().st_ino == inode
    assert _made(caplog) == [], "a valid cache is reused without running the generator"
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


@pytest.mark.parametrize("damage", ["truncated", "manifest missing", "file missing"])
def test_a_damaged_or_partial_cache_is_made_again(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str):
    made = slimmodel.slim_model_dir(tmp_path)
    assert made is not None
    service = next(made.glob("ec2/*/service-2.json"))
    if damage == "truncated":
        service.write_bytes(service.read_bytes()[:1000])
    elif damage == "manifest missing":
        (made / slimmodel.MANIFEST).unlink()
    else:
        service.unlink()
    stale = tmp_path / ".tmp-crashed"  # what a run killed mid-way left
    stale.mkdir()
    old = time.time() - 2 * slimmodel._STALE_TMP_AGE
    os.utime(stale, (old, old))
    caplog.set_level(logging.INFO, logger=LOGGER)
    caplog.clear()  # the first making may be captured too when an earlier test left the logger at INFO

    again = slimmodel.slim_model_dir(tmp_path)
    assert again == made
    assert len(_made(caplog)) == 1
    assert any("damaged" in r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert json.loads(next(again.glob("ec2/*/service-2.json")).read_text())["operations"]
    assert [p.name for p in tmp_path.iterdir()] == [made.name], "the crashed run's directory is gone"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_a_failing_generator_falls_back_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert slimmodel.slim_model_dir(tmp_path, operations=("RunInstances", "LaunchRockets")) is None
    [warning] = _warnings(caplog)
    assert "LaunchRockets" in warning and "full model" in warning, warning
    assert list(tmp_path.iterdir()) == [], "nothing half-made is left"


def test_a_generator_past_its_timeout_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert slimmodel.slim_model_dir(tmp_path, timeout=0.01) is None
    [warning] = _warnings(caplog)
    assert "timed out" in warning and "full model" in warning, warning
    assert list(tmp_path.iterdir()) == []


def test_the_client_uses_the_full_model_when_the_cache_cannot_be_made(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    caplog.set_level(logging.INFO, logger=LOGGER)
    client = make_ec2_client(AwsConfig(region="us-east-1"), model_cache=blocker / "aws-models")
    try:
        assert len(client.meta.service_model.operation_names) > 10 * len(slimmodel.EC2_OPERATIONS)
        assert len(_warnings(caplog)) == 1
    finally:
        client.close()


@pytest.mark.parametrize("region", ["us-east-1", "eu-central-1", "cn-north-1", "us-gov-west-1", "ap-southeast-5"])
@pytest.mark.parametrize("fips", ["false", "true"])
def test_the_slim_client_resolves_the_endpoint_of_the_full_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, region: str, fips: str):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_USE_FIPS_ENDPOINT", fips)
    config = AwsConfig(region=region)
    slim = make_ec2_client(config, model_cache=tmp_path)
    full = make_ec2_client(config)
    try:
        assert len(slim.meta.service_model.operation_names) == len(slimmodel.EC2_OPERATIONS)
        assert slim.meta.endpoint_url == full.meta.endpoint_url
        assert slim.meta.partition == full.meta.partition
    finally:
        slim.close()
        full.close()


async def test_the_provider_built_from_settings_uses_the_slim_model_under_state_dir(aws: Ec2World, tmp_path: Path):
    provider = aws.provider(STATE_DIR=str(tmp_path))
    instance = await provider.create_instance(spec_for())
    client = await provider.client()
    assert sorted(client.meta.service_model.operation_names) == sorted(slimmodel.EC2_OPERATIONS)
    assert [p.name for p in (tmp_path / "aws-models").iterdir()][0].startswith("botocore-")
    await provider.delete_instance(instance.id)
    assert aws.alive() == []


@pytest.mark.parametrize("region", ["us-east-1", "eu-central-1", "cn-north-1"])
def test_credential_providers_reach_sts_through_the_slim_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, region: str):
    """IRSA and assume-role make an STS client from the same session (so the same loader)."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS", "AWS_PROFILE", "AWS_USE_FIPS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    slim_dir = slimmodel.slim_model_dir(tmp_path)
    assert slim_dir is not None
    slim_session = botocore.session.get_session()
    slim_session.register_component("data_loader", slimmodel.SlimLoader(slim_dir, None))
    slim = slim_session.create_client("sts", region_name=region, aws_access_key_id="a", aws_secret_access_key="b")
    full = botocore.session.get_session().create_client("sts", region_name=region, aws_access_key_id="a",
                                                        aws_secret_access_key="b")
    try:
        assert "AssumeRoleWithWebIdentity" in slim.meta.service_model.operation_names
        assert slim.meta.endpoint_url == full.meta.endpoint_url
    finally:
        slim.close()
        full.close()


def _shape_facts(shape: Any, seen: set[str]) -> Any:
    """What botocore's serializer, validator and parser read of ``shape`` (recursively): all but docs and enums."""
    if shape is None:
        return None
    if shape.name in seen:
        return shape.name
    seen = seen | {shape.name}
    metadata = {k: v for k, v in shape.metadata.items() if k not in ("enum", "documentation")}
    facts: dict[str, Any] = {"name": shape.name, "type": shape.type_name, "serialization": shape.serialization,
                             "metadata": metadata}
    if shape.type_name == "structure":
        facts["members"] = {name: _shape_facts(member, seen) for name, member in shape.members.items()}
        facts["required"] = shape.required_members
    elif shape.type_name == "list":
        facts["member"] = _shape_facts(shape.member, seen)
    elif shape.type_name == "map":
        facts["key"], facts["value"] = _shape_facts(shape.key, seen), _shape_facts(shape.value, seen)
    return facts


def test_the_slim_operations_are_the_full_ones_without_docs_or_enums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    slim = make_ec2_client(AwsConfig(region="us-east-1"), model_cache=tmp_path)
    full = make_ec2_client(AwsConfig(region="us-east-1"))
    try:
        slim_model, full_model = slim.meta.service_model, full.meta.service_model
        for name in slimmodel.EC2_OPERATIONS:
            ours, theirs = slim_model.operation_model(name), full_model.operation_model(name)
            assert ours.http == theirs.http and ours.metadata == theirs.metadata, name
            for side in ("input_shape", "output_shape"):
                assert _shape_facts(getattr(ours, side), set()) == _shape_facts(getattr(theirs, side), set()), name
            assert [e.name for e in ours.error_shapes] == [e.name for e in theirs.error_shapes], name
        assert slim_model.shape_for("InstanceType").enum == [] and full_model.shape_for("InstanceType").enum
    finally:
        slim.close()
        full.close()


def test_the_slim_loader_reads_plain_dicts(tmp_path: Path):
    """Plain dicts keep the order and take half the memory of botocore's ``OrderedDict``s (the client keeps them)."""
    slim_dir = slimmodel.slim_model_dir(tmp_path)
    assert slim_dir is not None
    loader = slimmodel.SlimLoader(slim_dir, None)
    service = loader.load_service_model("ec2", "service-2")
    path = next(slim_dir.glob("ec2/*/service-2.json"))
    assert service == json.loads(path.read_text()) and type(service) is dict and type(service["shapes"]) is dict
    assert list(service["shapes"]) == list(json.loads(path.read_text())["shapes"])  # the file's order
    ruleset = loader.load_service_model("ec2", "endpoint-rule-set-1")  # botocore's own .json.gz file
    assert type(ruleset) is dict and ruleset["rules"]
    assert loader.load_data("partitions")["partitions"]
