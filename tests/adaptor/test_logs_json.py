"""LOG_FORMAT=json: one JSON object per line, with the sandbox id, pod and instance id as fields."""

from __future__ import annotations

import json
import logging

import pytest

from cloudadaptor.adaptor.lifecycle import LifecycleError
from cloudadaptor.adaptor.observers import LogFieldsObserver, ObserverChain
from cloudadaptor.adaptor.service import HypervisorService
from cloudadaptor.commandline import JsonFormatter, setup_logging
from cloudadaptor.dev.shim import shim_annotations
from cloudadaptor.protocols import hypervisor_pb2 as hv

SANDBOX = "c" * 64


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def json_lines():
    handler = _Lines()
    logger = logging.getLogger("cloudadaptor")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(old)


def _calls(service: HypervisorService) -> dict:
    return {m.name: m.call for m in service.methods()}


async def test_lifecycle_records_carry_sandbox_pod_and_instance(lifecycle_factory, agent, netns_file, json_lines):
    lifecycle = lifecycle_factory(agent_port=agent.port, observer=ObserverChain([LogFieldsObserver()]))
    calls = _calls(HypervisorService(lifecycle))
    await calls["CreateVM"](hv.CreateVMRequest(id=SANDBOX, annotations=shim_annotations("web", "prod"),
                                               networkNamespacePath=netns_file))
    await calls["StartVM"](hv.StartVMRequest(id=SANDBOX))
    records = [json.loads(line) for line in json_lines]  # every line is one JSON object
    ready = [r for r in records if "agent ready" in r["message"]]
    assert ready, [r["message"] for r in records]
    assert ready[0]["sandbox_id"] == SANDBOX and ready[0]["pod"] == "prod/web"
    assert ready[0]["instance_id"].startswith("i-fake-"), ready[0]
    assert ready[0]["level"] == "info" and ready[0]["logger"] == "cloudadaptor.adaptor.lifecycle"
    created = [r for r in records if r["message"].startswith("CreateVM")]
    assert created[0]["pod"] == "prod/web" and "instance_id" not in created[0], "no VM exists at CreateVM"
    await calls["StopVM"](hv.StopVMRequest(id=SANDBOX))
    stopped = [json.loads(line) for line in json_lines if "StopVM" in json.loads(line)["message"]]
    assert stopped[-1]["instance_id"].startswith("i-fake-"), "StopVM knows the VM from the record"


async def test_failure_records_are_json_too(lifecycle_factory, provider, netns_file, json_lines):
    lifecycle = lifecycle_factory(agent_port=1)
    calls = _calls(HypervisorService(lifecycle))
    provider.fail_create = 'quota "exceeded"\nsecond line'
    await calls["CreateVM"](hv.CreateVMRequest(id=SANDBOX, annotations=shim_annotations("web", "prod"),
                                               networkNamespacePath=netns_file))
    with pytest.raises(LifecycleError):
        await calls["StartVM"](hv.StartVMRequest(id=SANDBOX))
    failed = [json.loads(line) for line in json_lines if "failed" in line]
    assert failed and all(r["sandbox_id"] == SANDBOX for r in failed)
    assert any('quota "exceeded"\nsecond line' in r["message"] for r in failed)


def test_setup_logging_json_writes_one_object_per_line(monkeypatch, capsys):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    setup_logging("debug", "json")
    logging.getLogger("cloudadaptor.test").debug("hello %s", "world", extra={"pod": "ns/p"})
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line)["message"] == "hello world" and json.loads(line)["pod"] == "ns/p"
    assert json.loads(line)["level"] == "debug" and json.loads(line)["time"].endswith("Z")
